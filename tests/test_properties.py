"""Property-based tests (hypothesis) of what callers control: request bodies, query strings,
headers and task ids.

Pure functions first (`parse_run_request`, `prepare_workflow`, `validate_task_id`,
`StatusLog.path`): whatever comes in, the answer is a value or `InvalidParams`, never another
exception (which would be a 500 UNCLASSIFY), and no task id names a file outside the status folder.
Then a smaller run against the app: arbitrary requests get contract answers, never UNCLASSIFY.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from serverless.core.request import TASK_ID_HEADERS, TASK_ID_RE, parse_run_request, validate_task_id
from serverless.core.workflow import SEED_LIMIT, prepare_workflow, safe_instance_suffix
from serverless.errors import InvalidParams, ServerlessError
from serverless.status.log import StatusLog
from tests.helpers import RUN

pytestmark = pytest.mark.timeout(120)

PURE = settings(max_examples=300, deadline=None)
FOLDER = Path("/srv/nas/output/serverless_api")  # never touched: StatusLog.path is pure

# -- strategies -------------------------------------------------------------------------------------


def json_of(texts: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    leaves = st.one_of(
        st.none(),
        st.booleans(),
        texts,
        st.integers(-10, 100),
        st.sampled_from([-1, 2**32, 2**64, -(2**63)]),
        st.floats(allow_nan=True, allow_infinity=True),
    )
    return st.recursive(
        leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4), max_leaves=20
    )


STATUS_OF_CODE = {cls.code: cls.status_code for cls in ServerlessError.__subclasses__()}


def workflows_of(texts: st.SearchStrategy[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts shaped more or less like API-format workflows: nodes with class types and inputs
    (seeds, prefixes...), and anything else in between."""
    values = json_of(texts)
    input_names = st.one_of(st.sampled_from(["seed", "noise_seed", "filename_prefix", "image", "width"]), texts)
    class_types = st.one_of(st.sampled_from(["KSampler", "RandomNoise", "SaveImage", "EmptyImage", "LoadImage"]), texts)

    @st.composite
    def nodes(draw: st.DrawFn) -> Any:
        node: dict[str, Any] = {}
        if draw(st.integers(0, 9)):
            node["class_type"] = draw(st.one_of(class_types, values) if draw(st.booleans()) else class_types)
        if draw(st.integers(0, 9)):
            inputs = st.dictionaries(input_names, st.one_of(st.just(-1), values), max_size=5)
            node["inputs"] = draw(st.one_of(inputs, values))
        if draw(st.booleans()):
            node["_meta"] = {"title": draw(texts)}
        return node if draw(st.integers(0, 9)) else draw(values)

    return st.dictionaries(texts, nodes(), max_size=5)


def documents_of(texts: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """A bare workflow, the `{"prompt", "extra_data"}` wrapper, a UI-format export, or any JSON."""
    values, workflows = json_of(texts), workflows_of(texts)
    return st.one_of(
        workflows,
        st.fixed_dictionaries({"prompt": workflows}, optional={"extra_data": values}),
        st.fixed_dictionaries(
            {"nodes": st.lists(values, max_size=2), "links": st.lists(values, max_size=2)}, optional={"prompt": values}
        ),
        values,
    )


# Text with lone surrogates (JSON carries them as \ud800 escapes) and path characters.
chars = st.one_of(st.characters(), st.sampled_from(["\ud800", "\udfff", "/", "\\", ".", "\x00", "\n"]))
texts = st.text(chars, max_size=20)
json_values = json_of(texts)
workflows = workflows_of(texts)
documents = documents_of(texts)
bodies = st.one_of(
    documents.map(json.dumps),
    documents.map(lambda d: json.dumps(d, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    documents.map(lambda d: json.dumps(d).encode("utf-16")),
    st.binary(max_size=64),
    st.text(chars, max_size=64),
)
task_ids = st.one_of(
    texts,
    st.from_regex(TASK_ID_RE, fullmatch=True),
    st.sampled_from([".", "..", "...", "../x", "a/../../b", "/etc/passwd", "x" * 129, "%2e%2e", "a\x00b", "é"]),
)
header_names = st.one_of(st.sampled_from([*TASK_ID_HEADERS, "x-fc-invocation-type", "content-type"]), texts)
headers = st.dictionaries(header_names, st.one_of(task_ids, texts), max_size=4)
queries = st.dictionaries(
    st.one_of(st.sampled_from(["output_base64", "output_oss", "stream"]), texts),
    st.one_of(st.sampled_from(["", "0", "false", "FALSE", "1", "true", " no "]), texts),
    max_size=4,
)


def lowercase(mapping: dict[str, str]) -> dict[str, str]:
    """Headers as the app sees them: case-insensitive names (Starlette lowercases them)."""
    return {name.lower(): value for name, value in mapping.items()}


# -- request parsing --------------------------------------------------------------------------------


@PURE
@given(body=bodies, query=queries, header_map=headers)
@example(body=b"", query={}, header_map={})
@example(body='{"prompt": {"1": {}}, "extra_data": 3}', query={}, header_map={})
@example(body='{"1": {"inputs": []}}', query={"stream": "0"}, header_map={"x-fc-trace-id": ".."})
@example(body="1" * 5000, query={}, header_map={})  # past int()'s digit limit
def test_parsing_gives_a_request_or_invalid_params(body, query, header_map):
    try:
        request = parse_run_request(body, query, lowercase(header_map))
    except InvalidParams as exc:
        assert exc.message and exc.status_code == 400
        json.dumps(exc.to_payload())
        return
    assert isinstance(request.workflow, dict) and request.workflow
    assert all(isinstance(node, dict) for node in request.workflow.values())
    assert request.extra_data is None or isinstance(request.extra_data, dict)
    assert {request.output_base64, request.output_oss, request.stream} <= {True, False}
    assert request.task_id is None or validate_task_id(request.task_id) == request.task_id


@PURE
@given(query=queries)
def test_query_flags_follow_the_compat_rule(query):
    request = parse_run_request('{"1": {"class_type": "X"}}', query, {})
    for name in ("output_base64", "output_oss", "stream"):
        value = query.get(name)
        expected = value is not None and value.strip().lower() not in ("", "0", "false")
        assert getattr(request, name) is expected


# -- workflow preparation ---------------------------------------------------------------------------


@PURE
@given(document=workflows, instance_id=texts)
def test_preparation_never_fails_never_mutates_and_reports_every_seed(document, instance_id):
    try:
        request = parse_run_request(json.dumps(document), {}, {})
    except InvalidParams:
        return
    before = json.dumps(request.workflow, sort_keys=True)
    original = copy.deepcopy(request.workflow)
    prepared = prepare_workflow(request.workflow, instance_id)
    assert json.dumps(request.workflow, sort_keys=True) == before, "the caller's workflow was changed"
    suffix = "_" + safe_instance_suffix(instance_id)
    for node_id, node in original.items():
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            continue
        after = prepared.workflow[node_id]["inputs"]
        for name in ("seed", "noise_seed"):
            value = inputs.get(name)
            if type(value) is int and value == -1:
                assert prepared.seeds[node_id][name] == after[name]
                assert 0 <= after[name] < SEED_LIMIT
            else:
                assert name not in prepared.seeds.get(node_id, {})
        if isinstance(inputs.get("filename_prefix"), str):
            assert after["filename_prefix"] == inputs["filename_prefix"] + suffix
    assert set(prepared.seeds) <= set(original)


@PURE
@given(instance_id=texts)
def test_instance_suffix_is_a_safe_file_name_part(instance_id):
    suffix = safe_instance_suffix(instance_id)
    assert TASK_ID_RE.fullmatch(suffix) and "." not in suffix and len(suffix) <= 64


# -- task ids and the status folder -----------------------------------------------------------------


@PURE
@given(task_id=task_ids)
def test_task_ids_are_valid_names_or_invalid_params(task_id):
    try:
        assert validate_task_id(task_id) == task_id
    except InvalidParams as exc:
        assert exc.status_code == 400
        json.dumps(exc.to_payload())
        return
    assert TASK_ID_RE.fullmatch(task_id) and task_id not in (".", "..")


@PURE
@given(task_id=task_ids)
def test_no_task_id_names_a_path_outside_the_status_folder(task_id):
    try:
        path = StatusLog(FOLDER, stale_after=60).path(task_id)
    except InvalidParams:
        return
    assert path.parent == FOLDER and path.name == task_id
    assert os.path.normpath(path) == str(path)
    assert os.path.commonpath([FOLDER, os.path.abspath(path)]) == str(FOLDER) and path != FOLDER


@PURE
@given(header_map=headers)
def test_the_task_id_header_is_checked_whichever_carries_it(header_map):
    headers = lowercase(header_map)
    # FC's order: async task id, else trace id, else request id; the first non-empty one counts.
    chosen = next((headers[name] for name in TASK_ID_HEADERS if headers.get(name)), None)
    valid = chosen is not None and TASK_ID_RE.fullmatch(chosen) is not None and chosen not in (".", "..")
    try:
        request = parse_run_request('{"1": {"class_type": "X"}}', {}, headers)
    except InvalidParams:
        assert chosen is not None and not valid, f"{chosen!r} was refused"
        return
    assert request.task_id == chosen and (chosen is None or valid)
    if request.task_id is not None:
        assert StatusLog(FOLDER, stale_after=60).path(request.task_id) == FOLDER / chosen


# -- bugs these properties found (fixed): kept as regressions ------------------------------------


def test_a_deeply_nested_body_is_invalid_params():
    with pytest.raises(InvalidParams):
        parse_run_request("[" * 100_000 + "]" * 100_000, {}, {})


def test_a_deeply_nested_input_is_refused_and_a_deep_enough_one_prepared():
    def body(depth: int) -> str:
        return '{"1": {"class_type": "X", "inputs": {"a": ' + "[" * depth + "]" * depth + "}}}"

    with pytest.raises(InvalidParams, match="nested more than"):
        parse_run_request(body(600), {}, {})
    request = parse_run_request(body(50), {}, {})
    prepared = prepare_workflow(request.workflow, "i-1")
    assert prepared.workflow == request.workflow and prepared.workflow is not request.workflow


# -- against the app --------------------------------------------------------------------------------

http_texts = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=24)
http_headers = st.dictionaries(
    st.sampled_from([*TASK_ID_HEADERS, "x-fc-invocation-type", "x-fc-access-key-id", "content-type"]),
    st.one_of(
        st.sampled_from(["Async", "async", "..", "../../etc/x", "%2e%2e", "a.b_c-1", "x" * 129]),
        st.from_regex(r"[A-Za-z0-9._-]{1,40}", fullmatch=True),
        http_texts,
    ),
    max_size=2,
)
http_queries = st.dictionaries(
    st.sampled_from(["output_base64", "output_oss", "stream", "x"]),
    st.one_of(st.sampled_from(["", "0", "false", "1", "true"]), http_texts),
    max_size=3,
)
# Workflows that may run, kept cheap: small images, the emulator's own node names, odd inputs.
cheap_inputs = st.fixed_dictionaries(
    {
        "width": st.one_of(st.integers(-1, 32), json_values),
        "height": st.integers(1, 16),
        "batch_size": st.integers(0, 2),
        "color": st.integers(0, 255),
    }
)
cheap_workflows = st.one_of(
    st.builds(
        lambda inputs, prefix: {
            "1": {"class_type": "EmptyImage", "inputs": inputs},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
        },
        cheap_inputs,
        st.one_of(st.sampled_from(["p", "../../escape", "sub/dir/p", "/abs", ""]), http_texts),
    ),
    workflows,
)
http_bodies = st.one_of(
    cheap_workflows.map(json.dumps),
    cheap_workflows.map(lambda w: json.dumps({"prompt": w, "extra_data": {"k": 1}})),
    documents.map(json.dumps),
    st.binary(max_size=48),
)


def _terminal(response: requests.Response) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the final payload, reading a stream to its end."""
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        # SSE lines end at CR/LF only: split the bytes (str.splitlines would also split at U+0085).
        data = [line[6:].decode() for line in response.iter_lines() if line.startswith(b"data: ")]
        assert data, "a stream must end with its terminal payload"
        return response.status_code, json.loads(data[-1])
    return response.status_code, response.json()


@settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(body=http_bodies, query=http_queries, header_map=http_headers)
def test_arbitrary_requests_get_contract_answers_never_unclassify(app, body, query, header_map):
    logs = Path(app.log).parent
    status_dir = logs / "status"
    # Where a task id that escaped the folder would land: none of these may appear.
    escapes = {os.path.abspath(status_dir / v) for v in header_map.values() if "\x00" not in v}
    escapes = {path for path in escapes if os.path.dirname(path) != str(status_dir) and not os.path.exists(path)}
    body_bytes = body if isinstance(body, bytes) else body.encode()
    response = requests.post(app.url + RUN, data=body_bytes, params=query, headers=header_map, timeout=30, stream=True)
    status, payload = _terminal(response)
    event(f"{status} {payload.get('error_code') or payload.get('type') or 'task_id'}")
    if status == 202:
        assert set(payload) == {"task_id"} and TASK_ID_RE.fullmatch(payload["task_id"])
    elif payload.get("type") == "serverless_api":
        assert status == 200
    else:
        assert payload.get("type") == "error", payload
        assert payload["error_code"] != "UNCLASSIFY", payload
        streamed = response.headers.get("content-type", "").startswith("text/event-stream")
        assert status == (200 if streamed else STATUS_OF_CODE[payload["error_code"]]), payload
    assert {entry.name for entry in logs.iterdir()} <= {Path(app.log).name, "status"}
    if status_dir.exists():
        for entry in status_dir.iterdir():
            # A task's files: `<task_id>`, `<task_id>~attempt-<n>` and sidecars (`~` is no task id
            # character). A log written after the answer (a sync job nobody named) may still be
            # publishing: its `~tmp-` link can vanish between the listing and the look.
            if not os.path.lexists(entry) and "~tmp-" in entry.name:
                continue
            if entry.name == "~usage" and entry.is_dir():  # usage per key (`tenants.usage`), not a task's
                continue
            assert entry.is_file() and not entry.is_symlink() and TASK_ID_RE.fullmatch(entry.name.split("~")[0])
    assert not [path for path in escapes if os.path.exists(path)]


def test_a_surrogate_echoed_by_comfyui_still_gets_a_contract_error(app):
    # ComfyUI's refusal names the unknown class type; JSON carries the lone surrogate as an escape.
    body = '{"1": {"class_type": "\\ud800", "inputs": {}}}'
    response = requests.post(app.url + RUN, data=body, timeout=30)
    assert response.json()["error_code"] == "PROMPT_ERROR"
