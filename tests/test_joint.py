"""Joint appends (services/orchestrator/joint.py) against the real event store: a rider's
events commit with the call's own, and a refused rider never costs the call its record."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from services.orchestrator.joint import append_joint
from shared.contracts.events import Metadata, SessionClosed, SessionStarted, session_stream
from shared.infra.eventstore import EventStore, WrongExpectedVersion

META = Metadata(tenant="t-joint", actor="tester")


class Rider:
    def __init__(self, stream: str, expected: int | None, fail: bool = False) -> None:
        self.stream, self.expected, self.fail = stream, expected, fail
        self.outcomes: list[Any] = []
        self.told: list[bool] = []

    async def appends(self, outcome: Any) -> list:
        self.outcomes.append(outcome)
        if self.fail:
            raise RuntimeError("the rider could not build its events")
        return [(self.stream, [SessionClosed(session_id="rider", reason=str(outcome))],
                 self.expected)]

    async def recorded(self, ok: bool) -> None:
        self.told.append(ok)


async def streams(store: EventStore, *expected: int) -> tuple[str, str]:
    """Two new streams holding `expected` events each: the shared test database's
    projections read them too, so each is a session of its own, started once."""
    out = []
    for n in expected:
        sid = str(uuid.uuid4())
        stream = session_stream(sid)
        if n:
            filler = [SessionClosed(session_id=sid, reason="filler")] * (n - 1)
            await store.append(stream, [SessionStarted(session_id=sid, tenant="t-joint"), *filler],
                               expected_version=0, metadata=META)
        out.append(stream)
    return out[0], out[1]


def own(stream: str, version: int) -> list:
    return [(stream, [SessionClosed(session_id="own", reason="end")], version)]


async def test_the_riders_events_commit_with_the_calls_own(store: EventStore) -> None:
    call, run = await streams(store, 1, 2)
    rider = Rider(run, 2)
    await append_joint(store, own(call, 1), META, rider, "answer")
    mine, theirs = (await store.read_stream(call))[-1], (await store.read_stream(run))[-1]
    assert rider.outcomes == ["answer"] and rider.told == [True]
    assert theirs.stream_version == 3 and theirs.event.reason == "answer"
    assert mine.recorded_at == theirs.recorded_at  # one transaction


async def test_a_refused_rider_leaves_the_calls_own_events_recorded_alone(store: EventStore) -> None:
    call, run = await streams(store, 1, 2)
    rider = Rider(run, 1)  # the run's stream moved on (another owner, a cancel)
    await append_joint(store, own(call, 1), META, rider, "answer")
    assert rider.told == [False]
    assert [r.event.reason for r in (await store.read_stream(call))[1:]] == ["end"]
    assert len(await store.read_stream(run)) == 2  # nothing of the rider's


async def test_a_rider_that_fails_leaves_the_calls_own_events_recorded(store: EventStore) -> None:
    call, run = await streams(store, 1, 0)
    rider = Rider(run, 0, fail=True)
    await append_joint(store, own(call, 1), META, rider, "answer")
    assert rider.told == [False] and len(await store.read_stream(call)) == 2
    assert await store.read_stream(run) == []


async def test_a_conflict_on_the_calls_own_stream_writes_nothing(store: EventStore) -> None:
    call, run = await streams(store, 2, 0)
    rider = Rider(run, 0)
    with pytest.raises(WrongExpectedVersion):
        await append_joint(store, own(call, 1), META, rider, "answer")
    assert rider.told == [False]
    assert len(await store.read_stream(call)) == 2 and await store.read_stream(run) == []


async def test_a_rider_alone_and_no_rider(store: EventStore) -> None:
    call, run = await streams(store, 1, 0)
    rider = Rider(run, 0)
    await append_joint(store, [], META, rider, "alone")
    assert rider.told == [True] and len(await store.read_stream(run)) == 1
    await append_joint(store, own(call, 1), META, None, None)
    assert len(await store.read_stream(call)) == 2
