"""`nexus orchestrator`: the HTTP API under uvicorn (SIGTERM drains and stops)."""

from __future__ import annotations

import uvicorn

from shared.logs import setup_logging
from shared.settings import get_settings
from shared.tracing import setup_tracing
from services.orchestrator.app import create_app


def main() -> None:
    settings = get_settings()
    setup_logging("nexus-orchestrator", settings.log_level)
    setup_tracing("nexus-orchestrator", settings.instance_id)
    config = uvicorn.Config(
        create_app(settings), host=settings.http_host, port=settings.http_port,
        log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=10,
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
