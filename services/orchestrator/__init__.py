"""The orchestrator: the HTTP API, session management and the projections."""
