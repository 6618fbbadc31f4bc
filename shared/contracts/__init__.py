"""Contracts: what crosses a process boundary or is stored (events, messages, stream
frames, subjects, errors). Plain msgspec types; imports no other layer."""
