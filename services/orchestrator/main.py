"""`nexus orchestrator`: the HTTP API under uvicorn (SIGTERM drains and stops)."""

from __future__ import annotations

import signal
import sys

import uvicorn

from shared.infra.asgi_telemetry import HttpTelemetry
from shared.infra.http_protocol import OneSendHttpProtocol
from shared.infra.service import run_service, setup_process
from shared.infra.settings import get_settings
from services.orchestrator.app import create_app


def _exit_cleanly(signum: int, frame: object) -> None:
    sys.exit(0)


def main() -> None:
    settings = get_settings()
    setup_process("orchestrator", settings)
    # uvicorn drains on SIGTERM, then re-raises the signal to the handler that was
    # installed before it: make that a clean exit, so a graceful stop exits 0.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    # the request's SERVER span and duration around the whole app (asgi_telemetry.py)
    app = HttpTelemetry(create_app(settings), exclude=("/health", "/metrics"))
    config = uvicorn.Config(
        app, host=settings.http_host, port=settings.http_port,
        http=OneSendHttpProtocol,  # a response's head leaves with its body (http_protocol.py)
        # nothing reads the client's address or builds a URL from the scheme: uvicorn's
        # X-Forwarded-* middleware would rewrite them on every request for no reader
        proxy_headers=False,
        log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=10,
        ws_max_size=settings.max_body_bytes,  # a WebSocket frame is bounded like a body
    )
    run_service(uvicorn.Server(config).serve())  # uvloop, and leftover tasks stopped (bounded)


if __name__ == "__main__":
    main()
