"""Model pull benchmark: `.venv/bin/python bench/models.py [--mib 64] [--runs 3]`.

The same GGUF (a generated one of `--mib` MiB) three ways, alternating, in the same run:
(a) the node's pull path (`services.node.models.Puller`: chunks from the object store
    through an ordered consumer, written to the partial file with its resume state,
    SHA-256 verified, renamed into the models directory, progress published);
(b) a raw nats-py object-store get of the same object into a file (the baseline the
    goal is set against: >= 0.8x its throughput);
(c) a plain file copy of the same bytes (the disk's ceiling).
Printed: MiB/s of each, the ratios, and the p99 interval between the progress messages
the pull published (goal: at most 1 s). Timings are printed, never asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msgspec

from services.node.models import Inventory, Puller
from shared.contracts import subjects
from shared.contracts.messages import ModelCommand, ModelProgress
from shared.infra import EmbeddedNats
from shared.infra.gguf import describe, sha256_file, write_tiny
from shared.infra.messaging import Bus
from shared.infra.model_store import ModelStore

MIB = 1024 * 1024


async def run(mib: int, runs: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-models-"))
    server = EmbeddedNats(work / "nats")
    server.start()
    try:
        bus = await Bus.connect(server.url, "bench")
        await bus.ensure_object_stores((subjects.MODEL_BUCKET,))
        source = write_tiny(work / "bench.gguf", payload_bytes=mib * MIB)
        size = source.stat().st_size
        artifact = describe(source, name="bench", sha256=sha256_file(source))
        store = ModelStore(bus.js)
        await store.put(source, artifact)
        intervals: list[float] = []
        last: list[float] = []

        async def on_progress(msg) -> None:
            msgspec.json.decode(msg.data, type=ModelProgress)
            now = time.monotonic()
            if last:
                intervals.append(now - last[0])
            last[:] = [now]

        await bus.nc.subscribe(subjects.node_model_progress("bench"), cb=on_progress)
        times: dict[str, list[float]] = {"pull": [], "raw get": [], "file copy": []}
        for i in range(runs):
            inventory = Inventory(work / f"node-{i}" / "models")
            puller = Puller("bench", bus, store, inventory, progress_interval_s=0.5)
            last.clear()
            started = time.perf_counter()
            await puller._download(ModelCommand(op="pull", task_id=f"t{i}", model="bench",
                                                sha256=artifact.sha256, size_bytes=size))
            times["pull"].append(time.perf_counter() - started)
            assert inventory.get("bench") is not None, "the pull did not install"
            for task in list(puller._reports):
                task.cancel()  # nobody answers task updates here

            obs = await bus.js.object_store(subjects.MODEL_BUCKET.bucket)
            started = time.perf_counter()
            with open(work / f"raw-{i}.gguf", "wb") as f:  # noqa: ASYNC230
                await obs.get("bench", writeinto=f)
            times["raw get"].append(time.perf_counter() - started)

            started = time.perf_counter()
            shutil.copyfile(source, work / f"copy-{i}.gguf")
            times["file copy"].append(time.perf_counter() - started)
        await bus.close()
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    speed = {k: size / MIB / statistics.median(v) for k, v in times.items()}
    print(f"model pull, {size / MIB:.1f} MiB, median of {runs} runs each:")
    for k, v in speed.items():
        print(f"  {k:<10} {v:8.1f} MiB/s")
    print(f"  pull / raw get   {speed['pull'] / speed['raw get']:.2f}x  (goal >= 0.8x)")
    print(f"  pull / file copy {speed['pull'] / speed['file copy']:.2f}x")
    if intervals:
        p99 = sorted(intervals)[max(0, int(len(intervals) * 0.99) - 1)]
        print(f"  progress interval p99 {p99 * 1000:.0f} ms over {len(intervals)} intervals "
              f"(goal <= 1000 ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.mib, args.runs))


if __name__ == "__main__":
    main()
