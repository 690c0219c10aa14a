"""A local OSS-compatible server for the tests: moto's S3 backend behind a WSGI layer that checks
what Alibaba OSS checks before it serves a request.

    client (oss2, requests) --HTTP--> werkzeug on 127.0.0.1:PORT
        -> OssV4Verifier: Authorization `OSS4-HMAC-SHA256 ...` or a presigned URL
           (`x-oss-signature-version=OSS4-HMAC-SHA256` ...), the account's secret, its STS token,
           the signing region, clock skew and URL expiry; any mismatch is a 403 with an OSS XML error
        -> moto's S3 handlers, called in process with a dummy S3 signature (moto does not check it)
        <- S3 namespace stripped from XML, `x-amz-*` headers renamed to their `x-oss-*` forms,
           `x-oss-hash-crc64ecma` added so that oss2's CRC checks run

Path-style only (`/<bucket>/<key>`), which is what oss2 speaks to an IP endpoint. Object
operations only: listing through moto is not OSS-compatible and the adapter does not list.

The signature is recomputed from the request as received, following Alibaba's "V4 signature"
documents and `oss2.auth.ProviderAuthV4`:

    canonical request = METHOD \\n /<bucket>/<key> (URI-encoded, slashes kept) \\n canonical query \\n
                        canonical headers (x-oss-*, content-type, content-md5, additional) \\n
                        additional header names \\n x-oss-content-sha256 or UNSIGNED-PAYLOAD
    string to sign    = OSS4-HMAC-SHA256 \\n <datetime> \\n <date>/<region>/oss/aliyun_v4_request \\n
                        hex(sha256(canonical request))
    signing key       = HMAC chain "aliyun_v4"+secret -> date -> region -> "oss" -> "aliyun_v4_request"
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import urlencode
from xml.sax.saxutils import escape

import crcmod  # type: ignore[import-untyped]
from moto.core.models import DEFAULT_ACCOUNT_ID
from moto.core.request import Request as MotoRequest
from moto.s3.models import s3_backends
from moto.s3.responses import S3Response
from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

ALGORITHM = "OSS4-HMAC-SHA256"
MAX_SKEW_S = 15 * 60
MAX_EXPIRES_S = 7 * 24 * 3600
_DATETIME = "%Y%m%dT%H%M%SZ"
_SIGNED_ALWAYS = ("content-type", "content-md5")
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-~.")
# moto treats a request without Authorization as anonymous and refuses it; it never checks this one.
_DUMMY_S3_AUTH = (
    "AWS4-HMAC-SHA256 Credential=AKIDLOCALOSS/20250101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0"
)
_crc64 = crcmod.mkCrcFun(0x142F0E1EBA9EA3693, initCrc=0, xorOut=0xFFFFFFFFFFFFFFFF, rev=True)


class Denied(Exception):
    """A request OSS would refuse: becomes a 403 (or `status`) with an OSS XML error body."""

    def __init__(self, code: str, message: str, status: int = 403, **extra: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.extra = extra


@dataclass(frozen=True, slots=True)
class Account:
    secret: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the server saw it (no query string: it may hold a signature)."""

    method: str
    path: str
    status: int


# --- OSS V4 signature, recomputed ---------------------------------------------------------------


def v4_quote(text: str, keep_slash: bool) -> str:
    """OSS V4 URI encoding: RFC 3986 unreserved characters kept, everything else %XX (upper hex)."""
    out = []
    for byte in text.encode("utf-8"):
        if byte in _UNRESERVED or (keep_slash and byte == ord("/")):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def canonical_request(
    method: str,
    bucket: str,
    key: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    additional: Iterable[str],
    payload_hash: str,
) -> str:
    uri = v4_quote(f"/{bucket}/{key}" if bucket else "/", keep_slash=True)
    encoded = sorted((v4_quote(k, False), v4_quote(v, False)) for k, v in query)
    canonical_query = "&".join(f"{k}={v}" if v else k for k, v in encoded)
    extra = sorted(set(additional))
    signed = sorted(
        (name, value.strip())
        for name, value in headers.items()
        if name.startswith("x-oss-") or name in _SIGNED_ALWAYS or name in extra
    )
    canonical_headers = "".join(f"{name}:{value}\n" for name, value in signed)
    return "\n".join([method, uri, canonical_query, canonical_headers, ";".join(extra), payload_hash])


def string_to_sign(date_time: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    return f"{ALGORITHM}\n{date_time}\n{scope}\n{digest}"


def signature(secret: str, date: str, region: str, product: str, to_sign: str) -> str:
    key = ("aliyun_v4" + secret).encode("utf-8")
    for part in (date, region, product, "aliyun_v4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class _Claim:
    """What a request says about its own signature, from the header or from the query."""

    access_key_id: str
    date: str
    region: str
    product: str
    date_time: str
    signature: str = field(repr=False)
    additional: tuple[str, ...]
    token: str | None = field(repr=False)
    expires: int | None  # presigned URLs only


def _parse_time(value: str) -> float:
    try:
        return datetime.strptime(value, _DATETIME).replace(tzinfo=UTC).timestamp()
    except ValueError:
        raise Denied("AccessDenied", "Invalid x-oss-date.") from None


def _parse_credential(credential: str) -> tuple[str, str, str, str]:
    parts = credential.split("/")
    if len(parts) != 5 or parts[4] != "aliyun_v4_request" or not parts[0]:
        raise Denied("InvalidArgument", "Invalid credential in Authorization.", status=400)
    return parts[0], parts[1], parts[2], parts[3]


def _claim_from_header(authorization: str, headers: Mapping[str, str]) -> _Claim:
    scheme, _, rest = authorization.partition(" ")
    if scheme != ALGORITHM:
        raise Denied("AccessDenied", "Only OSS4-HMAC-SHA256 signatures are accepted here.")
    fields: dict[str, str] = {}
    for item in rest.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            raise Denied("InvalidArgument", "Malformed Authorization header.", status=400)
        fields[name] = value
    if "Credential" not in fields or "Signature" not in fields:
        raise Denied("InvalidArgument", "Authorization needs Credential and Signature.", status=400)
    additional = fields.get("AdditionalHeaders")
    if additional is not None and (not additional or "" in additional.split(";")):
        raise Denied("InvalidArgument", "Empty AdditionalHeaders.", status=400)
    akid, date, region, product = _parse_credential(fields["Credential"])
    date_time = headers.get("x-oss-date", "")
    if not date_time:
        raise Denied("AccessDenied", "Missing x-oss-date header.")
    return _Claim(
        akid,
        date,
        region,
        product,
        date_time,
        fields["Signature"],
        tuple(additional.split(";")) if additional else (),
        headers.get("x-oss-security-token"),
        None,
    )


def _claim_from_query(args: Mapping[str, str]) -> _Claim:
    if args.get("x-oss-signature-version") != ALGORITHM:
        raise Denied("AccessDenied", "Only OSS4-HMAC-SHA256 presigned URLs are accepted here.")
    needed = ("x-oss-credential", "x-oss-date", "x-oss-expires", "x-oss-signature")
    if any(not args.get(name) for name in needed):
        raise Denied("AccessDenied", "Presigned URL lacks a required parameter.")
    try:
        expires = int(args["x-oss-expires"])
    except ValueError:
        raise Denied("AccessDenied", "Invalid x-oss-expires.") from None
    if not 0 < expires <= MAX_EXPIRES_S:
        raise Denied("AccessDenied", "x-oss-expires out of range.")
    additional = args.get("x-oss-additional-headers", "")
    akid, date, region, product = _parse_credential(args["x-oss-credential"])
    return _Claim(
        akid,
        date,
        region,
        product,
        args["x-oss-date"],
        args["x-oss-signature"],
        tuple(additional.split(";")) if additional else (),
        args.get("x-oss-security-token"),
        expires,
    )


class OssV4Verifier:
    """Checks a request's OSS V4 signature against known accounts; raises `Denied` when OSS would."""

    def __init__(self, accounts: Mapping[str, Account], region: str, clock: Any) -> None:
        self.accounts = accounts
        self.region = region
        self.clock = clock

    def verify(
        self, method: str, bucket: str, key: str, query: list[tuple[str, str]], headers: Mapping[str, str], body: bytes
    ) -> None:
        args = dict(query)
        if "x-oss-signature" in args:
            claim = _claim_from_query(args)
        elif "authorization" in headers:
            claim = _claim_from_header(headers["authorization"], headers)
        else:
            raise Denied("AccessDenied", "You have no right to access this object because of bucket acl.")
        account = self._account(claim)
        self._check_time(claim)
        payload_hash = headers.get("x-oss-content-sha256", "UNSIGNED-PAYLOAD")
        if payload_hash != "UNSIGNED-PAYLOAD" and payload_hash != hashlib.sha256(body).hexdigest():
            raise Denied("InvalidArgument", "x-oss-content-sha256 does not match the body.", status=400)
        signed_query = [(k, v) for k, v in query if k != "x-oss-signature"]
        canonical = canonical_request(method, bucket, key, signed_query, headers, claim.additional, payload_hash)
        scope = f"{claim.date}/{claim.region}/{claim.product}/aliyun_v4_request"
        to_sign = string_to_sign(claim.date_time, scope, canonical)
        expected = signature(account.secret, claim.date, claim.region, claim.product, to_sign)
        if not hmac.compare_digest(expected, claim.signature):
            raise Denied(
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
                OSSAccessKeyId=claim.access_key_id,
                CanonicalRequest=canonical,
                StringToSign=to_sign,
            )

    def _account(self, claim: _Claim) -> Account:
        account = self.accounts.get(claim.access_key_id)
        if account is None:
            raise Denied(
                "InvalidAccessKeyId",
                "The OSS Access Key Id you provided does not exist.",
                OSSAccessKeyId=claim.access_key_id,
            )
        if claim.token != account.token:
            raise Denied("InvalidSecurityToken", "The security token you provided is invalid.")
        if claim.product != "oss":
            raise Denied("AccessDenied", "Invalid signing product in credential scope.")
        if claim.region != self.region:
            raise Denied("AccessDenied", f"Invalid signing region in credential scope: {claim.region}.")
        return account

    def _check_time(self, claim: _Claim) -> None:
        if claim.date_time[:8] != claim.date:
            raise Denied("AccessDenied", "Credential scope date does not match x-oss-date.")
        signed_at = _parse_time(claim.date_time)
        now = self.clock()
        if claim.expires is None:
            if abs(now - signed_at) > MAX_SKEW_S:
                raise Denied(
                    "RequestTimeTooSkewed", "The difference between the request time and the current time is too large."
                )
        elif now > signed_at + claim.expires:
            raise Denied("AccessDenied", "Request has expired.")
        elif signed_at - now > MAX_SKEW_S:
            raise Denied("AccessDenied", "Request date is in the future.")


# --- moto behind it -------------------------------------------------------------------------------


def _moto_dispatch(
    method: str, host: str, raw_path: str, query: str, headers: Mapping[str, str], body: bytes
) -> tuple[int, dict[str, str], bytes]:
    url = f"http://{host}{raw_path}" + (f"?{query}" if query else "")
    request = MotoRequest.from_primitives(method, url, {**headers, "Host": host, "Authorization": _DUMMY_S3_AUTH}, body)
    if _is_object_path(raw_path):
        handler = S3Response.key_dispatch
    elif raw_path.strip("/"):
        handler = S3Response.ambiguous_dispatch
    else:
        handler = S3Response.bucket_dispatch
    status, out_headers, content = handler(request, request.raw_url, dict(request.headers))
    if isinstance(content, str):
        content = content.encode("utf-8")
    return int(status), {str(k): str(v) for k, v in dict(out_headers).items()}, bytes(content or b"")


def _is_object_path(raw_path: str) -> bool:
    """True when the path names an object (`/<bucket>/<key>`), not a bucket."""
    parts = raw_path.split("/", 2)
    return len(parts) == 3 and bool(parts[2])


def _to_s3_headers(headers: Mapping[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers.items():
        if name.startswith("x-oss-meta-"):
            out["x-amz-meta-" + name[len("x-oss-meta-") :]] = value
        elif not name.startswith("x-oss-") and name not in (
            "authorization",
            "host",
            "content-length",
            "transfer-encoding",
        ):
            out[name] = value
    return out


def _to_oss_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, value in headers.items():
        lower = name.lower()
        if lower in ("x-amzn-requestid", "x-amz-request-id"):
            out.append(("x-oss-request-id", value))
        elif lower.startswith("x-amz-meta-"):
            out.append(("x-oss-meta-" + lower[len("x-amz-meta-") :], value))
        elif not lower.startswith(("x-amz", "date", "server", "content-length", "transfer-encoding")):
            out.append((name, value))
    return out


def _strip_namespace(body: bytes) -> bytes:
    # oss2 finds elements by bare tag names; S3 qualifies them with its namespace.
    return re.sub(rb'\sxmlns(:\w+)?="[^"]*"', b"", body)


def _error_body(code: str, message: str, request_id: str, host: str, extra: Mapping[str, str]) -> bytes:
    items = {"Code": code, "Message": message, "RequestId": request_id, "HostId": host, **extra}
    inner = "".join(f"<{k}>{escape(v)}</{k}>" for k, v in items.items())
    return f'<?xml version="1.0" encoding="UTF-8"?>\n<Error>{inner}</Error>\n'.encode()


class _QuietHandler(WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:
        """Request lines hold presigned URLs: keep them out of the test output."""


class LocalOss:
    """An OSS endpoint on 127.0.0.1 serving `buckets` to `accounts` ({access_key_id: (secret, token)}).

    `time_offset` shifts the server's clock (seconds) to expire presigned URLs without waiting;
    `fail_next(n)` answers the next n requests with a 503; `chunked` sends GET bodies without a
    Content-Length; `requests` records what was served.
    """

    def __init__(
        self, accounts: Mapping[str, tuple[str, str | None]], buckets: Iterable[str], region: str = "cn-hangzhou"
    ) -> None:
        self.region = region
        self.buckets = tuple(buckets)
        self.time_offset = 0.0
        self.chunked = False
        self.requests: list[RequestRecord] = []
        self._accounts = {akid: Account(secret, token) for akid, (secret, token) in accounts.items()}
        self._verifier = OssV4Verifier(self._accounts, region, lambda: time.time() + self.time_offset)
        self._lock = threading.Lock()
        self._failures: list[int] = []
        for bucket in self.buckets:
            self._backend().create_bucket(bucket, "us-east-1")
        self._server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, self._app, threaded=True, request_handler=_QuietHandler
        )
        self.host = f"127.0.0.1:{self._server.server_port}"
        self.endpoint = f"http://{self.host}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-oss", daemon=True
        )
        self._thread.start()

    # --- test API ---

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next `count` requests with `status` (an OSS-style error), before any check."""
        with self._lock:
            self._failures.extend([status] * count)

    def get_object(self, bucket: str, key: str) -> tuple[bytes, str]:
        """The stored bytes and content type, read from moto directly; KeyError when absent."""
        status, headers, body = _moto_dispatch("GET", self.host, self._path(bucket, key), "", {}, b"")
        if status == 404:
            raise KeyError(f"{bucket}/{key}")
        assert status == 200, (status, body)
        lowered = {k.lower(): v for k, v in headers.items()}
        return body, lowered.get("content-type", "")

    def put_object(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store an object directly in moto (test set-up, no OSS checks)."""
        status, _, body = _moto_dispatch(
            "PUT", self.host, self._path(bucket, key), "", {"Content-Type": content_type}, data
        )
        assert status == 200, (status, body)

    def keys(self, bucket: str) -> list[str]:
        """Every key in the bucket (moto's own listing is not OSS-compatible, so read the backend)."""
        return sorted(self._backend().get_bucket(bucket).keys.keys())

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
        backend = self._backend()
        for bucket in self.buckets:
            for key in self.keys(bucket):
                backend.delete_object(bucket, key)
            backend.delete_bucket(bucket)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- serving ---

    @staticmethod
    def _backend() -> Any:
        return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]

    @staticmethod
    def _path(bucket: str, key: str) -> str:
        return "/" + v4_quote(f"{bucket}/{key}", keep_slash=True)

    def _app(self, environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        request = Request(environ)
        # Read the body before any refusal, or the client sees a reset instead of our 403.
        body = request.get_data()
        response = self._handle(request, body)
        with self._lock:
            self.requests.append(RequestRecord(request.method, request.path, response.status_code))
        return iter(response(environ, start_response))

    def _handle(self, request: Request, body: bytes) -> Response:
        request_id = uuid.uuid4().hex.upper()[:24]
        with self._lock:
            injected = self._failures.pop(0) if self._failures else None
        if injected is not None:
            code = {500: "InternalError", 503: "ServiceUnavailable"}.get(injected, "InjectedError")
            return self._error(injected, code, "Injected failure.", request_id, {})
        headers = {k.lower(): v for k, v in request.headers.items()}
        query = list(request.args.items(multi=True))
        _, bucket, key = (request.path + ("" if request.path.count("/") > 1 else "/")).split("/", 2)
        try:
            self._verifier.verify(request.method, bucket, key, query, headers, body)
        except Denied as denied:
            return self._error(denied.status, denied.code, denied.message, request_id, denied.extra)
        try:
            return self._forward(request, headers, query, body, request_id)
        except Exception as exc:
            return self._error(500, "InternalError", type(exc).__name__, request_id, {})

    def _forward(
        self, request: Request, headers: Mapping[str, str], query: list[tuple[str, str]], body: bytes, request_id: str
    ) -> Response:
        raw_path = str(request.environ.get("RAW_URI") or request.path).split("?", 1)[0]
        s3_query = urlencode([(k, v) for k, v in query if not k.startswith("x-oss-")])
        status, s3_headers, content = _moto_dispatch(
            request.method, self.host, raw_path, s3_query, _to_s3_headers(headers), body
        )
        out = _to_oss_headers(s3_headers)
        if not any(name == "x-oss-request-id" for name, _ in out):
            out.append(("x-oss-request-id", request_id))
        if "xml" in s3_headers.get("Content-Type", s3_headers.get("content-type", "")):
            content = _strip_namespace(content)
        whole = "range" not in headers and _is_object_path(raw_path)
        if status == 200 and whole and request.method == "PUT":
            out.append(("x-oss-hash-crc64ecma", str(_crc64(body))))
        elif status == 200 and whole and request.method == "GET":
            out.append(("x-oss-hash-crc64ecma", str(_crc64(content))))
        chunked = self.chunked and request.method == "GET"
        # An iterable body has no known length: werkzeug sends it chunked.
        response = Response(iter([content]) if chunked else content, status=status, headers=out)
        if request.method == "HEAD":
            length = {k.lower(): v for k, v in s3_headers.items()}.get("content-length")
            if length is not None:
                response.headers["Content-Length"] = length
        return response

    def _error(self, status: int, code: str, message: str, request_id: str, extra: Mapping[str, str]) -> Response:
        body = _error_body(code, message, request_id, self.host, extra)
        return Response(body, status=status, content_type="application/xml", headers={"x-oss-request-id": request_id})
