"""Bearer-key authentication for every API route except health and the schema."""

from __future__ import annotations

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from services.orchestrator.keys import KeyService, Caller

PUBLIC_PATHS = ("/health", "/schema", "/metrics")
TENANT_HEADER = "x-nexus-tenant"  # the platform-admin key acts for this tenant
# A browser cannot set headers on a WebSocket: it offers the key as a subprotocol,
# `new WebSocket(url, ["nexus.v1", "bearer." + key])`; the server answers "nexus.v1" (never
# the key). Not a `?token=` query: URLs end up in access logs and trace attributes.
WS_BEARER_PREFIX = "bearer."


def bearer_key(connection: ASGIConnection) -> str:
    """The key of `Authorization: Bearer <key>`, or of a WebSocket's `bearer.<key>`
    subprotocol; "" when neither is there."""
    scheme, _, key = connection.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    if connection.scope["type"] == "websocket":
        for offered in connection.headers.get("sec-websocket-protocol", "").split(","):
            if offered.strip().startswith(WS_BEARER_PREFIX):
                return offered.strip()[len(WS_BEARER_PREFIX):]
    return ""


class BearerKeyMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        key = bearer_key(connection)
        if not key:
            raise NotAuthorizedException("missing API key: send 'Authorization: Bearer <key>'")
        keys: KeyService = connection.app.state.key_service
        caller = await keys.authenticate(key, connection.headers.get(TENANT_HEADER))
        if caller is None:
            raise NotAuthorizedException("invalid or revoked API key")
        return AuthenticationResult(user=caller, auth=None)


def require_admin(caller: Caller) -> None:
    if not caller.is_admin:
        raise PermissionDeniedException("this needs an admin key of the tenant")


def require_platform(caller: Caller) -> None:
    if caller.role != "platform":
        raise PermissionDeniedException("this needs the platform admin key")
