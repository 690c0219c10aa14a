"""An HTTP response's head and body in one socket write (`HttpProtocol`, uvicorn's httptools
protocol over `OneWrite`).

uvicorn writes a response's status line and headers as the app sends `http.response.start`, and
its body as it sends `http.response.body`: two writes, so two TCP segments on a socket without
Nagle's delay, and a client woken twice to read one small answer (the head, then the body), on
the same cores the jobs run on. `OneWrite` holds a response's head until the next write in the
same turn of the event loop, which it joins: a body sent at once (a JSON answer, a small file)
goes out with its head in one write; a stream whose first chunk comes later gets its head at the
end of the turn, as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEAD = b"HTTP/1."  # what a response's first write starts with (uvicorn writes the head alone)
JOIN_UP_TO = 64 * 1024  # a bigger body goes beside its head (one writelines), not copied behind it


class OneWrite:
    """A transport whose writes of a response's head wait, until the end of the turn at most,
    for the next write to go with it; everything else is the transport's own."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            if len(data) > JOIN_UP_TO:  # megabytes of a JSON answer: not copied twice to be joined
                held, self._held = self._held, None
                self._transport.writelines((held, data))
                return
            data, self._held = self._held + bytes(data), None
        elif bytes(data[: len(HEAD)]) == HEAD and not self._transport.is_closing():
            self._held = bytes(data)
            asyncio.get_running_loop().call_soon(self._flush)
            return
        self._transport.write(data)

    def writelines(self, chunks: Any) -> None:  # after a held head, never before it
        self.write(b"".join(chunks))

    def _flush(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, its responses written head and body at once (`OneWrite`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(OneWrite(transport))  # type: ignore[arg-type]
