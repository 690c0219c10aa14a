"""A local S3-compatible server for the tests: moto's S3 backend behind a WSGI layer that checks
AWS Signature Version 4 as S3 does before it serves a request.

    client (obstore, boto3, requests) --HTTP--> werkzeug on 127.0.0.1:PORT
        -> SigV4Verifier: Authorization `AWS4-HMAC-SHA256 ...` or a presigned URL (`X-Amz-Signature`):
           the access key, its secret, its session token, the signing region and service, clock
           skew, the payload's SHA-256 and URL expiry; any mismatch is a 403 with an S3 XML error
        -> moto's S3 handlers, called in process (tests/oss_server.py's `_moto_dispatch`)

Path-style (`/<bucket>/<key>`) on its own address, and virtual-hosted (`Host: <bucket>.s3.test`)
when a client uses it as its HTTP proxy (no DNS needed).

moto checks no signature itself (its IAM check is off unless INITIAL_NO_AUTH_ACTION_COUNT is set,
and then reads only the Authorization header, never a presigned URL's, and never its expiry), so
without this layer a wrong secret would pass.

    canonical request = METHOD \\n URI-encoded path \\n canonical query \\n canonical headers \\n
                        signed header names \\n x-amz-content-sha256 (or UNSIGNED-PAYLOAD)
    string to sign    = AWS4-HMAC-SHA256 \\n <datetime> \\n <date>/<region>/s3/aws4_request \\n
                        hex(sha256(canonical request))
    signing key       = HMAC chain "AWS4"+secret -> date -> region -> "s3" -> "aws4_request"
"""

from __future__ import annotations

import hashlib
import hmac
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import unquote
from xml.sax.saxutils import escape

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from tests.oss_server import _moto_dispatch

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW_S = 15 * 60
MAX_EXPIRES_S = 7 * 24 * 3600
UNSIGNED = "UNSIGNED-PAYLOAD"
_DATETIME = "%Y%m%dT%H%M%SZ"
_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-~.")
# Requests whose Host is `<bucket>.s3.test` (through this server as an HTTP proxy) are virtual-hosted.
VIRTUAL_DOMAIN = "s3.test"
_PRESIGN = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires", "X-Amz-SignedHeaders")


class Denied(Exception):
    """A request S3 would refuse: a 403 (or `status`) with an S3 XML error body."""

    def __init__(self, code: str, message: str, status: int = 403) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True, slots=True)
class Account:
    secret: str = field(repr=False)
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request as the server saw it (no query string: it may hold a signature)."""

    method: str
    path: str
    query_names: tuple[str, ...]
    status: int
    body_bytes: int


def uri_encode(text: str, keep_slash: bool) -> str:
    """SigV4 URI encoding: RFC 3986 unreserved characters kept, everything else %XX (upper hex)."""
    return "".join(
        chr(byte) if byte in _UNRESERVED or (keep_slash and byte == 0x2F) else f"%{byte:02X}"
        for byte in text.encode("utf-8")
    )


def parse_query(raw: str) -> list[tuple[str, str]]:
    """The query string's pairs, percent-decoded, in order (`+` is a plus sign, as S3 reads it)."""
    pairs = []
    for part in raw.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((unquote(name), unquote(value)))
    return pairs


def canonical_request(
    method: str,
    path: str,
    query: Iterable[tuple[str, str]],
    headers: Mapping[str, str],
    signed: list[str],
    payload: str,
) -> str:
    uri = uri_encode(unquote(path), keep_slash=True)
    canonical_query = "&".join(
        f"{k}={v}" for k, v in sorted((uri_encode(k, False), uri_encode(v, False)) for k, v in query)
    )
    canonical_headers = "".join(f"{name}:{' '.join(headers.get(name, '').split())}\n" for name in signed)
    return "\n".join([method, uri, canonical_query, canonical_headers, ";".join(signed), payload])


def signature(secret: str, date: str, region: str, to_sign: str) -> str:
    key = ("AWS4" + secret).encode("utf-8")
    for part in (date, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class _Claim:
    """What a request says about its own signature, from the Authorization header or the query."""

    key_id: str
    date: str
    region: str
    service: str
    signed_headers: list[str]
    signature: str
    date_time: str
    token: str | None
    expires: int | None  # presigned URLs only
    payload: str


class SigV4Verifier:
    """Recomputes a request's SigV4 signature from what was received; raises Denied as S3 would."""

    def __init__(self, accounts: Mapping[str, Account], region: str, clock: Callable[[], float]) -> None:
        self._accounts = accounts
        self._region = region
        self._clock = clock

    def verify(
        self, method: str, path: str, query: list[tuple[str, str]], headers: Mapping[str, str], body: bytes
    ) -> None:
        claim = self._claim(query, headers)
        account = self._accounts.get(claim.key_id)
        if account is None:
            raise Denied("InvalidAccessKeyId", "The AWS Access Key Id you provided does not exist in our records.")
        if account.token is not None and claim.token != account.token:
            raise Denied("InvalidToken", "The provided token is malformed or otherwise invalid.", 400)
        if claim.region != self._region or claim.service != "s3":
            raise Denied(
                "AuthorizationHeaderMalformed", f"the region '{claim.region}' is wrong; expecting '{self._region}'", 400
            )
        self._check_time(claim)
        if "host" not in claim.signed_headers:
            raise Denied("AccessDenied", "the host header must be signed")
        if claim.payload not in (UNSIGNED,) and claim.expires is None:
            if claim.payload != hashlib.sha256(body).hexdigest():
                raise Denied(
                    "XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' header does not match", 400
                )
        unsigned_query = [(k, v) for k, v in query if k != "X-Amz-Signature"]
        canonical = canonical_request(method, path, unsigned_query, headers, claim.signed_headers, claim.payload)
        scope = f"{claim.date}/{claim.region}/s3/aws4_request"
        digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        to_sign = f"{ALGORITHM}\n{claim.date_time}\n{scope}\n{digest}"
        expected = signature(account.secret, claim.date, claim.region, to_sign)
        if not hmac.compare_digest(expected, claim.signature):
            raise Denied(
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided.",
            )

    def _claim(self, query: list[tuple[str, str]], headers: Mapping[str, str]) -> _Claim:
        params = dict(query)
        if "X-Amz-Signature" in params:
            if any(name not in params for name in _PRESIGN) or params["X-Amz-Algorithm"] != ALGORITHM:
                raise Denied("AuthorizationQueryParametersError", "incomplete presigned URL", 400)
            try:
                expires = int(params["X-Amz-Expires"])
            except ValueError:
                raise Denied("AuthorizationQueryParametersError", "X-Amz-Expires is not a number", 400) from None
            if not 0 < expires <= MAX_EXPIRES_S:
                raise Denied("AuthorizationQueryParametersError", "X-Amz-Expires must be 1 to 604800", 400)
            return self._parsed(
                params["X-Amz-Credential"],
                params["X-Amz-SignedHeaders"],
                params["X-Amz-Signature"],
                params["X-Amz-Date"],
                params.get("X-Amz-Security-Token"),
                expires,
                params.get("X-Amz-Content-Sha256", UNSIGNED),
            )
        auth = headers.get("authorization", "")
        if not auth:
            raise Denied("AccessDenied", "Access Denied (anonymous request)")
        algorithm, _, rest = auth.partition(" ")
        fields = dict(part.strip().partition("=")[::2] for part in rest.split(","))
        if algorithm != ALGORITHM or not {"Credential", "SignedHeaders", "Signature"} <= fields.keys():
            raise Denied("InvalidArgument", "Unsupported Authorization Type", 400)
        payload = headers.get("x-amz-content-sha256", "")
        if not payload:
            raise Denied("InvalidRequest", "Missing required header for this request: x-amz-content-sha256", 400)
        if payload.startswith("STREAMING-"):
            raise Denied("NotImplemented", "aws-chunked payloads are not served by this test server", 501)
        return self._parsed(
            fields["Credential"],
            fields["SignedHeaders"],
            fields["Signature"],
            headers.get("x-amz-date", ""),
            headers.get("x-amz-security-token"),
            None,
            payload,
        )

    @staticmethod
    def _parsed(
        credential: str, signed: str, sig: str, date_time: str, token: str | None, expires: int | None, payload: str
    ) -> _Claim:
        parts = credential.split("/")
        if len(parts) != 5 or parts[4] != "aws4_request":
            raise Denied("AuthorizationHeaderMalformed", "malformed credential scope", 400)
        key_id, date, region, service, _ = parts
        if not date_time.startswith(date):
            raise Denied("AuthorizationHeaderMalformed", "the credential date does not match the request date", 400)
        names = signed.split(";")
        if names != sorted(names) or any(n != n.lower() for n in names):
            raise Denied("AuthorizationHeaderMalformed", "signed headers must be sorted and lower case", 400)
        return _Claim(key_id, date, region, service, names, sig, date_time, token, expires, payload)

    def _check_time(self, claim: _Claim) -> None:
        try:
            when = datetime.strptime(claim.date_time, _DATETIME).replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise Denied("AccessDenied", "X-Amz-Date is not a valid date") from None
        now = self._clock()
        if claim.expires is not None:
            if now > when + claim.expires:
                raise Denied("AccessDenied", "Request has expired")
            if when > now + MAX_SKEW_S:
                raise Denied("AccessDenied", "Request is not valid yet")
        elif abs(now - when) > MAX_SKEW_S:
            raise Denied(
                "RequestTimeTooSkewed", "The difference between the request time and the current time is too large."
            )


class _QuietHandler(WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:
        """Request lines hold presigned URLs: keep them out of the test output."""


class LocalS3:
    """An S3 endpoint on 127.0.0.1 serving `buckets` to `accounts` ({access_key_id: (secret, token)}).

    `time_offset` shifts the server's clock (seconds) to expire presigned URLs without waiting;
    `fail_next(n)` answers the next n requests with a 503; `requests` records what was served."""

    def __init__(
        self, accounts: Mapping[str, tuple[str, str | None]], buckets: Iterable[str], region: str = "us-east-1"
    ) -> None:
        self.region = region
        self.buckets = tuple(buckets)
        self.time_offset = 0.0
        self.requests: list[RequestRecord] = []
        self._accounts = {key_id: Account(secret, token) for key_id, (secret, token) in accounts.items()}
        self._verifier = SigV4Verifier(self._accounts, region, lambda: time.time() + self.time_offset)
        self._lock = threading.Lock()
        self._failures: list[int] = []
        self._server: BaseWSGIServer = make_server(
            "127.0.0.1", 0, self._app, threaded=True, request_handler=_QuietHandler
        )
        self.host = f"127.0.0.1:{self._server.server_port}"
        self.endpoint = f"http://{self.host}"
        for bucket in self.buckets:
            status, _, body = _moto_dispatch("PUT", self.host, f"/{bucket}", "", {}, b"")
            assert status == 200, (status, body)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="local-s3", daemon=True
        )
        self._thread.start()

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next `count` requests with `status` (an S3-style error), before any check."""
        with self._lock:
            self._failures.extend([status] * count)

    def get_object(self, bucket: str, key: str) -> tuple[bytes, dict[str, str]]:
        """The stored bytes and headers, read from moto directly; KeyError when absent."""
        status, headers, body = _moto_dispatch("GET", self.host, f"/{bucket}/{uri_encode(key, True)}", "", {}, b"")
        if status == 404:
            raise KeyError(f"{bucket}/{key}")
        assert status == 200, (status, body)
        return body, {k.lower(): v for k, v in headers.items()}

    def put_object(self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        """Store an object directly in moto (test set-up, no checks)."""
        path = f"/{bucket}/{uri_encode(key, True)}"
        status, _, body = _moto_dispatch("PUT", self.host, path, "", {"Content-Type": content_type}, data)
        assert status == 200, (status, body)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _app(self, environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
        request = Request(environ)
        # Read the body before any refusal, or the client sees a reset instead of our 403.
        body = request.get_data()
        raw = str(environ.get("RAW_URI") or environ.get("REQUEST_URI") or request.path)
        if raw.startswith("http://"):  # through a proxy: the absolute form
            raw = "/" + raw.split("/", 3)[3] if raw.count("/") >= 3 else "/"
        path, _, raw_query = raw.partition("?")
        query = parse_query(raw_query)
        # Virtual-hosted addressing: the bucket is the first label of the host name.
        host = request.headers.get("Host", "").split(":", 1)[0]
        bucket = host.removesuffix("." + VIRTUAL_DOMAIN) if host.endswith("." + VIRTUAL_DOMAIN) else None
        response = self._handle(request, path, raw_query, query, body, bucket)
        stored = f"/{bucket}{path}" if bucket else path
        record = RequestRecord(
            request.method, unquote(stored), tuple(k for k, _ in query), response.status_code, len(body)
        )
        with self._lock:
            self.requests.append(record)
        return iter(response(environ, start_response))

    def _handle(
        self,
        request: Request,
        path: str,
        raw_query: str,
        query: list[tuple[str, str]],
        body: bytes,
        virtual_bucket: str | None,
    ) -> Response:
        headers = {k.lower(): v for k, v in request.headers.items()}
        with self._lock:
            injected = self._failures.pop(0) if self._failures else None
        if injected is not None:
            return _error(injected, "ServiceUnavailable" if injected == 503 else "InternalError", "Injected failure.")
        try:
            self._verifier.verify(request.method, path, query, headers, body)
        except Denied as denied:
            return _error(denied.status, denied.code, denied.message)
        if virtual_bucket is not None:
            path = f"/{virtual_bucket}{path}"
        if path.strip("/").split("/", 1)[0] not in self.buckets:
            return _error(404, "NoSuchBucket", "The specified bucket does not exist")
        kept = "&".join(p for p in raw_query.split("&") if p and not p.startswith("X-Amz-"))
        forwarded = {
            k: v
            for k, v in request.headers.items()
            if k.lower() not in ("authorization", "host", "x-amz-security-token", "x-amz-content-sha256", "x-amz-date")
        }
        try:
            status, out, content = _moto_dispatch(request.method, self.host, path, kept, forwarded, body)
        except Exception as exc:
            return _error(500, "InternalError", type(exc).__name__)
        response = Response(content, status=status, headers=list(out.items()))
        if request.method == "HEAD":
            length = {k.lower(): v for k, v in out.items()}.get("content-length")
            if length is not None:
                response.headers["Content-Length"] = length
        return response


def _error(status: int, code: str, message: str) -> Response:
    request_id = uuid.uuid4().hex.upper()[:16]
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(code)}</Code>'
        f"<Message>{escape(message)}</Message><RequestId>{request_id}</RequestId></Error>"
    )
    return Response(body, status=status, content_type="application/xml", headers={"x-amz-request-id": request_id})
