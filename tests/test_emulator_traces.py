"""The emulator against the recorded ComfyUI 0.3.64 traces (tests/fixtures/traces).

Each scenario's requests are replayed, in recorded order, against a fresh emulator process with
real HTTP and websocket clients. Before every outgoing action the replay waits until each socket
has received as many messages as the recording shows at that point, so the run follows the
recorded interleaving. Then it checks: status codes and headers, JSON bodies (key order, value
types and, once normalised, values), and every socket's full message sequence.

Normalised away: prompt ids, server-made client ids and PreviewImage's random file prefix (mapped
recorded -> live as they appear), timestamps, queue numbers (only their sign is kept), tracebacks,
absolute paths in exception messages, and tensor dumps in `current_inputs`. /system_stats and the
input file list of /object_info/LoadImage are compared by shape only.

Scenarios i and p need binary frames and custom nodes the emulator does not have; not replayed.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from tests.servers import InProcessEmulator as Emulator

TRACES = Path(__file__).parent / "fixtures" / "traces"
ALIASED = [
    re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"),
    re.compile(r"^[0-9a-f]{32}$"),
    re.compile(r"ComfyUI_temp_[a-z]{5}"),
]
SHAPE_ONLY = {"/system_stats", "/object_info/LoadImage"}
WAIT = 15.0


def load(name: str) -> dict[str, Any]:
    trace: dict[str, Any] = json.loads((TRACES / f"{name}.json").read_text())
    return trace


@pytest.fixture
def fresh_emulator(tmp_path: Path) -> Iterator[Emulator]:
    emu = Emulator(tmp_path / "emu")
    yield emu
    emu.stop()


@dataclass
class Socket:
    ws: aiohttp.ClientWebSocketResponse
    received: list[Any] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


Hook = Callable[[], Awaitable[Any]]


class Replay:
    """Plays one trace against `url` and checks everything the trace recorded."""

    def __init__(
        self,
        url: str,
        session: aiohttp.ClientSession,
        trace: dict[str, Any],
        after: dict[str, Hook] | None = None,
        on_ws_close: Hook | None = None,
        broadcasts_may_interleave: bool = False,
    ) -> None:
        self.url, self.session, self.trace = url, session, trace
        # In ComfyUI a `status` broadcast from the HTTP handler races the worker thread's messages
        # of another prompt; where a trace caught that race, only each stream's own order is fixed.
        self.broadcasts_may_interleave = broadcasts_may_interleave
        self.after = after or {}
        self.on_ws_close = on_ws_close
        self.aliases: dict[str, str] = {}
        self.sockets: dict[str, Socket] = {}
        self.reply: Reply | None = None

    async def run(self) -> None:
        seen: Counter[str] = Counter()
        for event in self.trace["events"]:
            kind = event["dir"]
            if kind == "ws_in":
                seen[event["ws"]] += event["kind"] == "text"
                continue
            if kind != "http_response":
                await self.sync(seen)
            await getattr(self, kind)(event)
        await self.check_sockets()

    async def sync(self, seen: Counter[str]) -> None:
        for name, count in seen.items():
            await self.wait_for(name, count)

    async def wait_for(self, name: str, count: int) -> None:
        socket = self.sockets[name]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while len(socket.received) < count:
            assert loop.time() < deadline, (
                f"{name}: waited for {count} messages, got {[m['type'] for m in socket.received]}"
            )
            await asyncio.sleep(0.005)

    async def ws_connect(self, event: dict[str, Any]) -> None:
        ws = await self.session.ws_connect(self.url + event["url"])
        socket = Socket(ws)
        socket.reader = asyncio.create_task(self._read(socket))
        self.sockets[event["ws"]] = socket

    async def _read(self, socket: Socket) -> None:
        async for msg in socket.ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                socket.received.append(json.loads(msg.data))

    async def ws_out(self, event: dict[str, Any]) -> None:
        await self.sockets[event["ws"]].ws.send_str(json.dumps(event["msg"]))

    async def ws_close(self, event: dict[str, Any]) -> None:
        if self.on_ws_close is not None:
            await self.on_ws_close()
        else:
            await self.sockets[event["ws"]].ws.close()

    async def http_request(self, event: dict[str, Any]) -> None:
        kwargs: dict[str, Any] = {}
        if "json" in event:
            kwargs["json"] = self.live(event["json"])
        elif "multipart_form" in event:
            kwargs["data"] = upload_form(event["multipart_form"])
        async with self.session.request(event["method"], self.url + self.live(event["path"]), **kwargs) as resp:
            self.reply = Reply(resp.status, dict(resp.headers), await resp.read())

    async def http_response(self, event: dict[str, Any]) -> None:
        reply, where = self.reply, f"{event['method']} {event['path']} ({event.get('label', '')})"
        assert reply is not None
        assert reply.status == event["status"], f"{where}: {reply.status} {reply.body[:300]!r}"
        for header in ("Content-Type", "Content-Disposition"):
            if header in event["headers"]:
                assert reply.headers.get(header) == self.live(event["headers"][header]), where
        if event.get("empty"):
            assert reply.body == b"", where
        elif "binary" in event:
            assert reply.body[:4].hex() == event["binary"]["first16_hex"][:8], where
        elif "json" in event:
            live = json.loads(reply.body)
            self.learn(event["json"], live)
            check(self.live(event["json"]), live, where, exact=event["path"] not in SHAPE_ONLY)
        if event.get("label") in self.after:
            await self.after[event["label"]]()

    async def check_sockets(self) -> None:
        recorded: dict[str, list[Any]] = {}
        for event in self.trace["events"]:
            if event["dir"] == "ws_in" and event["kind"] == "text":
                recorded.setdefault(event["ws"], []).append(event["msg"])
        for name, messages in recorded.items():
            await self.wait_for(name, len(messages))
        await asyncio.sleep(0.2)  # room for unexpected extra messages to show up
        for name, messages in recorded.items():
            live = self.sockets[name].received
            for kind, wanted, got_all in self.streams(messages, live):
                assert [m["type"] for m in got_all] == [m["type"] for m in wanted], f"{name} {kind}"
                for index, (want, got) in enumerate(zip(wanted, got_all, strict=True)):
                    self.learn(want, got)
                    check(self.live(want), got, f"{name} {kind} message {index} ({want['type']})", exact=True)
        for socket in self.sockets.values():
            await socket.ws.close()

    def streams(self, recorded: list[Any], live: list[Any]) -> list[tuple[str, list[Any], list[Any]]]:
        """The sequences whose order must match: all messages, or (where broadcasts may
        interleave) the `status` broadcasts and everything else, each in its own order."""
        if not self.broadcasts_may_interleave:
            return [("all", recorded, live)]

        def split(ms: list[Any], status: bool) -> list[Any]:
            return [m for m in ms if (m["type"] == "status") == status]

        return [
            ("status", split(recorded, True), split(live, True)),
            ("prompt", split(recorded, False), split(live, False)),
        ]

    def learn(self, recorded: Any, live: Any) -> None:
        """Map recorded ids/random names to the live ones found at the same place."""
        if isinstance(recorded, dict) and isinstance(live, dict):
            for key, value in recorded.items():
                if self.live(key) in live:
                    self.learn(value, live[self.live(key)])
        elif isinstance(recorded, list) and isinstance(live, list):
            for pair in zip(recorded, live, strict=False):
                self.learn(*pair)
        elif isinstance(recorded, str) and isinstance(live, str) and recorded != live:
            for pattern in ALIASED:
                old, new = pattern.search(recorded), pattern.search(live)
                if old and new:
                    self.aliases[old.group()] = new.group()

    def live(self, value: Any) -> Any:
        """`value` with recorded ids replaced by the live ones."""
        if isinstance(value, str):
            for old, new in self.aliases.items():
                value = value.replace(old, new)
            return value
        if isinstance(value, dict):
            return {self.live(k): self.live(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.live(v) for v in value]
        return value


def check(expected: Any, actual: Any, where: str, exact: bool) -> None:
    check_shape(expected, actual, where)
    if exact:
        want, got = normalise(expected), normalise(actual)
        assert got == want, f"{where}: {difference(want, got)}"


def difference(want: Any, got: Any, path: str = "") -> str:
    """Where two JSON values first differ, for readable failures."""
    if isinstance(want, dict) and isinstance(got, dict) and list(want) == list(got):
        return next(difference(want[k], got[k], f"{path}.{k}") for k in want if want[k] != got[k])
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return next(difference(w, g, f"{path}[{i}]") for i, (w, g) in enumerate(zip(want, got, strict=False)) if w != g)
    return f"at {path or '.'}: got {got!r}, recorded {want!r}"


def check_shape(expected: Any, actual: Any, where: str) -> None:
    """Same keys in the same order, same JSON types, same lengths for lists of objects."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {actual!r}"
        assert list(actual) == list(expected), f"{where}: keys {list(actual)} != {list(expected)}"
        for key in expected:
            check_shape(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{where}: {actual!r}"
        if any(isinstance(v, (dict, list)) for v in expected + actual):
            assert len(actual) == len(expected), f"{where}: {len(actual)} items, want {len(expected)}"
            for index, pair in enumerate(zip(expected, actual, strict=True)):
                check_shape(*pair, f"{where}[{index}]")
    else:
        assert type(actual) is type(expected), f"{where}: {actual!r} is not like {expected!r}"


def normalise(value: Any, key: str = "") -> Any:
    """Blank out what legitimately differs between two servers (see the module docstring)."""
    if key == "timestamp" or key == "traceback":
        return f"<{key}>"
    if key == "number" and isinstance(value, (int, float)):
        return sign(value)
    if key in ("prompt", "queue_running", "queue_pending") and isinstance(value, list):
        items = [value] if key == "prompt" else value
        if all(isinstance(i, list) and i and isinstance(i[0], (int, float)) for i in items):
            items = [[sign(i[0]), *normalise(i[1:])] for i in items]
            return items[0] if key == "prompt" else items
    if isinstance(value, dict):
        return {k: normalise(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise(v, key) for v in value]
    if isinstance(value, str):
        if key == "exception_message":
            return re.sub(r"/\S*", "<path>", value)
        if value.startswith(("tensor(", "IMAGE batch")):
            return "<tensor>"
    return value


def sign(number: float) -> str:
    return "<-n>" if number < 0 else "<n>"


def upload_form(fields: dict[str, Any]) -> aiohttp.FormData:
    """The recorded multipart fields; files get PNG bytes that differ when recorded lengths do."""
    form = aiohttp.FormData()
    for name, value in fields.items():
        if isinstance(value, dict):
            form.add_field(
                name, png_bytes(value["length"]), filename=value["filename"], content_type=value["content_type"]
            )
        else:
            form.add_field(name, value)
    return form


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", (4, 4), (seed % 256, 40, 200, 255)).save(buffer, format="PNG")
    return buffer.getvalue()


async def replay(url: str, trace: dict[str, Any], **options: Any) -> None:
    async with aiohttp.ClientSession() as session:
        await Replay(url, session, trace, **options).run()


async def configure(url: str, **settings: float) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.post(f"{url}/emulator/config", json=settings) as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def release_node(url: str) -> None:
    """End the hold of the node sleeping its node_delay (POST /emulator/release_node)."""
    async with aiohttp.ClientSession() as session, session.post(f"{url}/emulator/release_node") as resp:
        assert resp.status == 200


@pytest.mark.parametrize(
    "name",
    [
        "a_empty_image_save",
        "a2_feature_flags_handshake",
        "b_upload_loadimage_invert",
        "c_batch3_save",
        "d_invalid_prompts",
        "e_execution_errors",
        "f_cached_resubmit",
        "h_misc_endpoints",
    ],
)
async def test_scenario_replays_as_recorded(fresh_emulator: Emulator, name: str) -> None:
    await replay(fresh_emulator.url, load(name))


async def wait_until_running(url: str) -> None:
    """Until the worker has taken a prompt (GET /queue lists it as running)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    async with aiohttp.ClientSession() as session:
        while True:
            async with session.get(f"{url}/queue") as resp:
                if (await resp.json())["queue_running"]:
                    return
            assert loop.time() < deadline, "the worker took no prompt"
            await asyncio.sleep(0.005)


def hold_nodes_until(url: str, release_after: str, interrupt: str) -> dict[str, Hook]:
    """Replay hooks for a long node_delay (set by the caller): node 1 is released after the
    `release_after` response, node 2 after the `interrupt` response, when holding stops."""

    async def stop_holding() -> None:
        await configure(url, node_delay=0)
        await release_node(url)  # node 2; node 3 then meets the pending interrupt

    return {release_after: lambda: release_node(url), interrupt: stop_holding}


async def test_g_interrupt_and_queue(fresh_emulator: Emulator) -> None:
    """No timing window: every node holds (not interruptible, like the recorded ImageBlur chain)
    until released, so node 1 runs until the third prompt is queued and node 2 until the interrupt
    is sent, as recorded; then nothing holds and the pending interrupt stops the prompt at node 3."""
    url = fresh_emulator.url
    await configure(url, node_delay=3600)
    hooks = hold_nodes_until(url, release_after="queued_3_front", interrupt="interrupt_targeted")
    # As recorded, the worker takes the first prompt (a `status` of 1) before the second is queued.
    hooks["slow_1"] = lambda: wait_until_running(url)
    await replay(url, load("g_interrupt_and_queue"), after=hooks, broadcasts_may_interleave=True)


async def test_j_reconnect_mid_run(fresh_emulator: Emulator) -> None:
    # Node 2 is provably still running across the reconnect and until the interrupt.
    await configure(fresh_emulator.url, node_delay=3600)
    hooks = hold_nodes_until(fresh_emulator.url, release_after="slow", interrupt="interrupt_no_body")
    await replay(fresh_emulator.url, load("j_reconnect_mid_run"), after=hooks)


async def test_j_with_dropped_websockets_instead_of_client_close(fresh_emulator: Emulator) -> None:
    async def drop() -> None:
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{fresh_emulator.url}/emulator/drop_websockets") as resp,
        ):
            assert (await resp.json()) == {"dropped": 1}

    await configure(fresh_emulator.url, node_delay=3600)
    hooks = hold_nodes_until(fresh_emulator.url, release_after="slow", interrupt="interrupt_no_body")
    await replay(fresh_emulator.url, load("j_reconnect_mid_run"), after=hooks, on_ws_close=drop)


async def test_config_hook_reports_and_refuses_unknown_keys(fresh_emulator: Emulator) -> None:
    assert await configure(fresh_emulator.url, step_delay=0.5) == {
        "step_delay": 0.5,
        "node_delay": 0.0,
        "history_delay": 0.0,
        "history_garbage": 0.0,
        "view_status": 0.0,
        "view_delay": 0.0,
        "previews": 1.0,
        "preview_size": 512.0,
        "model_load_delay": 0.0,
        "vram_total": 0.0,
        "model_bytes": 0.0,
        "oom_next": 0.0,
        "leak_bytes": 0.0,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{fresh_emulator.url}/emulator/config", json={"bogus": 1}) as resp,
    ):
        assert resp.status == 400
