"""HTTP/1.1 requests to ComfyUI over connections kept open: what every job's `POST /prompt` and
ComfyUI's small JSON answers (`/history`, `/queue`, `/interrupt`, ...) travel on.

aiohttp's client does much for each request that these do not need (its request and response
objects, cookie jar, tracing hooks, a connector's bookkeeping): 0.25 ms of CPU a request against
0.09 ms here, and 0.17 ms more on the path of every job. A request here is a write of its bytes
and a response parsed by `httptools` (uvicorn's parser, in C) as it arrives; a connection goes
back to the idle ones when the server keeps it alive. Files (`/view`), uploads and the websocket
stay on aiohttp, which streams them.

Failures are `OSError`s (`ConnectionError` for a lost or garbled connection) and `TimeoutError`,
which the ComfyUI client's one error boundary (`client.translate_errors`) turns into
`ComfyUIUnavailable`, as it does aiohttp's.
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections import deque
from dataclasses import dataclass
from typing import cast
from urllib.parse import unquote, urlsplit

import httptools

MAX_IDLE = 16  # connections kept open between requests; more at once are closed after their answer
MAX_ANSWER = 64 * 1024 * 1024  # a bigger answer is refused: no JSON answer of ComfyUI's comes near


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    body: bytes


class _Exchange(asyncio.Protocol):
    """One connection: a request written, its response parsed as it comes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._body: list[bytes] = []
        self._size = 0
        self._framed = False  # Content-Length or chunked: else the body ends with the connection
        self._started = False  # a byte of the response came
        self._headed = False  # its status line and headers came whole
        self._kept = False  # the server keeps the connection open after this answer

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is one without subclassing it

    def data_received(self, data: bytes) -> None:
        self._started = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionError(f"ComfyUI's answer could not be parsed: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self._waiter is not None and not self._waiter.done():
            if self._headed and not self._framed:
                self._complete()  # the body ended with the connection (no length, not chunked)
            else:
                self._waiter.set_exception(ConnectionError("ComfyUI closed the connection before it answered"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() in (b"content-length", b"transfer-encoding"):
            self._framed = True

    def on_headers_complete(self) -> None:
        self._headed = True

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_ANSWER:
            self._fail(ConnectionError(f"ComfyUI's answer passed {MAX_ANSWER} bytes"))
            return
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._kept = self._parser.should_keep_alive()  # the parser forgets it once the message is over
        self._complete()

    # the exchange
    def send(self, request: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self._body, self._size = [], 0
        self._framed = self._started = self._headed = self._kept = False
        self.transport.write(request)
        return self._waiter

    @property
    def reusable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()

    @property
    def started(self) -> bool:
        return self._started

    def keep_alive(self) -> bool:
        return self.reusable and self._kept

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _complete(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(Answer(self._parser.get_status_code(), b"".join(self._body)))
        self._body = []

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.close()


class KeepAlive:
    """Requests to one HTTP(S) server (`base_url`, its path a prefix of every request's) over
    connections kept open; `aclose` closes them."""

    def __init__(self, base_url: str, connect_timeout: float) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = url.hostname
        self._port = url.port or (443 if url.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if url.scheme == "https" else None
        self._prefix = url.path.rstrip("/")
        self._connect_timeout = connect_timeout
        host = url.netloc.rpartition("@")[2]
        auth = ""
        if url.username is not None:  # as aiohttp sends a URL's user and password
            pair = f"{unquote(url.username)}:{unquote(url.password or '')}".encode()
            auth = f"Authorization: Basic {base64.b64encode(pair).decode()}\r\n"
        self._fixed = f"Host: {host}\r\n{auth}".encode("latin-1")
        self._idle: deque[_Exchange] = deque()
        self._open: set[_Exchange] = set()

    async def request(
        self, method: str, path: str, body: bytes = b"", content_type: str = "application/json", timeout: float = 60.0
    ) -> Answer:
        """The server's answer to one request (`path` after the base URL's); raises OSError or
        TimeoutError when it cannot be had."""
        head = f"{method} {self._prefix}{path} HTTP/1.1\r\n".encode("latin-1") + self._fixed
        if body or method not in ("GET", "HEAD"):
            head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n".encode("latin-1")
        request = head + b"\r\n" + body
        async with asyncio.timeout(timeout):
            exchange = self._reused()
            if exchange is not None:
                try:
                    return await self._exchange(exchange, request)
                except ConnectionError:
                    # The server closed a kept connection as this request went (its idle timeout):
                    # it read none of it. Once more on a new connection; never after an answer began.
                    if exchange.started:
                        raise
            return await self._exchange(await self._connect(), request)

    async def aclose(self) -> None:
        self._idle.clear()
        for exchange in list(self._open):
            exchange.close()
        self._open.clear()
        await asyncio.sleep(0)  # the transports' close callbacks run

    def _reused(self) -> _Exchange | None:
        while self._idle:
            exchange = self._idle.pop()
            if exchange.reusable:
                return exchange
            self._open.discard(exchange)
        return None

    async def _connect(self) -> _Exchange:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self._connect_timeout):
            _, exchange = await loop.create_connection(
                _Exchange, self._host, self._port, ssl=self._ssl, server_hostname=self._host if self._ssl else None
            )
        self._open.add(exchange)
        return exchange

    async def _exchange(self, exchange: _Exchange, request: bytes) -> Answer:
        try:
            answer = await exchange.send(request)
        except BaseException:  # a timeout or a cancel mid-answer: the connection is of no more use
            exchange.close()
            self._open.discard(exchange)
            raise
        if exchange.keep_alive() and len(self._idle) < MAX_IDLE:
            self._idle.append(exchange)
        else:
            exchange.close()
            self._open.discard(exchange)
        return answer
