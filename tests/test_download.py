"""The SSRF-safe downloader against real `aiohttp.web` servers on loopback.

Loopback is exactly what the downloader must refuse by default, so most tests allow it
explicitly; the refusals count the requests the server saw to show nothing reached it."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import socket
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from serverless.errors import InputError
from serverless.inputs.download import (
    DownloadError,
    DownloadPolicy,
    GuardedConnector,
    GuardedResolver,
    check_url,
    create_download_session,
    decode_base64,
    download,
    is_blocked_address,
    redact_url,
)

PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
LOCAL = DownloadPolicy(allowed_hosts=frozenset({"127.0.0.1"}))
GiB = 1024**3


@dataclass
class Server:
    """A real HTTP server on 127.0.0.1 and what it saw."""

    port: int
    hits: Counter[str] = field(default_factory=Counter)
    streamed: int = 0

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


def make_app(server: Server) -> web.Application:
    @web.middleware
    async def count(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        server.hits[request.path] += 1
        return await handler(request)

    async def png(_: web.Request) -> web.Response:
        return web.Response(body=PNG, content_type="image/png")

    async def redirect(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": request.query["to"]})

    async def chain(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=PNG)
        return web.Response(status=307, headers={"Location": f"/chain/{n - 1}"})

    async def loop(_: web.Request) -> web.Response:
        return web.Response(status=301, headers={"Location": "/loop"})

    async def missing(_: web.Request) -> web.Response:
        return web.Response(status=404, text="no such thing")

    async def slow(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(request)
        await resp.write(b"\x89PNG")
        await asyncio.sleep(30)  # cancelled at server shutdown
        return resp

    async def huge(request: web.Request) -> web.StreamResponse:
        # 1 GiB of zeros made lazily, chunked, no Content-Length.
        resp = web.StreamResponse()
        await resp.prepare(request)
        chunk = bytes(256 * 1024)
        try:
            while server.streamed < GiB:
                await resp.write(chunk)
                server.streamed += len(chunk)
        except (ConnectionError, RuntimeError):
            pass
        return resp

    async def declared_huge(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 10 * GiB
        await resp.prepare(request)
        await resp.write(PNG)
        await asyncio.sleep(30)
        return resp

    async def gzip(_: web.Request) -> web.Response:
        return web.Response(body=b"\x1f\x8b\x08\x00", headers={"Content-Encoding": "gzip"})

    app = web.Application(middlewares=[count])
    app.router.add_get("/x.png", png)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/chain/{n}", chain)
    app.router.add_get("/loop", loop)
    app.router.add_get("/missing", missing)
    app.router.add_get("/slow", slow)
    app.router.add_get("/huge", huge)
    app.router.add_get("/declared-huge", declared_huge)
    app.router.add_get("/gzip", gzip)
    return app


@asynccontextmanager
async def serve(host: str = "127.0.0.1") -> AsyncIterator[Server]:
    server = Server(port=0)
    runner = web.AppRunner(make_app(server), shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    server.port = runner.addresses[0][1]
    try:
        yield server
    finally:
        await runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    async with serve() as s:
        yield s


@asynccontextmanager
async def session_for(
    policy: DownloadPolicy, resolver: AbstractResolver | None = None
) -> AsyncIterator[aiohttp.ClientSession]:
    session = create_download_session(policy, resolver=resolver)
    try:
        yield session
    finally:
        await session.close()


async def fetch(url: str, policy: DownloadPolicy = LOCAL, **kw: Any) -> bytes:
    async with session_for(policy, **kw) as session:
        return await download(session, url, policy)


async def refused(url: str, policy: DownloadPolicy = LOCAL, **kw: Any) -> str:
    with pytest.raises(DownloadError) as info:
        await fetch(url, policy, **kw)
    return info.value.reason


class HostsResolver(AbstractResolver):
    """A resolver with a fixed hosts table, like an attacker-controlled DNS zone."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host not in self.table:
            raise OSError(f"unknown host {host}")
        return [
            ResolveResult(
                hostname=host,
                host=ip,
                port=port,
                family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in self.table[host]
        ]

    async def close(self) -> None:
        pass


# --- address rules --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.255.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254",
        "100.100.100.200", "100.64.0.1", "0.0.0.0", "255.255.255.255", "224.0.0.251",
        "240.0.0.1", "192.0.2.1", "::1", "::", "fc00::1", "fd12:3456::1", "fe80::1",
        "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",
        "::7f00:1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::", "2001:db8::1", "fec0::1",
    ],
)  # fmt: skip
def test_non_public_addresses_are_blocked(address: str) -> None:
    assert is_blocked_address(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_not_blocked(address: str) -> None:
    assert not is_blocked_address(ipaddress.ip_address(address))


def test_allowed_hosts_take_names_addresses_and_networks() -> None:
    policy = DownloadPolicy(allowed_hosts=frozenset({"Images.Internal.", "10.0.0.0/8", "::1"}))
    assert policy.host_allowed("images.internal")
    assert not policy.host_allowed("other.internal")
    assert policy.address_allowed(ipaddress.ip_address("10.2.3.4"))
    assert policy.address_allowed(ipaddress.ip_address("::ffff:10.2.3.4"))
    assert policy.address_allowed(ipaddress.ip_address("::1"))
    assert not policy.address_allowed(ipaddress.ip_address("192.168.0.1"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_bytes": 0},
        {"read_timeout": 0},
        {"total_timeout": -1},
        {"max_redirects": -1},
    ],
)
def test_policy_refuses_nonsense_limits(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        DownloadPolicy(**kwargs)


# --- refusals before any connection ------------------------------------------------------------


async def test_loopback_url_is_refused_by_default(server: Server) -> None:
    reason = await refused(server.url("/x.png"), DownloadPolicy())
    assert reason == "blocked address 127.0.0.1"
    assert not server.hits


async def test_loopback_url_works_with_allow_private(server: Server) -> None:
    assert await fetch(server.url("/x.png"), DownloadPolicy(allow_private=True)) == PNG


async def test_loopback_url_works_when_its_address_is_allowed(server: Server) -> None:
    assert await fetch(server.url("/x.png"), LOCAL) == PNG


async def test_localhost_is_refused(server: Server) -> None:
    reason = await refused(server.url("/x.png", host="localhost"), DownloadPolicy())
    assert "localhost" in reason and "blocked address" in reason
    assert not server.hits


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://10.0.0.1/",
        "http://[fe80::1]/",
    ],
)
async def test_metadata_and_private_literals_are_refused_without_connecting(
    url: str,
) -> None:
    # check_url refuses before any socket exists; `download` says the same.
    with pytest.raises(DownloadError, match="blocked address"):
        check_url(URL(url), DownloadPolicy())
    assert (await refused(url, DownloadPolicy())).startswith("blocked address")


@pytest.mark.parametrize(
    "template",
    [
        "http://0.0.0.0:{port}/x.png",
        "http://[::ffff:127.0.0.1]:{port}/x.png",
        "http://127.0.0.2:{port}/x.png",
        "http://[::1]:{port}/x.png",
    ],
)
async def test_loopback_in_disguise_is_refused_without_reaching_the_server(
    template: str,
) -> None:
    async with serve("127.0.0.1") as v4, serve("::1") as v6:
        url = template.format(port=v6.port if "[::1]" in template else v4.port)
        reason = await refused(url, DownloadPolicy())
        assert reason.startswith("blocked address")
        assert not v4.hits and not v6.hits


@pytest.mark.parametrize("host", ["2130706433", "127.1", "0x7f.0.0.1", "017700000001", "ⓛⓞⓒⓐⓛⓗⓞⓢⓣ"])
async def test_odd_spellings_of_loopback_are_refused(server: Server, host: str) -> None:
    # Refused either as an invalid URL or once resolved; never connected to.
    with pytest.raises(DownloadError):
        await fetch(f"http://{host}:{server.port}/x.png", DownloadPolicy())
    assert not server.hits


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/x.png", "file:///etc/passwd", "gopher://127.0.0.1:6379/_INFO"],
)
async def test_only_http_and_https_are_fetched(url: str) -> None:
    assert "unsupported URL scheme" in await refused(url)


async def test_download_refuses_a_session_without_the_guards(server: Server) -> None:
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TypeError):
            await download(session, server.url("/x.png"), LOCAL)
    assert not server.hits


# --- names that resolve to blocked addresses -------------------------------------------------


async def test_name_resolving_to_a_private_address_is_refused(server: Server) -> None:
    dns = HostsResolver({"images.example.test": ["127.0.0.1"]})
    reason = await refused(server.url("/x.png", host="images.example.test"), DownloadPolicy(), resolver=dns)
    assert reason == "host images.example.test resolves to blocked address 127.0.0.1"
    assert not server.hits


async def test_name_with_one_private_address_among_public_ones_is_refused(
    server: Server,
) -> None:
    dns = HostsResolver({"mixed.example.test": ["93.184.216.34", "10.0.0.7"]})
    reason = await refused(server.url("/x.png", host="mixed.example.test"), DownloadPolicy(), resolver=dns)
    assert "blocked address 10.0.0.7" in reason


async def test_name_in_allowed_hosts_may_resolve_to_a_private_address(
    server: Server,
) -> None:
    dns = HostsResolver({"images.example.test": ["127.0.0.1"]})
    policy = DownloadPolicy(allowed_hosts=frozenset({"images.example.test"}))
    url = server.url("/x.png", host="images.example.test")
    assert await fetch(url, policy, resolver=dns) == PNG


async def test_guarded_resolver_passes_public_addresses() -> None:
    dns = HostsResolver({"cdn.example.test": ["93.184.216.34", "2606:2800:220:1::1"]})
    results = await GuardedResolver(DownloadPolicy(), dns).resolve("cdn.example.test", 443)
    assert [r["host"] for r in results] == ["93.184.216.34", "2606:2800:220:1::1"]


async def test_connected_peer_is_checked_even_when_the_resolver_lies(
    server: Server,
) -> None:
    # DNS rebinding, or any resolver that is not the guarded one: the connector still sees
    # the address it actually connected to, and refuses before writing the request.
    lying = HostsResolver({"rebind.example.test": ["127.0.0.1"]})
    policy = DownloadPolicy()
    connector = GuardedConnector(policy, resolver=lying)
    async with aiohttp.ClientSession(connector=connector) as session:
        with pytest.raises(DownloadError) as info:
            await download(session, server.url("/x.png", host="rebind.example.test"), policy)
    assert info.value.reason == ("blocked address 127.0.0.1 (connected for host rebind.example.test)")
    assert not server.hits


# --- redirects --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://100.100.100.200/latest/meta-data/",
        "http://[::1]:{port}/x.png",
        "http://10.1.2.3/",
    ],
)
async def test_redirect_from_an_allowed_host_to_a_blocked_address_is_refused(server: Server, target: str) -> None:
    url = server.url("/redirect") + "?to=" + target.format(port=server.port)
    assert (await refused(url, LOCAL)).startswith("blocked address")
    assert server.hits == Counter({"/redirect": 1})


async def test_redirect_from_an_allowed_name_to_an_unlisted_address_is_refused(
    server: Server,
) -> None:
    dns = HostsResolver({"images.example.test": ["127.0.0.1"]})
    policy = DownloadPolicy(allowed_hosts=frozenset({"images.example.test"}))
    url = server.url("/redirect", host="images.example.test") + "?to=" + server.url("/x.png")
    assert await refused(url, policy, resolver=dns) == "blocked address 127.0.0.1"
    assert server.hits == Counter({"/redirect": 1})


async def test_relative_redirects_are_followed_up_to_the_limit(server: Server) -> None:
    policy = DownloadPolicy(allowed_hosts=frozenset({"127.0.0.1"}), max_redirects=3)
    assert await fetch(server.url("/chain/3"), policy) == PNG
    assert "too many redirects" in await refused(server.url("/chain/4"), policy)


async def test_redirect_loop_stops_at_max_redirects(server: Server) -> None:
    assert await refused(server.url("/loop"), LOCAL) == "too many redirects (more than 5)"
    assert server.hits["/loop"] == 6


# --- responses --------------------------------------------------------------------------------


async def test_http_error_status_is_the_reason(server: Server) -> None:
    assert await refused(server.url("/missing"), LOCAL) == "HTTP 404"


async def test_download_error_is_an_input_error() -> None:
    assert issubclass(DownloadError, InputError)


async def test_slow_server_hits_the_read_timeout(server: Server) -> None:
    policy = DownloadPolicy(allowed_hosts=frozenset({"127.0.0.1"}), read_timeout=0.2)
    assert await refused(server.url("/slow"), policy) == "timed out after 0.2s waiting for data"


async def test_slow_server_hits_the_total_timeout(server: Server) -> None:
    policy = DownloadPolicy(allowed_hosts=frozenset({"127.0.0.1"}), total_timeout=0.3)
    assert await refused(server.url("/slow"), policy) == "timed out after 0.3s"


async def test_declared_length_over_the_limit_is_refused_before_reading(
    server: Server,
) -> None:
    reason = await refused(server.url("/declared-huge"), LOCAL)
    assert reason == f"larger than {LOCAL.max_bytes} bytes (Content-Length {10 * GiB})"


async def test_compressed_bodies_are_refused(server: Server) -> None:
    assert await refused(server.url("/gzip"), LOCAL) == "unsupported Content-Encoding 'gzip'"


def _rss_kib(field_name: str = "VmRSS") -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field_name} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark, so VmHWM becomes the peak from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # the sampling thread still measures


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc")
async def test_endless_body_is_cut_at_max_bytes_without_growing_memory(
    server: Server,
) -> None:
    limit = 16 * 1024 * 1024
    policy = DownloadPolicy(allowed_hosts=frozenset({"127.0.0.1"}), max_bytes=limit)
    peak = _rss_kib()
    _reset_peak_rss()
    before = _rss_kib()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.wait(0.005):
            peak = max(peak, _rss_kib())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        reason = await refused(server.url("/huge"), policy)
    finally:
        stop.set()
        sampler.join()
    peak = max(peak, _rss_kib("VmHWM"))
    assert reason == f"larger than {limit} bytes"
    assert server.streamed < GiB, "the server should have stopped when we hung up"
    growth = (peak - before) * 1024
    assert growth < limit + 48 * 1024 * 1024, f"RSS grew by {growth / 2**20:.0f} MiB"


# --- logging ----------------------------------------------------------------------------------


async def test_query_strings_never_reach_errors_or_logs(server: Server, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="serverless.inputs.download")
    url = server.url("/missing") + "?OSSAccessKeyId=AK&Signature=s3cr3t"
    reason = await refused(url, LOCAL)
    assert "s3cr3t" not in reason
    # Ours only: the test's own file server logs its requests whole (aiohttp's access log), and
    # that shows here when another test has raised the root logger's level.
    ours = "\n".join(record.getMessage() for record in caplog.records if record.name.startswith("serverless"))
    assert "/missing" in ours
    assert "s3cr3t" not in ours and "OSSAccessKeyId" not in ours


def test_redact_url_keeps_scheme_host_and_path_only() -> None:
    assert (
        redact_url("https://user:pw@bucket.oss.example.com:8443/a/b.png?Signature=x#frag")
        == "https://bucket.oss.example.com:8443/a/b.png"
    )


# --- base64 -----------------------------------------------------------------------------------


def test_decode_base64_accepts_raw_base64_and_data_uris() -> None:
    encoded = base64.b64encode(PNG).decode()
    assert decode_base64(encoded, 1024) == PNG
    assert decode_base64("data:image/png;base64," + encoded, 1024) == PNG
    assert decode_base64("DATA:image/png;name=x.png;BASE64," + encoded, 1024) == PNG


def test_decode_base64_tolerates_line_breaks_and_missing_padding() -> None:
    encoded = base64.encodebytes(PNG).decode()  # 76-column lines
    assert "\n" in encoded
    assert decode_base64(encoded, 1024) == PNG
    assert decode_base64(encoded.replace("\n", "\r\n").rstrip("=\r\n"), 1024) == PNG


def test_decode_base64_accepts_the_url_safe_alphabet() -> None:
    data = bytes(range(256))
    assert decode_base64(base64.urlsafe_b64encode(data).decode(), 1024) == data


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("iVBORw0KGgo*AAAANSUhEUg", "invalid base64"),
        ("iVBORw0KGgoA=AAANSUhEUg", "invalid base64"),
        ("iVBORw0KG", "invalid base64: truncated"),
        ("iVBORw0KGgoé", "invalid base64: non-ASCII character"),
        ("data:image/png;base64,", "empty base64"),
        ("data:image/png,iVBORw0KGgo", "data URI is not base64-encoded"),
        ("data:image/png;base64", "invalid data URI"),
    ],
)
def test_decode_base64_refuses_broken_input_with_a_clear_reason(value: str, reason: str) -> None:
    with pytest.raises(DownloadError) as info:
        decode_base64(value, 1024)
    assert info.value.reason.startswith(reason)


def test_decode_base64_refuses_oversize_input_before_decoding() -> None:
    limit = 1000
    exact = base64.b64encode(bytes(limit)).decode()
    assert len(decode_base64(exact, limit)) == limit
    with pytest.raises(DownloadError, match=f"larger than {limit} bytes"):
        decode_base64(base64.b64encode(bytes(limit + 1)).decode(), limit)
    # Not even valid base64: the size alone refuses it, before anything is parsed.
    with pytest.raises(DownloadError, match=f"larger than {limit} bytes"):
        decode_base64("*" * 100_000, limit)
