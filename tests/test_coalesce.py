"""A response's head and body in one socket write (`serverless.transports.coalesce`): counted on
a real uvicorn socket, and the transport's rules one by one."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import requests

from serverless.transports.coalesce import OneWrite
from tests.servers import InProcessApp, InProcessEmulator


class Recorded:
    """A transport that records its writes."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def writelines(self, chunks: Any) -> None:  # one write of them all, as uvloop's writev
        self.writes.append(b"".join(bytes(chunk) for chunk in chunks))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1)}.get(name, default)


async def test_a_head_goes_with_the_body_written_in_the_same_turn() -> None:
    transport = Recorded()
    one = OneWrite(transport)  # type: ignore[arg-type]
    one.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    one.write(b"{}")
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
    await asyncio.sleep(0)
    assert len(transport.writes) == 1, "nothing left to flush"


async def test_a_big_body_goes_beside_its_head_in_one_writelines() -> None:
    transport = Recorded()
    one = OneWrite(transport)  # type: ignore[arg-type]
    body = memoryview(b"x" * (2 * 1024 * 1024))[: 1024 * 1024]  # a JSON answer's first slice
    one.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2097152\r\n\r\n")
    one.write(body)
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2097152\r\n\r\n" + bytes(body)]
    one.write(body)
    assert len(transport.writes) == 2 and transport.writes[1] == bytes(body)


async def test_a_head_alone_goes_out_at_the_end_of_the_turn_and_other_writes_at_once() -> None:
    transport = Recorded()
    one = OneWrite(transport)  # type: ignore[arg-type]
    one.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    assert transport.writes == [] and one.get_write_buffer_size() > 0
    await asyncio.sleep(0)
    assert transport.writes == [b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"]
    one.write(b"\x81\x02hi")  # a websocket frame, a stream's chunk: at once
    assert transport.writes[-1] == b"\x81\x02hi"
    assert one.get_extra_info("peername") == ("127.0.0.1", 1)


async def test_writelines_goes_after_a_held_head() -> None:
    transport = Recorded()
    one = OneWrite(transport)  # type: ignore[arg-type]
    one.write(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
    one.writelines([b"\x81\x01a", b"\x81\x01b"])  # a burst of websocket frames (`frames.py`)
    assert transport.writes == [b"HTTP/1.1 101 Switching Protocols\r\n\r\n\x81\x01a\x81\x01b"]


async def test_a_close_sends_the_head_it_holds_first() -> None:
    transport = Recorded()
    one = OneWrite(transport)  # type: ignore[arg-type]
    one.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    one.close()
    assert transport.writes == [b"HTTP/1.1 400 Bad Request\r\n\r\n"] and transport.closed
    await asyncio.sleep(0)
    assert len(transport.writes) == 1, "not sent twice"


@pytest.mark.timeout(60)
def test_the_apps_json_answer_comes_in_one_segment(tmp_path: Any) -> None:
    """A client reading the socket as the answer arrives finds head and body together."""
    emulator = InProcessEmulator(tmp_path / "emulator")
    app = InProcessApp(tmp_path, {"COMFYUI_URL": emulator.url, "STATUS_DIR": str(tmp_path / "status")})
    try:
        assert requests.get(app.url + "/prompt", timeout=10).status_code == 200
        host, port = app.url.removeprefix("http://").split(":")
        for _ in range(5):
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                sock.sendall(b"GET /prompt HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                first = sock.recv(65536)
            head, _, body = first.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and body.startswith(b"{"), first
    finally:
        app.stop()
        emulator.stop()
