"""`nexus node`: starts, answers pings on NATS, stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio

from shared.service import ServiceRuntime, serve
from shared.settings import get_settings


def main() -> None:
    runtime = ServiceRuntime("node", get_settings())
    runtime.setup_process()
    asyncio.run(serve(runtime))


if __name__ == "__main__":
    main()
