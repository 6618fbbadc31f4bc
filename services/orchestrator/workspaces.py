"""The workspace janitor: a closed session's workspace is deleted from the object store.

Every orchestrator runs one (`WorkspaceJanitor.run`). Each round it reads the
`workspaces` read model's closed sessions whose workspace is not yet deleted (only
sessions that requested a tool call are there: no other can have files), deletes each
workspace (`shared.infra.workspace.WorkspaceStore.purge`: the manifest's blobs, then the
manifest) and records `WorkspaceDeleted` on `workspace-<session_id>` (expected version
0: of two orchestrators purging at once, one records it; the other's delete found
nothing left). A session with a tool call still running is left for a later round, so
a call that commits its files after the close cannot bring them back (at most
`MAX_CALL_WAIT_S`: a call's `timeout_s` is at most an hour). A purge that fails (NATS
unavailable) is retried next round; a crash between the delete and the event only
deletes again. Closing a session therefore frees its files within a round or two
(`POLL_S`), and a closed session's tools cannot be invoked (`ToolService.invoke`:
`SessionClosed`).
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta

from nats.js.client import JetStreamContext

from shared.contracts.events import Metadata, WorkspaceDeleted, workspace_stream
from shared.infra.eventstore import EventStore, WrongExpectedVersion
from shared.infra.workspace import WorkspaceError, WorkspaceStore
from services.orchestrator.read_models.tools import ToolsReadModel
from services.orchestrator.read_models.workspaces import WorkspacesReadModel

log = logging.getLogger("nexus.orchestrator.workspaces")

POLL_S = 1.0
MAX_CALL_WAIT_S = 3600.0 + 60.0  # longest tool call (timeout_s <= 3600) and its grace
ACTOR = "system:workspace-janitor"


class WorkspaceJanitor:
    def __init__(self, store: EventStore, js: JetStreamContext, *, poll_s: float = POLL_S) -> None:
        self.store = store
        self.workspaces = WorkspaceStore(js, quota_bytes=0, timeout_s=30.0)
        self.pending = WorkspacesReadModel(store)
        self.calls = ToolsReadModel(store)
        self.poll_s = poll_s

    async def run(self) -> None:
        while True:
            try:
                await self.sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # the next round tries again
                log.exception("workspace janitor round failed")
            await asyncio.sleep(self.poll_s)

    async def sweep(self) -> int:
        """One round; how many workspaces it deleted."""
        done = 0
        now = datetime.now(UTC)
        for tenant, session_id, closed_at in await self.pending.pending():
            if (now - closed_at < timedelta(seconds=MAX_CALL_WAIT_S)
                    and await self.calls.active_calls(tenant, session_id)):
                continue  # a call of the session still runs: its commit must not outlive us
            try:
                objects, size = await self.workspaces.purge(tenant, session_id)
            except WorkspaceError as exc:
                log.warning("workspace not deleted yet: %s", exc.detail,
                            extra={"tenant": tenant, "session_id": session_id})
                continue
            try:
                await self.store.append(
                    workspace_stream(session_id),
                    [WorkspaceDeleted(tenant=tenant, session_id=session_id, objects=objects,
                                      bytes=size)],
                    expected_version=0,
                    metadata=Metadata(tenant=tenant, actor=ACTOR, correlation_id=session_id))
            except WrongExpectedVersion:
                continue  # another orchestrator recorded it
            done += 1
            log.info("workspace deleted", extra={"tenant": tenant, "session_id": session_id,
                                                 "objects": objects, "bytes": size})
        return done
