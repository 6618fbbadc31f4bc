"""Stress check: a node answered a re-registration just as it stops still stops.

`python -m tests.node_stop_race [--rounds 40] [--when draining|sigterm] [--jitter-s 0.002]`
(`make node-stop-race`). Each round starts a real node process (an Ollama runtime:
tests/fake_upstream.py) on a real NATS, plays the orchestrator on
`nexus.node.<id>.register` / `.status`, removes a model (the node re-registers with the
runtime it now has), holds that registration's answer, sends SIGTERM and answers it a
random moment (0..jitter) after the node says `draining` (or after the signal). It counts
nodes that did not exit within 15 s and nodes that logged `registered` after `left`;
exit status 1 if any. The race is timing-dependent, hence rounds: before the fix
(Python 3.11 `asyncio.wait_for` losing the shutdown's cancel when the answer came with
it) 4 of 40 rounds hung with `--when draining` and 1 of 40 with `--when sigterm`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

from shared.contracts import subjects
from shared.contracts.messages import (
    ModelCommand,
    ModelCommandReply,
    NodeRegistration,
    NodeStatusChange,
    RegistrationAck,
)
from shared.infra.messaging import Bus
from shared.infra.nats_server import EmbeddedNats
from shared.infra.process import spawn
from tests.fake_upstream import FakeUpstream
from tests.support import REPO, service_env


async def one_round(i: int, orchestrator: Bus, nats_url: str, runtime_url: str, tmp: Path,
                    when: str, jitter_s: float) -> tuple[bool, bool]:
    node_id = uuid.uuid4().hex
    node_dir = tmp / f"node{i}"
    node_dir.mkdir()
    (node_dir / "node_id").write_text(node_id + "\n")
    registrations: list[NodeRegistration] = []
    answer = asyncio.Event()

    async def on_register(reg: NodeRegistration, _msg) -> RegistrationAck:
        registrations.append(reg)
        if len(registrations) > 1:  # the re-registration: answered as the node stops
            await answer.wait()
            end = time.perf_counter() + random.uniform(0, jitter_s)
            while time.perf_counter() < end:  # sub-millisecond: no sleep is that fine
                pass
        return RegistrationAck(node_id=node_id, status="online", heartbeat_timeout_s=5)

    async def on_status(change: NodeStatusChange, _msg) -> None:
        if change.status == when:
            answer.set()

    subs = [await orchestrator.subscribe(subjects.node_register(node_id), NodeRegistration,
                                         on_register, concurrent=True),
            await orchestrator.subscribe(subjects.node_status(node_id), NodeStatusChange, on_status)]
    env = service_env(nats_url, "", NEXUS_RUNTIME_URL=runtime_url, NEXUS_RUNTIME_KIND="ollama",
                      NEXUS_NODE_DATA_DIR=str(node_dir), NEXUS_HEARTBEAT_INTERVAL_S="0.5",
                      NEXUS_FAKE_GPU_MEMORY_GIB="")
    env.pop("DATABASE_URL", None)
    log_path = node_dir / "node.log"
    proc = spawn([sys.executable, "-m", "services.node.main"], log_path, cwd=REPO, env=env,
                 stdin=None, start_new_session=False)
    try:
        deadline = time.monotonic() + 60
        while not registrations and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        await orchestrator.request(subjects.node_models(node_id),
                                   ModelCommand(op="remove", model=f"m{i}", source="ollama"),
                                   ModelCommandReply, timeout=10)
        deadline = time.monotonic() + 5
        while len(registrations) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        if when == "sigterm":
            answer.set()
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        hung = proc.poll() is None
        text = log_path.read_text(errors="replace")
        left = text.find('"msg":"left"')
        return hung, left >= 0 and '"msg":"registered"' in text[left:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for sub in subs:
            await sub.unsubscribe()


async def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="node-stop-race-") as tmp_name:
        tmp = Path(tmp_name)
        nats = EmbeddedNats(tmp / "nats")
        nats.start()
        fake = FakeUpstream(models=("base", *[f"m{i}" for i in range(args.rounds)])).start()
        orchestrator = await Bus.connect(nats.url, "node-stop-race")
        hung = late = 0
        try:
            for i in range(args.rounds):
                h, lt = await one_round(i, orchestrator, nats.url, fake.openai_base_url, tmp,
                                        args.when, args.jitter_s)
                hung += h
                late += lt
                if h or lt:
                    print(f"round {i}: hung={h} registered_after_left={lt}", flush=True)
        finally:
            await orchestrator.close()
            fake.stop()
            nats.stop()
        print(f"{args.rounds} rounds (--when {args.when}): {hung} did not stop on SIGTERM, "
              f"{late} registered after leaving")
        return 1 if hung or late else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--when", choices=("draining", "sigterm"), default="draining")
    parser.add_argument("--jitter-s", type=float, default=0.002)
    os.chdir(REPO)
    sys.exit(asyncio.run(main(parser.parse_args())))
