"""Fetching untrusted loader inputs: an SSRF-safe HTTP(S) downloader and a bounded base64 decoder.

A URL in a workflow is chosen by whoever sends the request, so every address we connect to is
checked, at three points:

1. `download` checks the URL of every hop (the first and each redirect): scheme, and IP literals,
   which aiohttp never passes to a resolver;
2. the session's resolver (`GuardedResolver`) refuses a host name that resolves to a blocked
   address, before any connection is made;
3. the session's connector (`GuardedConnector`) checks the peer address of every connection it
   hands out, before a request is written on it: whatever the resolver or a cache said, this is
   the address actually connected to (DNS rebinding, a resolver that was not ours).

Blocked: everything that is not a public unicast address (loopback, private, link-local, shared
100.64/10 with Alibaba's metadata 100.100.100.200, 169.254.169.254, unique-local fc00::/7,
unspecified, multicast, reserved, documentation...), also when wrapped in IPv6 (IPv4-mapped,
IPv4-compatible, NAT64, 6to4). `DownloadPolicy.allow_private` or `allowed_hosts` open exceptions.

Bodies are streamed and cut at `max_bytes`; nothing over-size is held in memory. URLs are never
logged with their query (signatures live there), and no error message contains a URL.
"""

from __future__ import annotations

import asyncio
import binascii
import io
import ipaddress
import logging
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pybase64
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from ..errors import DownloadError

log = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 * 1024

# Not reachable on the public internet, whatever this Python's `ipaddress` flags say.
_BLOCKED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
        "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
        "::/96", "::ffff:0:0/96", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
        "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
    )
)  # fmt: skip
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True, slots=True)
class DownloadPolicy:
    """Limits and address rules for downloading loader inputs.

    `allowed_hosts` holds host names, IP addresses or CIDR networks that may be private
    (e.g. an internal image store); `allow_private` lifts the address check altogether."""

    max_bytes: int = 50 * 1024 * 1024
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    total_timeout: float = 120.0
    max_redirects: int = 5
    allow_private: bool = False
    allowed_hosts: frozenset[str] = frozenset()
    _allowed_names: frozenset[str] = field(init=False, repr=False, compare=False)
    _allowed_networks: tuple[IPNetwork, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("max_bytes", "connect_timeout", "read_timeout", "total_timeout"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DownloadPolicy.{name} must be positive")
        if self.max_redirects < 0:
            raise ValueError("DownloadPolicy.max_redirects must not be negative")
        names: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in self.allowed_hosts:
            host = _normalize_host(entry)
            try:
                networks.append(ipaddress.ip_network(host, strict=False))
            except ValueError:
                names.add(host)
        object.__setattr__(self, "_allowed_names", frozenset(names))
        object.__setattr__(self, "_allowed_networks", tuple(networks))

    def host_allowed(self, host: str) -> bool:
        """Whether `host` (a name or IP literal) is exempt from the address check."""
        return self.allow_private or _normalize_host(host) in self._allowed_names

    def address_allowed(self, ip: IPAddress) -> bool:
        """Whether connecting to `ip` is allowed (public, or allowed by this policy)."""
        if self.allow_private or not is_blocked_address(ip):
            return True
        plain = _unwrap(ip)
        return any(
            addr.version == net.version and addr in net for addr in {ip, plain} for net in self._allowed_networks
        )


def is_blocked_address(ip: IPAddress) -> bool:
    """True unless `ip` is a public unicast address (IPv4 inside IPv6 judged as IPv4)."""
    ip = _unwrap(ip)
    if any(ip.version == net.version and ip in net for net in _BLOCKED_NETWORKS):
        return True
    return (
        not ip.is_global
        or ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
    )


def check_url(url: URL, policy: DownloadPolicy) -> None:
    """Refuse a URL we must not request: not http(s), no host, or a blocked IP literal."""
    if url.scheme not in ("http", "https"):
        raise DownloadError(f"unsupported URL scheme {url.scheme!r} (only http and https)")
    host = url.host
    if not host:
        raise DownloadError("URL has no host")
    ip = _ip_literal(host)
    if ip is not None and not policy.host_allowed(host) and not policy.address_allowed(ip):
        raise DownloadError(f"blocked address {ip}")


class GuardedResolver(AbstractResolver):
    """Wraps a resolver; refuses a host name that resolves to any blocked address."""

    def __init__(self, policy: DownloadPolicy, inner: AbstractResolver) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self._policy.host_allowed(host):
            return results
        for result in results:
            ip = ipaddress.ip_address(result["host"])
            if not self._policy.address_allowed(ip):
                raise DownloadError(f"host {host} resolves to blocked address {ip}")
        return results

    async def close(self) -> None:
        await self._inner.close()


class GuardedConnector(aiohttp.TCPConnector):
    """A connector that checks the peer address of every connection before it is used."""

    def __init__(self, policy: DownloadPolicy, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._policy = policy

    async def connect(self, req: Any, traces: Any, timeout: aiohttp.ClientTimeout) -> Any:
        conn = await super().connect(req, traces, timeout)
        host = req.url.raw_host or ""
        if self._policy.host_allowed(host):
            return conn
        transport = conn.transport
        peer = transport.get_extra_info("peername") if transport is not None else None
        try:
            ip = ipaddress.ip_address(peer[0]) if peer else None
        except ValueError:
            ip = None
        if ip is None or not self._policy.address_allowed(ip):
            conn.close()
            raise DownloadError(f"blocked address {ip or 'unknown'} (connected for host {host})")
        return conn


def create_download_session(
    policy: DownloadPolicy, *, resolver: AbstractResolver | None = None
) -> aiohttp.ClientSession:
    """A session for `download` only: guarded resolver and connector, no cookies, no proxies
    from the environment, no transparent decompression. Call from a running event loop.

    `resolver` (default: a threaded getaddrinfo) is wrapped by the guard; the caller owns it."""
    guard = GuardedResolver(policy, resolver or aiohttp.ThreadedResolver())
    connector = GuardedConnector(policy, resolver=guard)
    return aiohttp.ClientSession(
        connector=connector,
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        auto_decompress=False,
        headers={"Accept-Encoding": "identity"},
        timeout=_request_timeout(policy),
    )


async def download(session: aiohttp.ClientSession, url: str, policy: DownloadPolicy) -> bytes:
    """GET `url` following at most `policy.max_redirects` redirects, each hop checked again;
    the body, at most `policy.max_bytes`. Raises `DownloadError` for every failure."""
    if not isinstance(session.connector, GuardedConnector):
        raise TypeError("download() needs a session from create_download_session()")
    try:
        target = URL(url)
    except (ValueError, TypeError) as exc:
        raise DownloadError("invalid URL") from exc
    try:
        async with asyncio.timeout(policy.total_timeout):
            return await _follow(session, target, policy)
    except TimeoutError as exc:
        raise DownloadError(f"timed out after {policy.total_timeout:g}s") from exc


async def _follow(session: aiohttp.ClientSession, url: URL, policy: DownloadPolicy) -> bytes:
    for hop in range(policy.max_redirects + 1):
        check_url(url, policy)
        log.debug("download hop %d: %s", hop, redact_url(url))
        location = await _get(session, url, policy)
        if isinstance(location, bytes):
            return location
        url = location
    raise DownloadError(f"too many redirects (more than {policy.max_redirects})")


async def _get(session: aiohttp.ClientSession, url: URL, policy: DownloadPolicy) -> bytes | URL:
    """One request: the body, or the URL a redirect points to."""
    try:
        async with session.get(url, allow_redirects=False, timeout=_request_timeout(policy)) as resp:
            if resp.status in _REDIRECT_STATUSES and "Location" in resp.headers:
                return _redirect_target(resp.url, resp.headers["Location"])
            if not 200 <= resp.status < 300:
                raise DownloadError(f"HTTP {resp.status}")
            return await _read_body(resp, policy.max_bytes)
    except aiohttp.ConnectionTimeoutError as exc:
        raise DownloadError(f"timed out after {policy.connect_timeout:g}s connecting") from exc
    except aiohttp.ServerTimeoutError as exc:
        raise DownloadError(f"timed out after {policy.read_timeout:g}s waiting for data") from exc
    except aiohttp.ClientError as exc:
        raise DownloadError(_describe_client_error(exc)) from exc


async def post(session: aiohttp.ClientSession, url: URL, body: bytes, headers: Mapping[str, str]) -> int:
    """POST `body` through a guarded session (see `create_download_session`), following no
    redirect; the answer's status. A transport failure is a ConnectionError."""
    try:
        async with session.post(url, data=body, headers=dict(headers), allow_redirects=False) as resp:
            await resp.release()
            return resp.status
    except aiohttp.ClientError as exc:
        raise ConnectionError(f"{type(exc).__name__}: {_describe_client_error(exc)}") from exc


def _redirect_target(base: URL, location: str) -> URL:
    try:
        return base.join(URL(location)).with_fragment(None)
    except (ValueError, TypeError) as exc:
        raise DownloadError("invalid redirect location") from exc


async def _read_body(resp: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    encoding = resp.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise DownloadError(f"unsupported Content-Encoding {encoding!r}")
    if resp.content_length is not None and resp.content_length > max_bytes:
        raise DownloadError(f"larger than {max_bytes} bytes (Content-Length {resp.content_length})")
    # One growing buffer whose getvalue() hands over that very buffer: the body is held once, not
    # once as chunks and again joined (the app's memory grows by the body's size, not twice that).
    body = io.BytesIO()
    async for chunk in resp.content.iter_chunked(_CHUNK):
        if body.tell() + len(chunk) > max_bytes:
            # Drop the connection rather than drain a body we will not use.
            resp.close()
            raise DownloadError(f"larger than {max_bytes} bytes")
        body.write(chunk)
    return body.getvalue()


def describe_client_error(exc: aiohttp.ClientError) -> str:
    """What may be said of an aiohttp failure: never its URL (model downloads use it too)."""
    return _describe_client_error(exc)


def _describe_client_error(exc: aiohttp.ClientError) -> str:
    # aiohttp's own messages can contain the URL (with its query), so they are not passed on.
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "cannot resolve host"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "TLS certificate not valid"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = getattr(exc, "os_error", None)
        return f"cannot connect ({getattr(os_error, 'strerror', None) or 'connection failed'})"
    if isinstance(exc, aiohttp.InvalidURL):
        return "invalid URL"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "response body broken off"
    return f"request failed ({type(exc).__name__})"


def _request_timeout(policy: DownloadPolicy) -> aiohttp.ClientTimeout:
    # The overall deadline is an asyncio.timeout around all hops; these bound each step.
    return aiohttp.ClientTimeout(total=None, connect=policy.connect_timeout, sock_read=policy.read_timeout)


def redact_url(url: URL | str) -> str:
    """Scheme, host, port and path only: what may be logged of a URL."""
    try:
        u = URL(url) if isinstance(url, str) else url
        return str(u.with_user(None).with_query(None).with_fragment(None))
    except (ValueError, TypeError):
        return "<invalid URL>"


def _normalize_host(host: str) -> str:
    return host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(_normalize_host(host))
    except ValueError:
        return None


def _unwrap(ip: IPAddress) -> IPAddress:
    """The IPv4 address that an IPv6 address reaches (mapped, NAT64, 6to4), else `ip`.

    IPv4-compatible addresses (::a.b.c.d) are not unwrapped: they are deprecated and blocked."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(ip.packed[12:])
    return ip


# --- base64 -------------------------------------------------------------------------------------

_DATA_URI = re.compile(r"data:(?P<mime>[^,;]*)(?P<params>(?:;[^,;]*)*),", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")
_ASCII_SPACES = tuple(chr(c) for c in range(128) if chr(c).isspace())  # what \s matches in ASCII
_URLSAFE = bytes.maketrans(b"-_", b"+/")


def decode_base64(value: str, max_bytes: int) -> bytes:
    """Decode raw base64 or a `data:<mime>;base64,...` URI, refusing before decoding when the
    text implies more than `max_bytes`. Whitespace and missing padding are tolerated, and the
    URL-safe alphabet is accepted; anything else not base64 is refused."""
    payload = _base64_payload(value)
    # A cheap bound first, so that a huge string is not even copied; whitespace-generous.
    if len(payload) > 2 * _encoded_length(max_bytes) + 1024:
        raise DownloadError(f"base64 larger than {max_bytes} bytes")
    if payload and len(payload) // 4 * 3 <= max_bytes:
        # The usual text (ASCII, padded, the standard alphabet, no whitespace) decoded as it is:
        # pybase64 (SIMD, the GIL released) reads the str itself, so its megabytes are not
        # copied first (each fresh megabyte costs ~0.65 ms of page faults here). What it refuses
        # goes the long way below, which says why or repairs what is tolerated.
        try:
            return pybase64.b64decode(payload, validate=True)
        except ValueError:
            pass
    # Whitespace is removed only when there is some (a regex pass over megabytes costs more than
    # the decoding): ASCII text without any goes straight to the strict decoder.
    plain = payload.isascii() and not any(space in payload for space in _ASCII_SPACES)
    text = payload if plain else _WHITESPACE.sub("", payload)
    if not text:
        raise DownloadError("empty base64")
    if not text.isascii():
        raise DownloadError("invalid base64: non-ASCII character")
    core = text.rstrip("=")
    if len(core) % 4 == 1:
        raise DownloadError("invalid base64: truncated (length is not possible)")
    if len(core) * 3 // 4 > max_bytes:
        raise DownloadError(f"base64 larger than {max_bytes} bytes")
    padding = -len(core) % 4
    # Padded as it should be (the usual case): the text is encoded as it is, not copied twice first.
    data = (text if len(text) == len(core) + padding else core + "=" * padding).encode("ascii")
    if b"-" in data or b"_" in data:  # the URL-safe alphabet
        data = data.translate(_URLSAFE)
    try:
        # pybase64 (SIMD, the GIL released): a megabyte in tens of microseconds where binascii
        # takes milliseconds holding the GIL. validate: only the alphabet, padding only at the end.
        return pybase64.b64decode(data, validate=True)
    except ValueError:
        pass  # refused: binascii's strict decoder gives the verdict, and says why
    try:
        return binascii.a2b_base64(data, strict_mode=True)
    except binascii.Error as exc:
        raise DownloadError(f"invalid base64: {exc}") from exc


def _base64_payload(value: str) -> str:
    if value[:5].lower() != "data:":
        return value
    match = _DATA_URI.match(value)
    if match is None:
        raise DownloadError("invalid data URI: no ',' after the media type")
    params = [p.strip().lower() for p in match["params"].split(";")]
    if "base64" not in params:
        raise DownloadError("data URI is not base64-encoded (';base64,' missing)")
    return value[match.end() :]


def _encoded_length(n: int) -> int:
    return 4 * ((n + 2) // 3)
