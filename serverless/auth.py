"""API keys (`API_KEYS`, `API_KEYS_FILE`): who may call the API, what it may do, and whose a task is.

`RequireApiKey` finds the caller of every guarded request (`tenants.keys.ApiKeys`, keys kept as
SHA-256 digests, compared in constant time) and puts its `Caller` in the request's scope; every
route reads it through `caller()`. A caller has an owner id (a digest of its key, never the key),
a label and its rights (`tenants.keyfile.Rights`), checked here only: `Caller.check_run` for every
run (a raw workflow needs `raw=yes`, a hosted one its id in `workflows=`), `require_admin` for the
admin routes, and ComfyUI's own API refused to a key without `raw=yes` (`raw_path`). A task
remembers its caller's `owner`: a caller with another key cannot read, follow or cancel it.
Health, readiness and the lifecycle hooks stay open, and so does the API's OpenAPI document (it is
not a secret: /docs must load before a key is entered); everything else under `/api/` (and
`/metrics`, unless METRICS_TOKEN guards it) needs `Authorization: Bearer <key>`. Without keys the
API is open, as before.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from .tenants.keys import ApiKeys

from .errors import OutOfScope, Unauthorized
from .tenants.keyfile import EVERY_RIGHT, Rights

log = logging.getLogger(__name__)

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


@dataclass(frozen=True, slots=True)
class Caller:
    """Who calls: the owner id of its key (None when keys are off), the key's label (for usage,
    metrics and logs; never the key) and its rights (`tenants.keyfile.Rights`)."""

    owner: str | None
    label: str = ""
    rights: Rights = EVERY_RIGHT

    def check_run(self, workflow_id: str | None) -> None:
        """Forbidden (403 FORBIDDEN) when the key may not run this: a raw workflow (None) needs
        `raw=yes`, a hosted one must be in its `workflows=`. One place for every route."""
        if workflow_id is None:
            if not self.rights.raw:
                raise OutOfScope(
                    f"API key {self.label!r} may not run workflows of its own (raw=no): "
                    "run a hosted workflow it is allowed (POST /api/workflows/{id}/run)",
                    raw={"key": self.label, "needs": "raw=yes"},
                )
            return
        workflow_id = workflow_id.partition("@")[0]  # any version or alias of a workflow it may run
        if not self.rights.may_run(workflow_id):
            raise OutOfScope(
                f"API key {self.label!r} may not run hosted workflow {workflow_id[:128]!r} (not in its workflows=)",
                raw={"key": self.label, "workflow_id": workflow_id[:128], "needs": f"workflows={workflow_id[:128]}"},
            )

    def require_raw(self, what: str) -> None:
        if not self.rights.raw:
            raise OutOfScope(
                f"API key {self.label!r} may not use {what}: it runs workflows of its own (needs raw=yes)",
                raw={"key": self.label, "needs": "raw=yes"},
            )


ANYONE = Caller(None)  # keys are off: everyone has every right
NOBODY = Caller("", "", Rights(frozenset(), raw=False, admin=False))  # an open path without a valid key


def require_admin(caller: Caller, what: str = "this") -> None:
    """Forbidden (403 FORBIDDEN) unless the key has `admin=yes` (or keys are off). Admin routes:
    workflow registration and deletion, dead letters, other keys' usage (and models, batches of
    others when they come)."""
    if not caller.rights.admin:
        raise OutOfScope(
            f"API key {caller.label!r} may not {what}: it needs admin=yes",
            raw={"key": caller.label, "needs": "admin=yes"},
        )


_current: ContextVar[Caller | None] = ContextVar("serverless_caller", default=None)


def caller(connection: HTTPConnection | Scope | None = None) -> Caller:
    """The caller of a request or websocket (or of its ASGI scope): what `RequireApiKey` found.
    Without an argument, the caller of the request being served (a context variable the
    middleware sets; anyone when no request is being served and keys are off)."""
    if connection is None:
        found = _current.get()
        return found if found is not None else ANYONE
    scope = connection.scope if isinstance(connection, HTTPConnection) else connection
    state = scope.get("state") or {}
    found = state.get("caller")
    if isinstance(found, Caller):
        return found
    owner = state.get("owner")
    return ANYONE if owner is None else Caller(owner, NOBODY.label, NOBODY.rights)


def may_see(owner: str | None, task_owner: str | None) -> bool:
    """Whether a caller (`owner`, None when keys are off) may see a task made by `task_owner`
    (None: made without keys; "": not known yet, so nobody with a key sees it yet)."""
    return owner is None or task_owner is None or hmac.compare_digest(owner, task_owner)


def operator_scope(who: Caller) -> str | None:
    """Whose tasks an operator's call (the fleet's dead letters) may see and queue again: None
    for everyone's (keys off, or an `admin=yes` key: a key of API_KEYS has every right), else
    the caller's own."""
    return None if who.rights.admin else who.owner


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


# ComfyUI's own API where it runs or reads workflows (its prompts, files, editor, events; and
# Comfy API v2): a key without raw=yes is refused there, as it may not send its own workflows.
RAW_PATHS = ("/prompt", "/queue", "/interrupt", "/history", "/view", "/upload/", "/ws", "/comfyui/")
RAW_PREFIXES = (*RAW_PATHS, *(f"/api{path}" for path in RAW_PATHS), "/api/v2/")


def raw_path(path: str) -> bool:
    return any(path == p.rstrip("/") or path.startswith(p if p.endswith("/") else f"{p}/") for p in RAW_PREFIXES)


class RequireApiKey:
    """ASGI middleware: refuses guarded paths without a valid key (401, in the error shape of the
    API called), and ComfyUI's own API to a key without raw=yes (403); puts the `Caller` in
    `scope["state"]["caller"]` (its owner id in `["owner"]`) and in a context variable for the
    request (`caller()`). `own_token` paths are guarded by a token of their own instead (`/metrics`
    with METRICS_TOKEN: one Authorization header cannot carry both)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, own_token: tuple[str, ...] = ()) -> None:
        self.app = app
        self.keys = keys
        self.own_token = frozenset(own_token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if self.keys.enabled and path in OPEN_PATHS:
            # Open to all, but a valid key is still told apart (the OpenAPI document lists its
            # caller's own hosted workflows): "" is nobody's, who sees only what is shared.
            self._put(scope, self._optional_caller(scope))
        if scope["type"] not in ("http", "websocket") or not self._guarded(path):
            await self.app(scope, receive, send)
            return
        given = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        try:
            authorization = sole_authorization(given) or None
            if authorization is None and scope["type"] == "websocket":
                authorization = _query_token(scope)  # a browser's websocket cannot send headers
            found = self.keys.identify(authorization)
            if raw_path(path):
                found.require_raw("ComfyUI's own API")
        except Unauthorized as exc:
            await _refuse(scope, receive, send, exc, path)
            return
        self._put(scope, found)
        token = _current.set(found)
        try:
            await self.app(scope, receive, send)
        finally:
            _current.reset(token)

    @staticmethod
    def _put(scope: Scope, found: Caller) -> None:
        state = scope.setdefault("state", {})
        state["caller"], state["owner"] = found, found.owner

    def _optional_caller(self, scope: Scope) -> Caller:
        given = [v.decode("latin-1") for k, v in scope.get("headers", []) if k.lower() == b"authorization"]
        try:
            return self.keys.identify(sole_authorization(given) or None)
        except Unauthorized:
            return NOBODY

    def _guarded(self, path: str) -> bool:
        if not self.keys.enabled or path in OPEN_PATHS or path in self.own_token or path.startswith(TOKEN_PATHS):
            return False
        return path.startswith(GUARDED_PREFIXES)


def _query_token(scope: Scope) -> str | None:
    """`?token=<key>` of a websocket's URL, as a Bearer authorization."""
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    token = query.get("token")
    return f"Bearer {token[0]}" if token else None


async def _refuse(scope: Scope, receive: Receive, send: Send, exc: Unauthorized, path: str) -> None:
    if scope["type"] == "websocket":
        if exc.status_code == 403:  # a valid key out of its scope: accepted, so that it reads why
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            await send({"type": "websocket.close", "code": 1008, "reason": exc.message[:120]})
            return
        await send({"type": "websocket.close", "code": 1008, "reason": "a valid API key is required"})
        return
    if path.startswith(GENSTUDIO_PREFIX):
        body = {"code": exc.status_code, "msg": exc.message, "data": None}
    else:
        body = exc.to_payload()
    data = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(data)).encode()),
    ]
    if exc.status_code == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": exc.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": data})
