"""Nexus services. Each one is a thin wiring of NATS/HTTP handlers onto `shared`."""
