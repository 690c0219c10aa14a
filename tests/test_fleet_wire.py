"""What crosses Redis, without Redis: specs without credentials, stored terminals without base64,
errors rebuilt from their payloads, the Redis tier's settings."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serverless.core import jsontext
from serverless.core.conversion import Conversion
from serverless.core.credentials import Credentials
from serverless.errors import ComfyUIUnavailable, ExecutionInterrupted, InvalidParams, WorkerLost, error_from_payload
from serverless.fleet.wire import decode_spec, encode_spec, fingerprint
from serverless.jobs.spec import JobSpec, OutputPolicy
from serverless.settings import Settings, SettingsError
from serverless.status.redis import BASE64_NOTE, stored_terminal

SECRET = "s3cr3t-value"


def spec(**changes: object) -> JobSpec:
    values: dict[str, object] = {
        "workflow": {"1": {"class_type": "EmptyImage", "inputs": {}}},
        "extra_data": {"x": 1},
        "mode": "stream",
        "outputs": OutputPolicy(base64=True, oss=True),
        "task_id": "t-1",
        "workflow_id": "wf",
        "credentials": Credentials("AK", SECRET, None),
    }
    return JobSpec(**{**values, **changes})  # type: ignore[arg-type]


def test_a_queued_spec_carries_no_credentials_and_the_worker_uses_its_own() -> None:
    encoded = encode_spec(spec())
    assert SECRET.encode() not in encoded and b"AK" not in encoded
    own = Credentials("worker-ak", "worker-secret", None)
    decoded = decode_spec(encoded, own)
    assert decoded.credentials is own
    assert (decoded.workflow, decoded.extra_data, decoded.outputs, decoded.task_id, decoded.workflow_id) == (
        spec().workflow,
        {"x": 1},
        OutputPolicy(True, True),
        "t-1",
        "wf",
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4),
    max_leaves=12,
)
TEXT = st.text(min_size=1, max_size=40)
SPECS = st.builds(
    JobSpec,
    workflow=st.dictionaries(
        TEXT, st.fixed_dictionaries({"class_type": TEXT, "inputs": st.dictionaries(TEXT, JSON)}), min_size=1
    ),
    extra_data=st.none() | st.dictionaries(TEXT, JSON, max_size=3),
    mode=st.sampled_from(["sync", "stream", "ws", "async"]),
    outputs=st.builds(
        OutputPolicy,
        base64=st.booleans(),
        oss=st.booleans(),
        convert=st.builds(
            Conversion,
            format=st.none() | st.sampled_from(["png", "jpeg", "webp"]),
            quality=st.none() | st.integers(1, 100),
            max_side=st.none() | st.integers(1, 16384),
        ),
        url=st.none() | st.just("http://gateway.example:9000/"),
    ),
    task_id=st.none() | st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True),
    credentials=st.none(),
    owner=st.none() | st.from_regex(r"[0-9a-f]{32}", fullmatch=True),
    big=st.booleans(),
    priority=st.sampled_from(["high", "normal", "low"]),
    idempotency_key=st.none() | TEXT,
    workflow_id=st.none() | TEXT,
    callback_url=st.none() | st.just("https://hooks.example/done?token=x"),
    previews=st.booleans(),
    native=st.booleans(),
    id_made=st.booleans(),
)


@given(SPECS)
def test_every_part_of_a_spec_but_its_credentials_reaches_the_worker(sent: JobSpec) -> None:
    """Parity by construction: what a gateway queues is what a worker runs (nothing dropped)."""
    assert decode_spec(encode_spec(sent), None) == sent


def test_a_queued_spec_carries_its_owner_so_the_workers_log_names_it() -> None:
    assert decode_spec(encode_spec(spec(owner="0f" * 16)), None).owner == "0f" * 16
    assert decode_spec(encode_spec(spec()), None).owner is None


def test_the_idempotency_fingerprint_ignores_the_mode_but_not_the_workflow_nor_the_caller() -> None:
    assert fingerprint(spec()) == fingerprint(spec(mode="async", task_id="other"))
    assert fingerprint(spec()) != fingerprint(spec(workflow={"2": {}}))
    assert fingerprint(spec()) != fingerprint(spec(outputs=OutputPolicy()))
    assert fingerprint(spec(owner="a" * 32)) != fingerprint(spec(owner="b" * 32))


def test_the_stored_terminal_leaves_base64_out_with_a_note_and_marks_a_retry() -> None:
    result = {
        "type": "serverless_api",
        "data": {
            "results": [
                {"output": {"type": "images", "base64": {"content": "iVBORw0KGgo="}}},
                {"output": {"type": "images", "base64": {"content": None}}},
            ]
        },
    }
    stored = json.loads(stored_terminal(jsontext.dumps(result), retried=True))
    assert stored["data"]["results"][0]["output"]["base64"] == {"content": None, "note": BASE64_NOTE}
    assert stored["data"]["results"][1]["output"]["base64"] == {"content": None}
    assert stored["retried"] is True
    plain = jsontext.dumps({"type": "serverless_api", "data": {"results": []}})
    assert stored_terminal(plain, retried=False) is plain


@pytest.mark.parametrize(
    "error",
    [WorkerLost("w"), ExecutionInterrupted("cancelled by request"), ComfyUIUnavailable("down"), InvalidParams("bad")],
)
def test_an_error_read_back_from_redis_has_its_code_and_status(error: Exception) -> None:
    assert isinstance(error, (WorkerLost, ExecutionInterrupted, ComfyUIUnavailable, InvalidParams))
    rebuilt = error_from_payload(error.to_payload())
    assert type(rebuilt) is type(error) and rebuilt.status_code == error.status_code
    assert rebuilt.to_payload() == error.to_payload()


def test_the_defaults_are_the_file_status_log_and_no_queue() -> None:
    settings = Settings.from_env({})
    assert (settings.status.backend, settings.fleet.queue_backend, settings.fleet.role) == ("file", "none", "all")


@pytest.mark.parametrize(
    "env, named",
    [
        ({"QUEUE_BACKEND": "redis"}, "STATUS_BACKEND"),
        ({"ROLE": "worker"}, "QUEUE_BACKEND"),
        ({"ROLE": "boss"}, "ROLE"),
        ({"STATUS_BACKEND": "redis", "REDIS_URL": "http://x"}, "REDIS_URL"),
    ],
)
def test_redis_tier_settings_that_cannot_work_fail_start_up_named(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_the_redis_url_is_kept_out_of_the_settings_repr() -> None:
    settings = Settings.from_env({"STATUS_BACKEND": "redis", "REDIS_URL": f"redis://:{SECRET}@h:6379/0"})
    assert SECRET not in repr(settings)


def test_a_job_spec_imports_no_image_library_nor_bucket_sdk() -> None:
    """A gateway, a client or a test names a spec without loading Pillow, oss2 or obstore."""
    import subprocess
    import sys

    probe = "import sys, serverless.jobs.spec; print(sorted(m for m in ('PIL', 'oss2', 'obstore') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"
