"""Request parsing: what callers send, and the clear refusals they get."""

from __future__ import annotations

import json

import pytest

from serverless.client.calls import apply_overrides
from serverless.core.request import parse_run_request, query_flag, split_workflow, validate_task_id
from serverless.errors import InvalidParams

WORKFLOW = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8}}}


def parse(body: object, query: dict[str, str] | None = None, headers: dict[str, str] | None = None):
    raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return parse_run_request(raw, query or {}, headers or {})


def test_bare_workflow_is_accepted():
    request = parse(WORKFLOW)
    assert request.workflow == WORKFLOW
    assert request.extra_data is None
    assert request.task_id is None


def test_wrapper_passes_extra_data_untouched():
    extra = {"api_key_comfy_org": "secret", "extra_pnginfo": {"x": 1}}
    request = parse({"prompt": WORKFLOW, "extra_data": extra})
    assert request.workflow == WORKFLOW
    assert request.extra_data == extra


@pytest.mark.parametrize(
    "body, words",
    [
        (b"", "empty"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"text"', "JSON object"),
        (b"{}", "no nodes"),
        (json.dumps({"nodes": [], "links": [], "version": 0.4}).encode(), "UI-format"),  # converted by the caller
        (json.dumps({"1": "EmptyImage"}).encode(), "node '1'"),
        (json.dumps({"1": {"class_type": ["x"], "inputs": {}}}).encode(), "class_type"),
        (json.dumps({"prompt": WORKFLOW, "extra_data": [1]}).encode(), "extra_data"),
    ],
)
def test_unusable_bodies_are_invalid_params(body, words):
    with pytest.raises(InvalidParams) as caught:
        parse(body)
    assert words in caught.value.message
    assert caught.value.to_payload()["error_code"] == "INVALID_PARAMS"


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, False),
        ("", False),
        ("0", False),
        ("false", False),
        ("FALSE", False),
        (" False ", False),
        ("true", True),
        ("1", True),
        ("yes", True),
        ("True", True),
    ],
)
def test_query_flags_follow_the_compat_rule(value, expected):
    query = {} if value is None else {"output_base64": value}
    assert query_flag(query, "output_base64") is expected


def test_task_id_header_precedence():
    headers = {"x-fc-request-id": "req", "x-fc-trace-id": "trace", "x-fc-async-task-id": "async"}
    assert parse(WORKFLOW, headers=headers).task_id == "async"
    del headers["x-fc-async-task-id"]
    assert parse(WORKFLOW, headers=headers).task_id == "trace"
    del headers["x-fc-trace-id"]
    assert parse(WORKFLOW, headers=headers).task_id == "req"


@pytest.mark.parametrize("task_id", ["..", ".", "../x", "a/b", "/etc/passwd", "%2e%2e", "x" * 129, "a b", "é"])
def test_task_ids_that_could_escape_are_refused(task_id):
    with pytest.raises(InvalidParams):
        validate_task_id(task_id)


@pytest.mark.parametrize("task_id", ["abc", "A-1_2.3", "x" * 128, "..a", "1f0e-uuid"])
def test_ordinary_task_ids_are_accepted(task_id):
    assert validate_task_id(task_id) == task_id


PROMPT_NODE = {
    "prompt": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "save": {"class_type": "SaveImage", "inputs": {"images": ["prompt", 0], "filename_prefix": "p"}},
}


def test_a_node_whose_id_is_prompt_is_a_node_not_the_wrapper():
    assert split_workflow(PROMPT_NODE) == (PROMPT_NODE, None)
    assert split_workflow({"prompt": PROMPT_NODE, "extra_data": {"a": 1}}) == (PROMPT_NODE, {"a": 1})
    assert apply_overrides(PROMPT_NODE, {"prompt.color": 9})["prompt"]["inputs"]["color"] == 9
    assert apply_overrides({"prompt": PROMPT_NODE}, {"prompt.color": 9})["prompt"]["prompt"]["inputs"]["color"] == 9


def test_a_body_that_is_mostly_an_input_image_is_not_weighed_as_big():
    from serverless.inputs.resolve import LOADER_INPUTS
    from serverless.transports.start import BIG_BODY, weighed

    image = "iVBORw0KGgo" * (BIG_BODY // 5)  # base64 of an image's size: the loader's value
    for loader, expected_big in ((("LoadImage", "image"), False), (("MyLoader", "image"), True)):
        workflow = {
            "1": {"class_type": loader[0], "inputs": {"image": image}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
        }
        size = len(json.dumps(workflow))
        assert (weighed(workflow, size, LOADER_INPUTS) >= BIG_BODY) is expected_big
        assert weighed(workflow, size, LOADER_INPUTS | {loader}) < BIG_BODY  # a configured loader's too
    text = {"1": {"class_type": "Note", "inputs": {"text": image}}}  # the same bytes as any other value: big
    assert weighed(text, len(json.dumps(text)), LOADER_INPUTS) >= BIG_BODY
