"""What a node has and how busy it is: psutil for CPU/memory, NVML for GPUs.

NVML is optional: no `libnvidia-ml`, no driver or no GPU gives an empty GPU list and
one log line, never a crash. Sampling calls block briefly, so the agent runs them in a
thread (`asyncio.to_thread`), off the event loop.
"""

from __future__ import annotations

import logging
import os
import socket

import psutil

from shared.contracts.messages import GpuInfo, GpuLoad

log = logging.getLogger("nexus.node.hardware")


class Gpus:
    """NVML handles, opened once; an empty set when NVML is unavailable."""

    def __init__(self, fake_memory_gib: str = "") -> None:
        self._nvml = None
        self._handles: list[object] = []
        self.info: tuple[GpuInfo, ...] = ()
        self._fake_used: tuple[int, ...] | None = None
        if fake_memory_gib:  # test hook (NEXUS_FAKE_GPU_MEMORY_GIB): declared GPUs, no NVML
            declared = [p.strip().partition("/") for p in fake_memory_gib.split(",") if p.strip()]
            self.info = tuple(
                GpuInfo(index=i, name="Declared GPU (test hook)", uuid=f"GPU-fake-{i}",
                        memory_total_bytes=int(float(total) * 1024**3))
                for i, (total, _, _) in enumerate(declared))
            self._fake_used = tuple(int(float(used or 0) * 1024**3) for _, _, used in declared)
            log.info("GPUs declared by NEXUS_FAKE_GPU_MEMORY_GIB", extra={"gpus": len(self.info)})
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self.info = tuple(
                GpuInfo(index=i, name=_text(pynvml.nvmlDeviceGetName(h)),
                        uuid=_text(pynvml.nvmlDeviceGetUUID(h)),
                        memory_total_bytes=int(pynvml.nvmlDeviceGetMemoryInfo(h).total))
                for i, h in enumerate(self._handles)
            )
            log.info("NVML ready", extra={"gpus": len(self.info)})
        except Exception as exc:  # ImportError, NVMLError (no driver/library/GPU)
            log.info("no GPUs visible through NVML: %s", exc)
            self._nvml = None
            self._handles = []
            self.info = ()

    def sample(self) -> tuple[GpuLoad, ...]:
        if self._fake_used is not None:  # declared GPUs: the declared memory in use
            return tuple(GpuLoad(index=i, utilization_pct=0.0, memory_used_bytes=used)
                         for i, used in enumerate(self._fake_used))
        if self._nvml is None:
            return ()
        loads = []
        for i, handle in enumerate(self._handles):
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(handle)
                loads.append(GpuLoad(index=i, utilization_pct=float(util.gpu),
                                     memory_used_bytes=int(mem.used)))
            except Exception as exc:  # a GPU fell off the bus: report the others
                log.warning("cannot sample GPU %d: %s", i, exc)
        return tuple(loads)

    def close(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def host_addresses() -> tuple[str, ...]:
    """Non-loopback IPv4/IPv6 addresses of this host (loopback if there is nothing else)."""
    found: list[str] = []
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family in (socket.AF_INET, socket.AF_INET6):
                ip = addr.address.split("%")[0]
                if not ip.startswith(("127.", "::1", "fe80")):
                    found.append(ip)
    return tuple(sorted(set(found))) or ("127.0.0.1",)


def cpu_count() -> int:
    return os.cpu_count() or 1


def memory_total() -> int:
    return int(psutil.virtual_memory().total)


def sample_host() -> tuple[float, float]:
    """(cpu %, memory %); cpu is the average since the previous call (non-blocking)."""
    return float(psutil.cpu_percent(interval=None)), float(psutil.virtual_memory().percent)
