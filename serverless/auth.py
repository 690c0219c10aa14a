"""API keys (`API_KEYS`, `API_KEYS_FILE`): who may call the API, and whose a task is.

Keys are kept only as SHA-256 digests and compared in constant time (every stored digest is
compared, whichever matches). A task remembers its caller's `owner`: a digest of the key, never
the key; a caller with another key cannot read, follow or cancel it. Health, readiness and the
lifecycle hooks stay open, and so does the API's OpenAPI document (it is not a secret: /docs must
load before a key is entered); everything else under `/api/` (and `/metrics`, unless METRICS_TOKEN
guards it) needs `Authorization: Bearer <key>`. Without keys the API is open, as before.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import Unauthorized

OPEN_PATHS = frozenset({"/api/serverless/health", "/api/serverless/ready", "/api/openapi.json"})
# ComfyUI's own API on its own paths (`serverless.comfyapi`), guarded as ours under /api/ are.
COMFYUI_PREFIXES = (
    "/prompt",
    "/queue",
    "/interrupt",
    "/history",
    "/view",
    "/upload/",
    "/object_info",
    "/system_stats",
    "/embeddings",
    "/models",
    "/ws",
    "/comfyui/api/",  # the editor's calls (its pages stay open: they hold no data)
    "/comfyui/ws",
    "/comfyui/internal/",
)
GUARDED_PREFIXES = ("/api/", "/metrics", *COMFYUI_PREFIXES)
# Authorised by their own signed tokens, not by a key: GenStudio's progress websocket (its
# prompt_token) and download links (whose clients, browsers and GenStudio's, send no key).
TOKEN_PATHS = ("/api/maas/comfy_task_ws_api/", "/api/files/")
GENSTUDIO_PREFIX = "/api/maas/"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The keys this instance accepts (none: the API is open)."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = tuple(bytes.fromhex(digest(key)) for key in keys if key)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def owner(self, authorization: str | None) -> str | None:
        """The owner id of the key in an `Authorization: Bearer <key>` header; None when keys are
        off. Unauthorized for a missing or unknown key."""
        if not self.enabled:
            return None
        scheme, _, key = (authorization or "").partition(" ")
        presented = hashlib.sha256(key.strip().encode()).digest()
        matched = False
        for known in self._digests:  # no early exit: the time does not tell which key matched
            matched |= hmac.compare_digest(presented, known)
        if scheme.lower() != "bearer" or not key.strip() or not matched:
            raise Unauthorized("a valid API key is required: Authorization: Bearer <key>")
        return presented.hex()[:32]


def may_see(owner: str | None, task_owner: str | None) -> bool:
    """Whether a caller (`owner`, None when keys are off) may see a task made by `task_owner`
    (None: made without keys; "": not known yet, so nobody with a key sees it yet)."""
    return owner is None or task_owner is None or hmac.compare_digest(owner, task_owner)


def operator_scope(owner: str | None) -> str | None:
    """Whose tasks an operator's call (the fleet's dead letters) may see and queue again: None
    for everyone's (API keys off), else the caller's own. The one place an admin-scoped key
    will widen to everyone's."""
    return owner


def sole_authorization(values: list[str]) -> str:
    """The one `Authorization` header's value ("" when none); Unauthorized for two or more: which
    one a proxy, the app or a log reads would be anyone's guess."""
    if len(values) > 1:
        raise Unauthorized("send one Authorization header, not several")
    return values[0] if values else ""


def scoped_key(idempotency_key: str, owner: str | None) -> str:
    """An `Idempotency-Key` as stored: in the caller's own namespace (another key's use of the same
    key never touches this caller's), still a valid task-id-shaped name."""
    if owner is None:
        return idempotency_key
    return f"{owner}-{hashlib.sha256(idempotency_key.encode()).hexdigest()}"


class RequireApiKey:
    """ASGI middleware: refuses guarded paths without a valid key (401, in the error shape of the
    API called) and puts the caller's owner id in `scope["state"]["owner"]`. `own_token` paths are
    guarded by a token of their own instead (`/metrics` with METRICS_TOKEN: one Authorization
    header cannot carry both)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, own_token: tuple[str, ...] = ()) -> None:
        self.app = app
        self.keys = keys
        self.own_token = frozenset(own_token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if self.keys.enabled and path in OPEN_PATHS:
            # Open to all, but a valid key is still told apart (the OpenAPI document lists its
            # caller's own hosted workflows): "" is nobody's, who sees only what is shared.
            scope.setdefault("state", {})["owner"] = self._optional_owner(scope)
        if scope["type"] not in ("http", "websocket") or not self._guarded(path):
            await self.app(scope, receive, send)
            return
        given = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        try:
            authorization = sole_authorization(given) or None
            if authorization is None and scope["type"] == "websocket":
                authorization = _query_token(scope)  # a browser's websocket cannot send headers
            owner = self.keys.owner(authorization)
        except Unauthorized as exc:
            await _refuse(scope, send, exc, path)
            return
        scope.setdefault("state", {})["owner"] = owner
        await self.app(scope, receive, send)

    def _optional_owner(self, scope: Scope) -> str:
        given = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        try:
            return self.keys.owner(sole_authorization(given) or None) or ""
        except Unauthorized:
            return ""

    def _guarded(self, path: str) -> bool:
        if not self.keys.enabled or path in OPEN_PATHS or path in self.own_token or path.startswith(TOKEN_PATHS):
            return False
        return path.startswith(GUARDED_PREFIXES)


def _query_token(scope: Scope) -> str | None:
    """`?token=<key>` of a websocket's URL, as a Bearer authorization."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    token = query.get("token")
    return f"Bearer {token[0]}" if token else None


async def _refuse(scope: Scope, send: Send, exc: Unauthorized, path: str) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008, "reason": "a valid API key is required"})
        return
    if path.startswith(GENSTUDIO_PREFIX):
        body = {"code": 401, "msg": exc.message, "data": None}
    else:
        body = exc.to_payload()
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
        (b"www-authenticate", b"Bearer"),
    ]
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": data})
