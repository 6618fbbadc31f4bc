"""Dashboard login: an API key exchanged for a session cookie, and CSRF tokens.

The cookie is a signed token (HMAC-SHA256 under a secret derived from the platform's
admin key, so every orchestrator of the deployment verifies it) naming the key's id,
tenant, role, expiry and a random nonce; the key itself never enters it. Each request
re-checks the key id against the `api_keys` read model (`KeyService.still_active`), so
revoking the key ends the session within the key cache's 5 s. The cookie is HttpOnly,
SameSite=Strict and Secure when the request came over https.

Every action (POST/DELETE) must carry the session's CSRF token (form field `csrf` or
header `X-CSRF-Token`): an HMAC of the session's nonce, checked server-side.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time

import msgspec
from litestar import Request

from services.orchestrator.keys import Caller, KeyService

COOKIE = "nexus_ui"
CSRF_FIELD = "csrf"
CSRF_HEADER = "x-csrf-token"


class UiSession(msgspec.Struct, frozen=True):
    k: str    # key id ("admin": the bootstrap platform key)
    t: str    # tenant
    r: str    # role
    e: float  # expires at (epoch s)
    n: str    # nonce (the CSRF token is derived from it)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class UiAuth:
    def __init__(self, keys: KeyService, admin_key: str | None, ttl_s: float) -> None:
        self.keys = keys
        self.ttl_s = ttl_s
        seed = admin_key.encode() if admin_key else secrets.token_bytes(32)
        self._secret = hashlib.sha256(b"nexus-ui-session\x00" + seed).digest()

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._secret, payload.encode(), hashlib.sha256).digest())

    async def login(self, key: str) -> str | None:
        """The cookie value for a valid key, or None (a wrong or revoked key)."""
        caller = await self.keys.authenticate(key.strip())
        if caller is None:
            return None
        session = UiSession(k=caller.key_id, t=caller.tenant, r=caller.role,
                            e=time.time() + self.ttl_s, n=secrets.token_urlsafe(16))
        payload = _b64(msgspec.json.encode(session))
        return f"{payload}.{self._sign(payload)}"

    def session(self, cookie: str | None) -> UiSession | None:
        """The session a cookie carries when its signature holds and it has not expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        payload, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            session = msgspec.json.decode(_unb64(payload), type=UiSession)
        except (msgspec.DecodeError, ValueError):
            return None
        return session if session.e > time.time() else None

    async def viewer(self, cookie: str | None) -> tuple[Caller, UiSession] | None:
        """Who the cookie logs in, while its key is still active."""
        session = self.session(cookie)
        if session is None:
            return None
        caller = await self.keys.still_active(session.k)
        if caller is None or caller.role != session.r:
            return None
        if caller.role != "platform" and caller.tenant != session.t:
            return None
        return Caller(tenant=session.t, key_id=session.k, role=session.r), session

    def csrf(self, session: UiSession) -> str:
        return self._sign(f"csrf\x00{session.n}")

    def csrf_ok(self, session: UiSession, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(token, self.csrf(session))


def is_https(request: Request) -> bool:
    forwarded = request.headers.get("x-forwarded-proto", "")
    return request.url.scheme == "https" or forwarded.split(",")[0].strip() == "https"
