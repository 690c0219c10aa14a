"""Loader inputs: URLs, `oss://` and `s3://` objects and base64 in a workflow become files in ComfyUI's input
folder (CONTRACT.md section 1, "Loader inputs").

Pure part: which inputs are loader inputs (`find_loader_inputs`) and what each value is
(`classify`). I/O part: `resolve_inputs` fetches every distinct value concurrently, checks what
came back, and only when all succeeded uploads the bytes under `<sha256>.<ext>`, returning a new
workflow with each value replaced by the uploaded name.

Bounds (`InputLimits`): at most `fetch_concurrency` fetches and `upload_concurrency` uploads of a
request at once (each upload is a connection to ComfyUI; 200 inputs must not mean 200 sockets),
at most `max_job_bytes` fetched per request, and every fetched byte reserved from the instance's
shared `ByteBudget` until the request's uploads are done.

Content check: the extension comes from the bytes (`serverless.media.sniff`), never from the URL,
and whatever was sniffed is checked to be whole (`verify.verify_media`: truncation, broken
containers, images over `max_pixels` read from their header). An image loader given something
that is not an image (an HTML error page, a WAV) is refused with INPUT_ERROR rather than uploaded
for ComfyUI to fail on later; likewise audio and video loaders (see `EXPECTED_MEDIA`). Loaders
added by configuration accept any bytes:
unrecognised content keeps a safe extension from the URL, `oss://` key or data URI, else `.bin`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal, NamedTuple, TypeVar

from ..core.media import ext_for_mime, sniff
from ..core.workflow import copy_json
from ..errors import ComfyUIUnavailable, InputError, InvalidParams, ServerlessError
from .budget import ByteBudget, Lease
from .download import decode_base64
from .verify import decodes_pixels, verify_media

log = logging.getLogger(__name__)

InputKind = Literal["file", "url", "oss", "s3", "base64"]

LOADER_INPUTS: frozenset[tuple[str, str]] = frozenset(
    {
        ("LoadImage", "image"),
        ("LoadImageMask", "image"),
        ("LoadAudio", "audio"),
        ("VHS_LoadVideo", "video"),
        ("LoadVideo", "file"),
    }
)


@dataclass(frozen=True, slots=True)
class Accepts:
    """What a loader reads: `label` for messages, `types` as MIME top-level or exact types."""

    label: str
    types: frozenset[str]

    def __contains__(self, mime: str) -> bool:
        return mime in self.types or mime.split("/", 1)[0] in self.types


BIG_WORKFLOW_NODES = 1000
# Where the built-in loaders' inputs go in ComfyUI's input folder. ComfyUI lists the folder's top
# level (every file, its type guessed) each time it validates or runs a LoadImage: inputs piling up
# there make every later prompt slower. Its built-in loaders check a name by its path
# (VALIDATE_INPUTS), so `serverless/<hash>.png` loads as any uploaded file does; a loader added by
# configuration may only accept names it lists, so its inputs stay at the top level.
INPUT_SUBFOLDER = "serverless"
_IMAGE = Accepts("an image", frozenset({"image"}))
_VIDEO = Accepts("a video", frozenset({"video", "image/gif", "image/webp"}))  # animations load too
# Loaders not listed here (added by configuration) accept any content.
EXPECTED_MEDIA: Mapping[str, Accepts] = {
    "LoadImage": _IMAGE,
    "LoadImageMask": _IMAGE,
    "LoadAudio": Accepts("audio", frozenset({"audio", "video"})),  # a video's sound track loads
    "VHS_LoadVideo": _VIDEO,
    "LoadVideo": _VIDEO,
}

BASE64_MIN_LENGTH = 64  # base64 is told from a file name by being longer than this
CLASSIFY_PREFIX = 16 * 1024  # past this length (4 times PATH_MAX) a value is base64 or nothing usable
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/=_\-\s]+")
_BASE64_BYTES = bytes(c for c in range(128) if _BASE64_TEXT.fullmatch(chr(c)))
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_WINDOWS_DRIVE = re.compile(r"[A-Za-z]:[\\/]")
_SAFE_EXT = re.compile(r"[a-z0-9]{1,8}")
_HASH_CHARS = 32

T = TypeVar("T")
MiB = 1024 * 1024
# Inputs up to this size (base64 text, or bytes) are decoded, hashed and checked in the event loop
# when no pixel is decoded for it: tens of microseconds, less than a trip to a worker thread costs.
INLINE_BYTES = 48 * 1024
_UNBOUNDED = 1 << 62


@dataclass(frozen=True, slots=True)
class InputLimits:
    """How much one request's loader inputs may take.

    `max_fetch_bytes` is what a URL or `oss://` fetch may read (its reservation in the budget),
    `max_base64_bytes` what a base64 value may decode to; `max_job_bytes` bounds their sum;
    `max_pixels` an image's size read from its header; `budget_timeout` how long a fetch waits
    for the instance's byte budget."""

    max_fetch_bytes: int = 50 * MiB
    max_base64_bytes: int = 50 * MiB
    max_job_bytes: int = 200 * MiB
    max_pixels: int = 100_000_000
    fetch_concurrency: int = 8
    upload_concurrency: int = 4
    budget_timeout: float = 60.0


class LoaderInput(NamedTuple):
    """One loader input of a workflow whose value is a string."""

    node_id: str
    input_name: str
    value: str


class _Fetched(NamedTuple):
    data: bytes
    digest: str
    sniffed: tuple[str, str] | None
    staged: str | None = None  # written where ComfyUI reads it already: the name to use


# A blocking write of an input where ComfyUI reads it (its bytes, its file name): the name to use
# in the workflow, or None when it could not be written (then `upload` sends it).
WriteHere = Callable[[bytes, str], str | None]


def find_loader_inputs(
    workflow: Mapping[str, Any], loaders: Collection[tuple[str, str]] = LOADER_INPUTS
) -> list[LoaderInput]:
    """The string-valued loader inputs of an API-format workflow, in workflow order.
    Inputs linked to another node (`["5", 0]`) and malformed nodes are skipped."""
    wanted = frozenset(loaders)
    found = []
    for node_id, node in workflow.items():
        if not isinstance(node, Mapping) or not isinstance(node.get("inputs"), Mapping):
            continue
        class_type = node.get("class_type")
        for name, value in node["inputs"].items():
            if (class_type, name) in wanted and isinstance(value, str):
                found.append(LoaderInput(node_id, name, value))
    return found


def classify(value: str) -> InputKind:
    """What a loader input value is. Raises `InvalidParams` for an absolute path or one with a
    `..` component, `InputError` for a URL scheme other than http, https and oss."""
    lowered = value[:8].lower()
    if lowered.startswith(("http://", "https://")):
        return "url"
    if lowered.startswith("oss://"):
        return "oss"
    if lowered.startswith("s3://"):
        return "s3"
    if lowered.startswith("data:"):
        return "base64"
    scheme = _URL_SCHEME.match(value)
    if scheme is not None:
        raise InputError(f"unsupported URL scheme {scheme[1]!r} (use http, https, oss or s3)")
    # A value longer than any path is no file name: its first CLASSIFY_PREFIX characters tell it
    # is base64, and the strict decoder checks the rest (in a worker thread, not the event loop).
    if len(value) > BASE64_MIN_LENGTH and _is_base64_text(value[:CLASSIFY_PREFIX]):
        return "base64"
    _check_file_name(value)
    return "file"


def _is_base64_text(value: str) -> bool:
    """`_BASE64_TEXT.fullmatch(value)`, for ASCII text in one C pass (bytes.translate deletes
    every allowed byte; nothing may be left) rather than a regex step per character: an image's
    megabytes of base64 are classified in the event loop."""
    if not value.isascii():
        return _BASE64_TEXT.fullmatch(value) is not None
    return not value.encode("ascii").translate(None, _BASE64_BYTES)


def _check_file_name(value: str) -> None:
    if "\x00" in value:
        raise InvalidParams("file name contains a NUL character")
    if value.startswith(("/", "\\")) or _WINDOWS_DRIVE.match(value):
        raise InvalidParams("absolute paths are not allowed; give a name in ComfyUI's input folder")
    if ".." in re.split(r"[\\/]", value):
        raise InvalidParams("'..' is not allowed in a file name")


def expected_media(class_type: str) -> Accepts | None:
    """What a loader class reads; None for anything."""
    return EXPECTED_MEDIA.get(class_type)


async def resolve_inputs(
    workflow: Mapping[str, Any],
    *,
    loaders: Collection[tuple[str, str]] = LOADER_INPUTS,
    fetch_url: Callable[[str], Awaitable[bytes]],
    read_oss: Callable[[str], Awaitable[bytes]] | None,
    upload: Callable[[bytes, str], Awaitable[str]],
    limits: InputLimits,
    budget: ByteBudget | None = None,
    read_s3: Callable[[str], Awaitable[bytes]] | None = None,
    write_here: WriteHere | None = None,
) -> dict[str, Any]:
    """A new workflow whose URL, `oss://` and base64 loader inputs name uploaded files.

    Every distinct value is fetched once, concurrently within `limits`; nothing is uploaded unless
    all fetches and checks succeeded. Failures raise `InputError` (or `InvalidParams` for unsafe
    file names) naming node and input; `ComfyUIUnavailable` from `upload` passes through
    unchanged. Bytes reserved from `budget` are given back when this returns or raises.

    `write_here` (ComfyUI's input folder on our disk): a request's one distinct value, when it
    is base64 decoded in a worker thread, is checked as every use of it needs and written there
    in that same trip (its checks are then all the request's), not uploaded after."""
    remote: list[tuple[LoaderInput, InputKind]] = []
    for item in find_loader_inputs(workflow, loaders):
        kind = _classify_item(workflow, item)
        if kind != "file":
            remote.append((item, kind))
    if len(workflow) >= BIG_WORKFLOW_NODES:  # a big workflow is copied off the event loop
        result: dict[str, Any] = await asyncio.to_thread(copy_json, dict(workflow))
    else:
        result = copy_json(dict(workflow))
    if not remote:
        return result

    firsts, which = _distinct(remote)
    uses = [item for item, _ in remote]
    stage = partial(_staged, workflow, uses, write_here, limits.max_job_bytes) if write_here is not None else None
    fetch = _Fetcher(workflow, fetch_url, {"oss": read_oss, "s3": read_s3}, limits, budget)
    fetch.stage = stage if len(firsts) == 1 else None
    try:
        done = await _run_all({str(index): partial(fetch, item, kind) for index, (item, kind) in enumerate(firsts)})
        fetched = [done[str(index)] for index in range(len(firsts))]
        file_names = [_file_name(workflow, item, kind, got) for (item, kind), got in zip(firsts, fetched, strict=True)]
        for item, index in zip(uses, which, strict=True):  # every use, not only the first, must get content it can read
            _check_media(workflow, item, fetched[index])

        to_upload: dict[str, tuple[LoaderInput, bytes]] = {}
        uploaded: dict[str, str] = {}
        for (item, _), name, got in zip(firsts, file_names, fetched, strict=True):
            if got.staged is not None:
                uploaded[name] = got.staged
            else:
                to_upload.setdefault(name, (item, got.data))
        if to_upload:
            slots = asyncio.Semaphore(limits.upload_concurrency)
            uploaded |= await _run_all(
                {
                    name: _upload_job(workflow, item, data, name, upload, slots)
                    for name, (item, data) in to_upload.items()
                }
            )
    finally:
        fetch.release()

    for item, index in zip(uses, which, strict=True):
        result[item.node_id]["inputs"][item.input_name] = uploaded[file_names[index]]
    log.debug("resolved %d loader input(s), %d upload(s)", len(remote), len(to_upload))
    return result


def _distinct(
    remote: list[tuple[LoaderInput, InputKind]],
) -> tuple[list[tuple[LoaderInput, InputKind]], list[int]]:
    """The distinct values (the first use of each) and, for every use, which of them it holds. A
    lone input's value is not hashed (a str's hash reads all of it: ~0.3 ms of the event loop for
    a megabyte image's base64)."""
    if len(remote) == 1:
        return remote, [0]
    index_of: dict[str, int] = {}
    firsts: list[tuple[LoaderInput, InputKind]] = []
    for item, kind in remote:
        if index_of.setdefault(item.value, len(firsts)) == len(firsts):
            firsts.append((item, kind))
    return firsts, [index_of[item.value] for item, _ in remote]


def _classify_item(workflow: Mapping[str, Any], item: LoaderInput) -> InputKind:
    try:
        return classify(item.value)
    except ServerlessError as exc:
        raise type(exc)(_where(workflow, item, exc.message), _raw(workflow, item, exc.message)) from exc


class _Fetcher:
    """Fetches one request's inputs: bounded concurrency, the request's byte total, the
    instance's byte budget (leases held until `release`), and the content check.

    The request's total bounds what it holds, not only what it ends with: a fetch starts only
    when its reservation fits within INPUT_MAX_JOB_BYTES beside what the request's other
    fetches hold or may still read (eight 50 MB URLs in a 1 KB body once held 400 MB at once,
    the total refused only afterwards). When nothing else is in flight one fetch may start
    anyway: its real size may fit, and the total is checked once it is known."""

    def __init__(
        self,
        workflow: Mapping[str, Any],
        fetch_url: Callable[[str], Awaitable[bytes]],
        read_bucket: Mapping[str, Callable[[str], Awaitable[bytes]] | None],
        limits: InputLimits,
        budget: ByteBudget | None,
    ) -> None:
        self._workflow = workflow
        self._fetch_url = fetch_url
        self._read_bucket = read_bucket  # by scheme: oss, s3
        self._limits = limits
        # Without a shared budget, one of our own that never makes anyone wait.
        self._budget = budget or ByteBudget(_UNBOUNDED)
        self._slots = asyncio.Semaphore(limits.fetch_concurrency)
        self._leases: list[Lease] = []
        self._total = 0
        self._claimed = 0  # bytes this request holds or may still read (its fetches' reservations)
        self._in_flight = 0
        self._settled = asyncio.Event()
        # The request's lone input written where ComfyUI reads it, in the trip that decoded it.
        self.stage: Callable[[LoaderInput, _Fetched], str | None] | None = None

    async def __call__(self, item: LoaderInput, kind: InputKind) -> _Fetched:
        async with self._slots:
            size = self._reservation(item, kind)
            await self._claim(size)
            kept = 0
            examined: _Fetched | InputError | None = None
            try:
                lease = await self._reserve(item, kind)
                try:
                    if kind == "base64" and len(item.value) > INLINE_BYTES:
                        # Decoded, hashed, sniffed and verified in one trip to a worker thread.
                        data, examined = await asyncio.to_thread(self._decoded, item)
                    else:
                        data = await self._fetch(item, kind)
                except ServerlessError as exc:
                    raise _input_error(self._workflow, item, _VERBS[kind], exc) from exc
                lease.shrink(len(data))  # what was reserved but not read goes back; the rest is held
                kept = len(data)
            finally:
                self._settle(size, kept)
            self._count(item, len(data))
            if isinstance(examined, InputError):  # its check failed: said once the sizes are counted, as ever
                raise examined
            if examined is not None:
                return examined
            return await self._examine(item, data)

    async def _claim(self, size: int) -> None:
        """Wait until `size` more bytes fit within the request's total beside its other fetches
        (or none is in flight)."""
        while self._in_flight and self._claimed + size > self._limits.max_job_bytes:
            self._settled.clear()
            await self._settled.wait()
        self._claimed += size
        self._in_flight += 1

    def _settle(self, reserved: int, kept: int) -> None:
        """A fetch ended, holding `kept` of the `reserved` bytes."""
        self._claimed -= reserved - kept
        self._in_flight -= 1
        self._settled.set()

    def release(self) -> None:
        """Give back every reservation: the request's bytes are uploaded, or it failed."""
        for lease in self._leases:
            lease.release()
        self._leases.clear()

    async def _reserve(self, item: LoaderInput, kind: InputKind) -> Lease:
        try:
            lease = await self._budget.acquire(self._reservation(item, kind), self._limits.budget_timeout)
        except ServerlessError as exc:
            raise InputError(*_message(self._workflow, item, exc.message)) from exc
        self._leases.append(lease)
        return lease

    def _reservation(self, item: LoaderInput, kind: InputKind) -> int:
        """What the fetch may hold: base64 decodes to at most 3/4 of its text."""
        if kind == "base64":
            return min(self._limits.max_base64_bytes, len(item.value) * 3 // 4 + 3)
        return self._limits.max_fetch_bytes

    async def _fetch(self, item: LoaderInput, kind: InputKind) -> bytes:
        if kind == "url":
            return await self._fetch_url(item.value)
        if kind in ("oss", "s3"):
            read = self._read_bucket.get(kind)
            if read is None:
                storage = "OSS to be configured (OSS_BUCKET_DOMAIN)" if kind == "oss" else "S3 (STORAGE=s3, S3_BUCKET)"
                raise InputError(f"{kind}:// inputs need {storage} on this instance")
            return await read(item.value)
        # A few microseconds: less than a trip to a thread (a bigger one goes through `_decoded`).
        return decode_base64(item.value, self._limits.max_base64_bytes)

    def _decoded(self, item: LoaderInput) -> tuple[bytes, _Fetched | InputError]:
        """A big base64 input decoded (DownloadError when it is not base64), then examined (and
        staged, with `stage`): its description, or the InputError its check raised (blocking)."""
        data = decode_base64(item.value, self._limits.max_base64_bytes)
        try:
            fetched = self._described(item, data)
            if self.stage is not None:
                fetched = fetched._replace(staged=self.stage(item, fetched))
            return data, fetched
        except InputError as exc:
            return data, exc

    def _count(self, item: LoaderInput, size: int) -> None:
        self._total += size
        limit = self._limits.max_job_bytes
        if self._total > limit:
            reason = f"the inputs of this request add up to more than {limit} bytes (INPUT_MAX_JOB_BYTES)"
            raise InputError(*_message(self._workflow, item, reason))

    async def _examine(self, item: LoaderInput, data: bytes) -> _Fetched:
        """Hash, sniff and verify the content: in the event loop when that is bounded to a few
        tens of microseconds (small, and no pixel decoded: see `verify.decodes_pixels`), else in
        one trip to a worker thread."""
        if len(data) <= INLINE_BYTES and not decodes_pixels(sniff(data)):
            return self._described(item, data)
        return await asyncio.to_thread(self._described, item, data)

    def _described(self, item: LoaderInput, data: bytes) -> _Fetched:
        fetched = _describe(data)
        if fetched.sniffed is None:
            return fetched
        try:
            verify_media(fetched.data, fetched.sniffed[1], self._limits.max_pixels)
        except ServerlessError as exc:
            reason = f"{fetched.sniffed[1]} content is not usable: {exc.message}"
            raise InputError(*_message(self._workflow, item, reason)) from exc
        return fetched


def _staged(
    workflow: Mapping[str, Any],
    uses: list[LoaderInput],
    write_here: WriteHere,
    max_job_bytes: int,
    item: LoaderInput,
    fetched: _Fetched,
) -> str | None:
    """A request's one input, examined, written where ComfyUI reads it (blocking): the checks
    `resolve_inputs` makes once every fetch is done come first (its name, what each use of it
    accepts), so nothing is written that the request refuses. The name to use; None when it was
    not written (over the request's total, which is refused after; or the write failed)."""
    if len(fetched.data) > max_job_bytes:
        return None
    name = _file_name(workflow, item, "base64", fetched)
    for use in uses:
        _check_media(workflow, use, fetched)
    return write_here(fetched.data, name)


def _upload_job(
    workflow: Mapping[str, Any],
    item: LoaderInput,
    data: bytes,
    name: str,
    upload: Callable[[bytes, str], Awaitable[str]],
    slots: asyncio.Semaphore,
) -> Callable[[], Coroutine[Any, Any, str]]:
    async def job() -> str:
        try:
            async with slots:
                return await upload(data, name)
        except ComfyUIUnavailable:
            raise
        except ServerlessError as exc:
            raise _input_error(workflow, item, "cannot upload to ComfyUI", exc) from exc

    return job


_VERBS: dict[InputKind, str] = {
    "url": "cannot download",
    "oss": "cannot read from OSS",
    "s3": "cannot read from S3",
    "base64": "cannot decode",
    "file": "",
}


async def _run_all(
    jobs: Mapping[str, Callable[[], Coroutine[Any, Any, T]]],
) -> dict[str, T]:
    """Run the jobs concurrently; the first failure cancels the rest and is raised as itself."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks: dict[str, asyncio.Task[T]] = {key: group.create_task(job()) for key, job in jobs.items()}
    except ExceptionGroup as eg:
        leaves = _leaves(eg)
        if all(isinstance(e, ServerlessError) for e in leaves):
            raise leaves[0] from leaves[0].__cause__  # the fetch error as the caller sees it
        raise
    return {key: task.result() for key, task in tasks.items()}


def _leaves(eg: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in eg.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _describe(data: bytes) -> _Fetched:
    return _Fetched(data, hashlib.sha256(data).hexdigest(), sniff(data))


def _file_name(workflow: Mapping[str, Any], item: LoaderInput, kind: InputKind, fetched: _Fetched) -> str:
    if not fetched.data:
        raise InputError(*_message(workflow, item, "the content is empty"))
    ext = fetched.sniffed[0] if fetched.sniffed else _fallback_ext(item.value, kind)
    name = f"{fetched.digest[:_HASH_CHARS]}.{ext}"
    if (_class_type(workflow, item), item.input_name) in LOADER_INPUTS:
        return f"{INPUT_SUBFOLDER}/{name}"
    return name


def _check_media(workflow: Mapping[str, Any], item: LoaderInput, fetched: _Fetched) -> None:
    accepted = expected_media(_class_type(workflow, item))
    if accepted is None:
        return
    if fetched.sniffed is None:
        reason = f"expected {accepted.label}, got content of an unrecognised type"
        raise InputError(*_message(workflow, item, reason))
    if fetched.sniffed[1] not in accepted:
        reason = f"expected {accepted.label}, got {fetched.sniffed[1]}"
        raise InputError(*_message(workflow, item, reason))


def _fallback_ext(value: str, kind: InputKind) -> str:
    """A safe extension for content `sniff` does not know, for loaders that accept anything."""
    if kind == "base64":
        if value[:5].lower() == "data:":
            return ext_for_mime(value[5:].split(",", 1)[0]) or "bin"
        return "bin"
    path = value.split("?", 1)[0].split("#", 1)[0]
    last = path.rsplit("/", 1)[-1]
    ext = last.rsplit(".", 1)[1].lower() if "." in last else ""
    return ext if _SAFE_EXT.fullmatch(ext) else "bin"


def _input_error(workflow: Mapping[str, Any], item: LoaderInput, verb: str, exc: ServerlessError) -> InputError:
    return InputError(*_message(workflow, item, f"{verb}: {exc.message}"))


def _message(workflow: Mapping[str, Any], item: LoaderInput, reason: str) -> tuple[str, Any]:
    return _where(workflow, item, reason), _raw(workflow, item, reason)


def _where(workflow: Mapping[str, Any], item: LoaderInput, reason: str) -> str:
    return f"node {item.node_id} ({_class_type(workflow, item)}) input '{item.input_name}': {reason}"


def _raw(workflow: Mapping[str, Any], item: LoaderInput, reason: str) -> dict[str, str]:
    return {
        "node_id": item.node_id,
        "class_type": _class_type(workflow, item),
        "input_name": item.input_name,
        "reason": reason,
    }


def _class_type(workflow: Mapping[str, Any], item: LoaderInput) -> str:
    return str(workflow[item.node_id].get("class_type"))
