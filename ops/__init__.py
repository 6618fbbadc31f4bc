"""Operator tools: the `nexus` CLI and the `nexus up` supervisor. The top layer: may
import everything below, nothing imports it."""
