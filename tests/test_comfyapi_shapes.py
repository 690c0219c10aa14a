"""ComfyUI's and Comfy API v2's shapes made from our logs (pure: `comfyapi.history`, `comfyapi.jobview`)."""

from __future__ import annotations

import base64
import json
import struct

from serverless.comfyapi import history, jobview
from serverless.comfyapi.index import CLIENT_KEEP, MemoryIndex, PromptEntry

ENTRY = PromptEntry(
    "p1",
    7,
    {"1": {"class_type": "EmptyImage", "inputs": {}}, "2": {"class_type": "SaveImage", "inputs": {}}},
    "c1",
    ("2",),
)
IMAGE = {"filename": "a_00001_.png", "subfolder": "", "type": "output"}
LOG = [
    {"type": "serverless_progress", "data": {"state": "queued", "percent": 0, "at": 100.0}},
    {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}, "sid": "worker-socket"}},
    {"type": "execution_start", "data": {"prompt_id": "p1", "timestamp": 1}},
    {"type": "executing", "data": {"node": "2", "display_node": "2", "prompt_id": "p1"}},
    {"type": "executed", "data": {"node": "2", "display_node": "2", "output": {"images": [IMAGE]}, "prompt_id": "p1"}},
    {"type": "execution_success", "data": {"prompt_id": "p1", "timestamp": 2}},
    {"type": "executing", "data": {"node": None, "prompt_id": "p1"}},
    {"type": "serverless_progress", "data": {"state": "succeeded", "percent": 100, "at": 101.0}},
    {
        "type": "serverless_api",
        "data": {
            "timings": {"queued_s": 0.01, "execution_s": 0.5},
            "results": [
                {
                    "node_id": "2",
                    "batch_id": 0,
                    "output": {"type": "images", "raw": IMAGE, "mime": "image/png", "bytes": 10},
                }
            ],
        },
    },
]


def test_ws_relays_comfyuis_messages_but_not_ours_nor_the_workers_greeting() -> None:
    relayed = [history.relayed(json.dumps(payload)) for payload in LOG]
    assert [message["type"] for message in relayed if message] == [
        "execution_start",
        "executing",
        "executed",
        "execution_success",
        "executing",
    ]
    assert history.is_end(LOG[6], "p1") and not history.is_end(LOG[3], "p1")


def test_history_entry_has_comfyuis_shape() -> None:
    entry = history.history_entry(ENTRY, LOG)
    assert entry == {
        "prompt": [7, "p1", ENTRY.workflow, {"client_id": "c1"}, ["2"]],
        "outputs": {"2": {"images": [IMAGE]}},
        "status": {
            "status_str": "success",
            "completed": True,
            "messages": [["execution_start", LOG[2]["data"]], ["execution_success", LOG[5]["data"]]],
        },
        "meta": {"2": {"node_id": "2", "display_node": "2", "parent_node": None, "real_node_id": "2"}},
    }
    assert history.history_entry(ENTRY, LOG[:-1]) is None, "a prompt still running has no history"


def test_a_prompt_comfyui_has_ended_has_its_history_before_the_job_publishes_its_end() -> None:
    """One box answers `/history` as ComfyUI's own does once ComfyUI ended the prompt: the same
    entry the job's end then gives; an error ComfyUI told is an error."""
    told = LOG[:-2]  # ComfyUI's last message is in, the job's end is not
    assert history.history_entry(ENTRY, told, by_comfyui=True) == history.history_entry(ENTRY, LOG)
    failure = {"type": "execution_error", "data": {"prompt_id": "p1", "node_id": "2", "exception_message": "x"}}
    entry = history.history_entry(ENTRY, [*LOG[:4], failure, LOG[6]], by_comfyui=True)
    assert entry is not None and entry["status"]["status_str"] == "error" and entry["status"]["completed"] is False
    assert entry["status"]["messages"][-1] == ["execution_error", failure["data"]]


def test_a_job_that_ended_before_comfyui_told_ends_as_comfyui_ends_a_prompt() -> None:
    error = {"type": "error", "error_code": "TIMEOUT", "error_message": "too slow", "raw": None}
    closing = [json.loads(text) for text in history.closing("p1", error)]
    assert [message["type"] for message in closing] == ["execution_error", "executing"]
    assert closing[-1]["data"] == {"node": None, "prompt_id": "p1"}
    entry = history.history_entry(ENTRY, [LOG[0], error])
    assert entry is not None and entry["status"]["status_str"] == "error"
    assert entry["status"]["messages"][0][0] == "execution_error"


def test_a_preview_event_becomes_comfyuis_binary_frame() -> None:
    event = {"type": "serverless_preview", "data": {"mime": "image/jpeg", "base64": base64.b64encode(b"JPEG").decode()}}
    assert history.preview_frame(json.dumps(event)) == struct.pack(">II", 1, 1) + b"JPEG"
    assert history.preview_frame(json.dumps(LOG[2])) is None


def test_a_v2_job_from_a_log() -> None:
    job = jobview.job(ENTRY, LOG, now=200.0, retention=3600, base="http://gw")
    assert job["status"] == "succeeded" and job["progress"]["value"] == 1.0
    (output,) = job["outputs"]
    assert output["id"] == "out~p1~2~images~0" and output["url"] == f"http://gw/api/v2/assets/{output['id']}/content"
    assert output["type"] == "image" and output["name"] == "a_00001_.png"
    assert jobview.parse_output_id(output["id"]) == "p1" and jobview.parse_output_id("uuid") is None
    assert job["metrics"] == {"queue_ms": 10, "execution_ms": 500}
    running = jobview.job(ENTRY, LOG[:4], now=200.0, retention=3600, canceling=True)
    assert running["status"] == "canceling" and running["progress"]["current_node"] == "2"


def test_a_preview_event_becomes_api_v2s_preview() -> None:
    event = {"type": "serverless_preview", "data": {"node": "3", "mime": "image/jpeg", "base64": "QUJD", "step": 2}}
    assert jobview.preview(event) == {"node_id": "3", "content_type": "image/jpeg", "data_base64": "QUJD"}


async def test_a_websocket_client_past_the_prompts_kept_for_it_still_gets_each_new_one() -> None:
    index = MemoryIndex()
    cursor = await index.client_cursor("c1")
    for number in range(CLIENT_KEEP + 2):
        await index.add(PromptEntry(f"t{number}", number, {}, "c1"))
        tasks, cursor = await index.client_tasks("c1", cursor)
        assert tasks == [f"t{number}"], "the one just queued, once"
    late = await index.client_cursor("c1")  # a client connecting now: its prompts from now on
    await index.add(PromptEntry("next", CLIENT_KEEP + 2, {}, "c1"))
    assert (await index.client_tasks("c1", late))[0] == ["next"]


def test_messages_passed_on_unparsed_are_those_relayed_as_they_are() -> None:
    queue = {"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 0}}}}
    progress = {"type": "progress", "data": {"value": 1, "max": 3, "prompt_id": "p1", "node": "3"}}
    no_node = {"type": "executing", "data": {"prompt_id": "p1"}}  # no node at all: ComfyUI's end too
    payloads = [*LOG, queue, progress, no_node]
    as_is = [history.relayed_as_is(json.dumps(payload)) for payload in payloads]
    # ours, the worker's greeting, then ComfyUI's messages; its last (`executing` with no node) is parsed
    assert as_is == [False, False, True, True, True, True, False, False, False, True, True, False]
    for payload in payloads:
        text = json.dumps(payload)
        message = history.relayed(text)
        if history.relayed_as_is(text):  # what is passed on unparsed is what parsing would pass on
            assert message is not None and not history.is_end(message, "p1"), text
        assert history.ends_prompt(text, "p1") == (message is not None and history.is_end(message, "p1")), text
