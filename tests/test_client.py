"""serverless.client against real servers (the app under uvicorn, the emulator): every method of
the sync and the async client. `task`, `cancel` and `events` need job control (issue 13) merged."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from serverless.client import AsyncClient, Client, Event, errors
from serverless.client.calls import body_json
from serverless.client.results import decode_content
from serverless.errors import ServerlessError
from tests.helpers import running_prompt, txt2img, wait_until
from tests.servers import ROOT, App, Emulator


@pytest.fixture
def hosted(start_app: Callable[..., App], emulator: Emulator, tmp_path: Path) -> App:
    return start_app(emulator.url, WORKFLOWS_DIR=str(tmp_path / "workflows"))


@pytest.fixture
def client(hosted: App) -> Iterator[Client]:
    with Client(hosted.url) as c:
        yield c


def test_client_error_tree_mirrors_every_server_error_code() -> None:
    def codes(cls: type[ServerlessError]) -> set[str]:
        return {cls.code}.union(*(codes(sub) for sub in cls.__subclasses__()))

    assert codes(ServerlessError) <= set(errors.BY_CODE)


def test_run_returns_typed_outputs_that_save_and_decode(client: Client, tmp_path: Path) -> None:
    result = client.run(txt2img(size=32), overrides={"6.text": "a cat"}, output_base64=True)
    assert result.prompt_id and result.task_id and result.execution_time is not None
    assert isinstance(result.seeds["3"]["seed"], int) and "total_s" in result.timings
    [output] = result.outputs
    assert output.node_id == "9" and output.mime == "image/png" and output.size == len(output.content or b"")
    saved = output.save(tmp_path)
    assert saved == tmp_path / output.filename and saved.read_bytes() == output.content
    assert output.image().size == (32, 32)


def test_run_with_on_event_streams_progress_to_100(client: Client) -> None:
    seen: list[Event] = []
    result = client.run(txt2img(size=16), on_event=seen.append)
    percents = [e.progress.percent for e in seen if e.progress is not None]
    assert percents == sorted(percents) and percents[-1] == 100
    assert seen[-1].terminal and result.outputs[0].content is None  # no base64 asked


def test_stream_yields_comfyui_messages_then_the_terminal(client: Client) -> None:
    events = list(client.stream(txt2img(size=16)))
    assert {"execution_start", "executing", "progress"} <= {e.type for e in events}
    assert events[-1].type == "serverless_api" and all(e.id is not None for e in events)
    assert events[-1].outcome().outputs


def test_refusals_raise_the_mirrored_errors_with_code_and_raw(client: Client) -> None:
    with pytest.raises(errors.InvalidParams) as refused:
        client.run({"nodes": [], "links": []})
    assert refused.value.error_code == "INVALID_PARAMS" and refused.value.status == 400
    bad = {"1": {"class_type": "NoSuchNode", "inputs": {}}}
    with pytest.raises(errors.PromptError) as prompt:
        client.run(bad)
    assert prompt.value.raw is not None
    with pytest.raises(errors.NotFound):
        client.workflow("nosuch")


def test_unreachable_server_is_a_transport_error(dead_url: str) -> None:
    with Client(dead_url) as client, pytest.raises(errors.TransportError):
        client.workflows()


def test_hosted_workflows_register_describe_run_and_delete(client: Client) -> None:
    described = client.register_workflow("t2i", txt2img(size=16))
    assert described["workflow_id"] == "t2i"
    assert [w["workflow_id"] for w in client.workflows()] == ["t2i"]
    assert "6.text" in {p["name"] for p in client.schema("t2i")}
    result = client.run(workflow_id="t2i", overrides={"6.text": "a dog"}, output_base64=True)
    assert result.workflow_id == "t2i" and result.outputs[0].image().size == (16, 16)
    assert client.delete_workflow("t2i")["deleted"] is True
    with pytest.raises(errors.NotFound):
        client.schema("t2i")


def test_versions_and_aliases_from_the_client(client: Client) -> None:
    assert client.register_workflow("v", txt2img(seed=1, size=16))["version"] == 1
    assert client.register_workflow("v", txt2img(seed=2, size=16))["version"] == 2
    assert client.set_alias("v", "prod", 1) == {"workflow_id": "v", "alias": "prod", "version": 1}
    listed = client.versions("v")
    assert [item["version"] for item in listed["versions"]] == [1, 2] and listed["aliases"] == {"prod": 1}
    result = client.run(workflow_id="v@prod")
    assert (result.workflow_id, result.workflow_version) == ("v", 1)
    assert client.run(workflow_id="v@2").workflow_version == 2
    with pytest.raises(errors.Conflict):
        client.delete_workflow("v@1")  # the alias names it


def test_submit_async_then_status_log_reaches_the_result(client: Client) -> None:
    task_id = client.submit_async(txt2img(size=16), task_id="client-async-1")
    assert task_id == "client-async-1"
    log = wait_until(lambda: (events := client.status(task_id)) and events[-1].terminal and events)
    assert log[-1].outcome().task_id == task_id


def test_task_cancel_and_resumed_events(start_app: Callable[..., App], own_emulator: Emulator, tmp_path: Path) -> None:
    """Needs job control (issue 13): GET task, POST cancel, GET events with Last-Event-ID."""
    app = start_app(own_emulator.url)
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.2}, timeout=5).raise_for_status()
    with Client(app.url) as client:
        task_id = client.submit_async(txt2img(steps=100, size=16), task_id="client-cancel-1")
        wait_until(lambda: running_prompt(own_emulator.url))
        assert client.task(task_id)["state"] in ("queued", "running")
        assert client.cancel(task_id) == {"task_id": task_id, "state": "cancelling"}
        events = list(client.events(task_id))
        assert events[-1].type == "error" and events[-1].data is None
        with pytest.raises(errors.ExecutionInterrupted):
            events[-1].outcome()
        resumed = list(client.events(task_id, resume=events[-3].id))
        assert [e.text for e in resumed] == [e.text for e in events[-2:]]
        assert client.task(task_id)["state"] == "cancelled"
        with pytest.raises(errors.Conflict):
            client.cancel(task_id)
        with pytest.raises(errors.NotFound):
            client.task("never-started")


def test_async_client_covers_the_same_methods(hosted: App) -> None:
    async def scenario() -> None:
        async with AsyncClient(hosted.url) as client:
            await client.register_workflow("t2i", txt2img(size=16))
            assert [w["workflow_id"] for w in await client.workflows()] == ["t2i"]
            assert (await client.workflow("t2i"))["parameters"] == await client.schema("t2i")
            result = await client.run(workflow_id="t2i", overrides={"6.text": "x"}, output_base64=True)
            assert result.outputs[0].image().size == (16, 16)
            seen: list[Event] = []
            await client.run(txt2img(size=16), on_event=seen.append)
            assert seen[-1].terminal
            streamed = [event async for event in client.stream(txt2img(size=16))]
            assert streamed[-1].type == "serverless_api"
            task_id = await client.submit_async(txt2img(size=16), task_id="aclient-async-1")

            async def ended() -> bool:
                log = await client.status(task_id)
                return bool(log) and log[-1].terminal

            async with asyncio.timeout(20):
                while not await ended():  # noqa: ASYNC110 (polling the compat status log is the point)
                    await asyncio.sleep(0.05)
            assert (await client.health())["status"] == "ok"
            await client.delete_workflow("t2i")
            with pytest.raises(errors.NotFound):
                await client.workflow("t2i")

    asyncio.run(scenario())


def test_async_client_task_cancel_and_events(start_app: Callable[..., App], own_emulator: Emulator) -> None:
    """Needs job control (issue 13)."""
    app = start_app(own_emulator.url)
    requests.post(own_emulator.url + "/emulator/config", json={"step_delay": 0.2}, timeout=5).raise_for_status()

    async def scenario() -> None:
        async with AsyncClient(app.url) as client:
            task_id = await client.submit_async(txt2img(steps=100, size=16), task_id="aclient-cancel-1")
            await asyncio.to_thread(wait_until, lambda: running_prompt(own_emulator.url))
            assert (await client.task(task_id))["state"] in ("queued", "running")
            assert (await client.cancel(task_id))["state"] == "cancelling"
            events = [event async for event in client.events(task_id)]
            assert json.loads(events[-1].text)["error_code"] == "EXECUTION_INTERRUPTED"

    asyncio.run(scenario())


SERVER_ONLY = (
    "starlette",
    "uvicorn",
    "aiohttp",
    "sse_starlette",
    "oss2",
    "PIL",
    "swagger_ui_bundle",
    "prometheus_client",
    "redis",
    "orjson",
    "pybase64",
    "yarl",
)
LIGHT = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {SERVER_ONLY!r}:
            raise ImportError("not installed: " + name)
sys.meta_path.insert(0, Refuse())
from serverless.client import Client
from serverless.cli import main
with Client(sys.argv[1]) as client:
    assert client.health()
sys.exit(main(["--url", sys.argv[1], "workflows", "list"]))
"""


def test_the_client_and_cli_need_only_the_client_requirements(app: App) -> None:
    """`pip install -r requirements-client.txt && pip install --no-deps .`: the server's dependencies absent."""
    done = subprocess.run([sys.executable, "-c", LIGHT, app.url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    client, runtime = (requirements(ROOT / name) for name in ("requirements-client.txt", "requirements.txt"))
    assert [req.split(">")[0] for req in client] == ["httpx", "rich"] and set(client) <= set(runtime)


def requirements(path: Path) -> list[str]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


@pytest.mark.parametrize(
    "value",
    [
        {"1": {"class_type": "LoadImage", "inputs": {"image": "QUJD" * 1000}}},
        {"a": [1.5, -0.0, 1e16, None, True], "b": "é\u2028"},
        {"a": float("nan"), "b": float("inf")},  # json's spelling, which orjson would write as null
        {"a": 2**70},  # past 64 bits: orjson refuses, json writes it
        {1: "a non-str key"},
    ],
)
def test_a_request_body_reads_back_as_json_would_have_written_it(value: object) -> None:
    written = body_json(value)
    assert json.dumps(json.loads(written)) == json.dumps(json.loads(json.dumps(value)))


def test_a_request_body_refuses_what_json_refuses() -> None:
    with pytest.raises(TypeError):
        body_json({"when": datetime.datetime.now()})


@pytest.mark.parametrize("text", ["", "QUJD", "QQ==", "QQ", "QQ=", "QUJD====", "QU JD", "QU-_", "é", "QUJD" * 50000])
def test_an_outputs_base64_decodes_as_the_standard_librarys_strict_decoder_does(text: str) -> None:
    def decoded(decode: Callable[[str], bytes]) -> object:
        try:
            return decode(text)
        except ValueError:
            return "refused"

    assert decoded(decode_content) == decoded(lambda t: base64.b64decode(t, validate=True))
