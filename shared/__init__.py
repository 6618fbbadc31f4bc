"""Nexus common core: settings, events, subjects, messaging, the event store and tracing."""

__version__ = "0.1.0"
