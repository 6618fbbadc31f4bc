"""Bearer-key authentication for every API route except health and the schema."""

from __future__ import annotations

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from services.orchestrator.keys import KeyService, Caller

PUBLIC_PATHS = ("/health", "/schema", "/metrics")
TENANT_HEADER = "x-nexus-tenant"  # the platform-admin key acts for this tenant


class BearerKeyMiddleware(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        header = connection.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise NotAuthorizedException("missing API key: send 'Authorization: Bearer <key>'")
        keys: KeyService = connection.app.state.key_service
        caller = await keys.authenticate(key.strip(), connection.headers.get(TENANT_HEADER))
        if caller is None:
            raise NotAuthorizedException("invalid or revoked API key")
        return AuthenticationResult(user=caller, auth=None)


def require_admin(caller: Caller) -> None:
    if not caller.is_admin:
        raise PermissionDeniedException("this needs an admin key of the tenant")


def require_platform(caller: Caller) -> None:
    if caller.role != "platform":
        raise PermissionDeniedException("this needs the platform admin key")
