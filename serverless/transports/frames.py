"""Websocket messages sent a burst at a time (`Frames`): each message its own frame, as the
protocol has it, but a burst of them in one socket write.

ASGI sends a websocket message per `websocket.send`, and uvicorn writes each to the socket at
once: a burst of ComfyUI messages (a dozen, a fraction of a millisecond apart) costs a dozen
sends on both sides, on the cores the job runs on. Under uvicorn's websockets-sansio protocol
(uvicorn >= 0.35 with websockets >= 14, its default), `Frames` frames the burst with that
protocol's own connection object, so its state stays the protocol's, and writes it once, after
waiting for room as its `send` does. Under any other server or protocol each message is one ASGI
send, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

from starlette.websockets import WebSocket, WebSocketDisconnect


@dataclass(frozen=True, slots=True)
class Message:
    """One websocket message: UTF-8 text (`binary` false) or binary."""

    data: bytes
    binary: bool = False


class _Connection(Protocol):
    """What `Frames` uses of websockets' `ServerProtocol`."""

    def send_text(self, data: bytes) -> None: ...
    def send_binary(self, data: bytes) -> None: ...
    def data_to_send(self) -> list[bytes]: ...


class Frames:
    """Sends `Message`s to an accepted `websocket`, a burst in one write where it can."""

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self._protocol = _sansio_protocol(websocket)

    @property
    def direct(self) -> bool:
        """Whether bursts go out in one write (uvicorn's websockets-sansio protocol)."""
        return self._protocol is not None

    async def send(self, messages: Sequence[Message]) -> None:
        """Send `messages` in order; WebSocketDisconnect when the client is gone."""
        if await self._framed(messages):
            _write(self._protocol)

    def send_now(self, messages: Sequence[Message]) -> bool:
        """Send `messages` in one write without waiting, when that can be done at once (uvicorn's
        websockets-sansio protocol, open, with room in its buffer): True when sent; False, with
        nothing sent, when `send` must do it."""
        protocol = self._protocol
        if protocol is None or not protocol.writable.is_set() or _closing(protocol):
            return False
        try:
            _frame(protocol, messages)
        except WebSocketDisconnect:
            return False  # `send` raises it
        _write(protocol)
        return True

    async def close(self, messages: Sequence[Message] = (), code: int = 1000, reason: str | None = None) -> None:
        """Send `messages`, then the close, in one write where it can (uvicorn's close writes what
        its connection holds with the close frame); WebSocketDisconnect when the client is gone."""
        await self._framed(messages)
        try:
            await self.websocket.close(code, reason)
        except RuntimeError as exc:  # starlette's: closed already
            raise WebSocketDisconnect(1006) from exc

    async def _framed(self, messages: Sequence[Message]) -> bool:
        """`messages` framed in the protocol's connection, left for the next write (True); or,
        under another server, sent one ASGI send each (False)."""
        protocol = self._protocol
        if protocol is None:
            try:
                for message in messages:
                    if message.binary:
                        await self.websocket.send_bytes(message.data)
                    else:
                        await self.websocket.send_text(message.data.decode())
            except RuntimeError as exc:  # starlette's: a send after the close (or the client's)
                raise WebSocketDisconnect(1006) from exc
            return False
        await protocol.writable.wait()  # room in the transport's buffer, as uvicorn's own send waits
        if _closing(protocol):
            raise WebSocketDisconnect(1006)
        _frame(protocol, messages)
        return True


def _closing(protocol: Any) -> bool:
    return bool(protocol.disconnected or protocol.close_sent or protocol.transport.is_closing())


def _frame(protocol: Any, messages: Sequence[Message]) -> None:
    """`messages` framed in the protocol's connection, left for the next write."""
    conn = cast(_Connection, protocol.conn)
    try:
        for message in messages:
            if message.binary:
                conn.send_binary(message.data)
            else:
                conn.send_text(message.data)
    except Exception as exc:  # websockets' InvalidState: the connection is closing
        raise WebSocketDisconnect(1006) from exc


def _write(protocol: Any) -> None:
    """What the protocol's connection holds, in one socket write."""
    protocol.transport.write(b"".join(cast(_Connection, protocol.conn).data_to_send()))


SANSIO = "uvicorn.protocols.websockets.websockets_sansio_impl"
NEEDED = ("conn", "transport", "writable", "disconnected", "close_sent", "handshake_complete")


def _sansio_protocol(websocket: WebSocket) -> Any | None:
    """uvicorn's websockets-sansio protocol serving `websocket` (reached through the `receive`
    it passed the app, a bound method of it), once it has accepted; None for anything else."""
    protocol: Any = getattr(getattr(websocket, "_receive", None), "__self__", None)
    if type(protocol).__module__ != SANSIO or not all(hasattr(protocol, name) for name in NEEDED):
        return None
    conn = protocol.conn
    if not (callable(getattr(conn, "send_text", None)) and callable(getattr(conn, "data_to_send", None))):
        return None
    return protocol if protocol.handshake_complete else None
