"""The progress model (pure), fed with the messages a real ComfyUI sent (recorded traces)."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from serverless.core.messages import Message, parse_message
from serverless.jobs.progress import Learned, Progress, workflow_nodes

TRACES = Path(__file__).parent / "fixtures" / "traces"


def recorded(scenario: str) -> tuple[dict, str, list[Message]]:
    """The first submitted prompt of a trace, its id, and every text message of the trace."""
    events = json.loads((TRACES / f"{scenario}.json").read_text())["events"]
    submit = next(e for e in events if e["dir"] == "http_request" and e.get("path") == "/prompt")
    answer = next(e for e in events if e["dir"] == "http_response" and e.get("path") == "/prompt")
    texts = [json.dumps(e["msg"]) for e in events if e["dir"] == "ws_in" and e.get("kind") == "text"]
    return submit["json"]["prompt"], answer["json"]["prompt_id"], [m for t in texts if (m := parse_message(t))]


def test_a_recorded_run_rises_to_99_then_100_when_it_succeeds():
    workflow, prompt_id, messages = recorded("c_batch3_save")
    progress = Progress("t", prompt_id, workflow_nodes(workflow), created=0.0)
    seen = [progress.payload(0.0, 1e9)["data"]]
    for now, message in enumerate(messages, start=1):
        if progress.observe(message, float(now)):
            seen.append(progress.payload(float(now), 1e9)["data"])
    assert seen[0]["state"] == "queued" and seen[0]["percent"] == 0
    assert any(s["state"] == "running" and s["queue_position"] == 0 for s in seen)
    percents = [s["percent"] for s in seen]
    assert percents == sorted(percents) and percents[-1] == 99.0
    progress.end("succeeded", float(len(messages) + 1))
    final = progress.payload(float(len(messages) + 2), 1700000000.1234)["data"]
    assert final["state"] == "succeeded" and final["percent"] == 100 and final["node"] is None
    assert final["at"] == 1700000000.123  # the Unix time of the event, for the task summary


def test_the_running_node_and_its_steps_are_reported_with_an_eta():
    nodes = {
        "3": {"class_type": "KSampler", "inputs": {}, "_meta": {"title": "Sampler"}},
        "9": {"class_type": "SaveImage", "inputs": {}},
    }
    progress = Progress("t", "p", workflow_nodes(nodes), created=0.0)
    assert progress.queued_at(2, 3) and progress.payload(0, 1e9)["data"]["queue_position"] == 2
    msg = parse_message('{"type": "executing", "data": {"node": "3", "prompt_id": "p"}}')
    assert msg is not None and progress.observe(msg, 1.0)
    step = parse_message('{"type": "progress", "data": {"value": 5, "max": 10, "node": "3", "prompt_id": "p"}}')
    assert step is not None and progress.observe(step, 2.0)
    data = progress.payload(2.0, 1e9)["data"]
    assert data["node"] == {"id": "3", "class_type": "KSampler", "title": "Sampler"}
    # 0.2 s a step (5 steps in the second since the node began): 5 steps left, and SaveImage
    # weighed as one step until a plain node was timed; 2 s gone of 3.2.
    assert data["eta_s"] == 1.2 and data["percent"] == 62.5 and data["queue_position"] == 0
    other = parse_message('{"type": "progress", "data": {"value": 9, "max": 10, "prompt_id": "other"}}')
    assert other is not None and not progress.observe(other, 3.0)  # another prompt's message


kinds = st.sampled_from(["execution_start", "execution_cached", "executing", "progress", "executed", "status"])
messages = st.lists(
    st.builds(
        lambda kind, node, value, maximum, prompt: json.dumps(
            {"type": kind, "data": {"node": node, "nodes": [node], "value": value, "max": maximum, "prompt_id": prompt}}
        ),
        kinds,
        st.sampled_from(["1", "2", "3", None]),
        st.integers(-5, 20),
        st.integers(-1, 20),
        st.sampled_from(["p", "q"]),
    ),
    max_size=60,
)


@given(texts=messages, outcome=st.sampled_from(["succeeded", "failed", "cancelled"]))
def test_percent_never_goes_backwards_and_is_100_only_on_success(texts, outcome):
    nodes = {str(i): {"class_type": "X", "inputs": {}} for i in (1, 2, 3)}
    progress = Progress("t", "p", workflow_nodes(nodes), created=0.0)
    last = 0.0
    for now, text in enumerate(texts):
        message = parse_message(text)
        assert message is not None
        progress.observe(message, float(now))
        percent = progress.payload(float(now), 1e9)["data"]["percent"]
        assert last <= percent <= 99.0
        last = percent
    progress.end(outcome, 100.0)
    final = progress.payload(101.0, 1e9)["data"]
    assert final["state"] == outcome and (final["percent"] == 100) == (outcome == "succeeded")
    assert final["percent"] >= last


def message(kind: str, **data: object) -> Message:
    parsed = parse_message(json.dumps({"type": kind, "data": {"prompt_id": "p", **data}}))
    assert parsed is not None
    return parsed


def sampler_workflow(steps: int = 10) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
        "2": {"class_type": "KSampler", "inputs": {"steps": steps}},
        "3": {"class_type": "SaveImage", "inputs": {}},
    }


def test_steps_are_read_from_a_sampler_and_narrowed_by_an_advanced_one() -> None:
    nodes = workflow_nodes(
        {
            "1": {"class_type": "KSampler", "inputs": {"steps": 30}},
            "2": {"class_type": "KSamplerAdvanced", "inputs": {"steps": 30, "start_at_step": 10, "end_at_step": 10000}},
            "3": {"class_type": "SaveImage", "inputs": {"steps": ["1", 0]}},  # a link, not a number
        }
    )
    assert [nodes[n]["steps"] for n in ("1", "2", "3")] == [30, 20, None]


def test_no_eta_until_a_step_is_timed_then_time_and_steps_agree() -> None:
    progress = Progress("t", "p", workflow_nodes(sampler_workflow()), created=0.0)
    progress.observe(message("execution_start"), 0.1)
    progress.observe(message("executing", node="1"), 0.1)
    progress.observe(message("executing", node="2"), 0.5)  # the loader took 0.4 s
    assert "eta_s" not in progress.payload(0.5, 1e9)["data"]
    progress.observe(message("progress", node="2", value=1, max=10), 1.5)
    progress.observe(message("progress", node="2", value=2, max=10), 2.5)  # 1 s a step
    data = progress.payload(2.5, 1e9)["data"]
    # 8 steps left (8 s) and SaveImage weighed as the mean plain node (the loader's 0.4 s)
    assert data["eta_s"] == 8.4 and data["percent"] == round(100 * 2.5 / 10.9, 1)


def test_cached_nodes_count_as_done() -> None:
    progress = Progress("t", "p", workflow_nodes(sampler_workflow()), created=0.0)
    progress.observe(message("execution_cached", nodes=["1", "2"]), 0.1)
    progress.observe(message("executing", node="3"), 0.1)
    # the loader (1 unit) and the sampler (10 steps, 5 units each) cached: 51 of 52 units
    assert progress.payload(0.1, 1e9)["data"]["percent"] == round(100 * 51 / 52, 1)


def test_a_learned_step_time_gives_an_eta_before_the_first_step() -> None:
    learned = Learned(duration=12.0, step_time=1.0, tail=0.2)
    progress = Progress("t", "p", workflow_nodes(sampler_workflow()), created=0.0, learned=learned)
    progress.observe(message("execution_start"), 0.1)
    progress.observe(message("executing", node="1"), 0.1)
    progress.observe(message("executing", node="2"), 0.5)
    assert progress.payload(0.5, 1e9)["data"]["eta_s"] == 10.6  # 10 steps, the tail, SaveImage as the loader


def test_noting_messages_then_weighing_when_an_event_may_go_tells_what_observing_each_tells() -> None:
    # A job notes every message and weighs the estimate only when an event may go (a change of
    # state at once, else at most every 0.25 s): what it then publishes is what a progress that
    # observed each message would publish at that moment.
    workflow, prompt_id, messages = recorded("c_batch3_save")
    noted = Progress("t", prompt_id, workflow_nodes(workflow), created=0.0)
    observed = Progress("t", prompt_id, workflow_nodes(workflow), created=0.0)
    published = [noted.payload(0.0, 1e9)["data"]]  # the job's first event: queued
    last = 0.0
    for n, each in enumerate(messages, start=1):
        now = n * 0.1
        observed.observe(each, now)
        if noted.note(each, now) or now - last >= 0.25:
            if noted.refresh(now):
                published.append(noted.payload(now, 1e9)["data"])
                assert published[-1] == observed.payload(now, 1e9)["data"]
            last = now
    assert [p["state"] for p in published[:2]] == ["queued", "running"] and len(published) < len(messages)
    noted.refresh(len(messages) * 0.1)
    assert not noted.refresh(len(messages) * 0.1)  # nothing new since the last weighing
    assert noted.payload(9.9, 1e9) == observed.payload(9.9, 1e9)  # noted all along: the same state
    assert not noted.note(message("progress", value=1, max=2), 10.0)  # not its prompt ("p")
