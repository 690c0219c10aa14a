"""Hosted workflows, the pure part: schema, validation, overrides and the OpenAPI document,
against the emulator's `/object_info` and the real ComfyUI 0.3.64 subset (no servers)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi

import comfyui_emulator
from serverless.errors import InvalidParams
from serverless.inputs.resolve import LOADER_INPUTS
from serverless.workflows.openapi import openapi_document
from serverless.workflows.overrides import merge, parse_overrides, positive_prompt_node
from serverless.workflows.schema import build_schema, node_inputs, parse_input_spec
from serverless.workflows.validate import (
    node_errors,
    prompt_error,
    validate_overrides,
    validate_workflow,
)
from tests.helpers import FIXTURES, txt2img

# What the emulator answers to /object_info (its own file: the schema tests follow the emulator).
OBJECT_INFO: dict[str, Any] = json.loads((Path(comfyui_emulator.__file__).parent / "object_info.json").read_text())
REAL = json.loads((FIXTURES / "traces" / "object_info_subset.json").read_text())["full_entries"]
WORKFLOW = txt2img(seed=5, steps=4, size=64)


def schema_of(workflow: dict[str, Any], info: dict[str, Any] = OBJECT_INFO) -> dict[str, dict[str, Any]]:
    return {p.key: p.to_payload() for p in build_schema(workflow, info, LOADER_INPUTS)}


def kinds(problems: list[Any]) -> list[tuple[str, str | None, str]]:
    return [(p.node_id, p.input, p.kind) for p in problems]


def test_schema_of_the_fc_txt2img_lists_its_literal_inputs_with_ranges_and_options() -> None:
    schema = schema_of(WORKFLOW)
    assert schema["3.seed"]["type"] == "INT"
    assert schema["3.seed"]["spec"]["min"] == 0 and schema["3.seed"]["spec"]["default"] == 5
    assert "-1" in schema["3.seed"]["note"]
    assert schema["3.steps"]["spec"] == {"default": 4, "min": 1, "max": 10000}
    sampler = OBJECT_INFO["KSampler"]["input"]["required"]["sampler_name"][0]
    assert schema["3.sampler_name"]["type"] == "COMBO" and schema["3.sampler_name"]["spec"]["options"] == sampler
    assert schema["6.text"]["type"] == "STRING" and schema["6.text"]["spec"]["multiline"] is True
    assert schema["6.text"]["title"] == "CLIP文本编码(提示)"
    assert schema["4.ckpt_name"]["type"] == "COMBO"
    assert "sd-v1-5-inpainting.ckpt" in schema["4.ckpt_name"]["spec"]["options"]
    assert schema["5.width"]["spec"] == {"default": 64, "min": 16, "max": 16384, "step": 8}
    assert "3.model" not in schema and "6.clip" not in schema  # links are not parameters
    assert schema["9.filename_prefix"]["loader"] is False


def test_both_combo_forms_and_the_real_comfyui_entries_are_read() -> None:
    old = parse_input_spec([["a", "b"], {"tooltip": "x"}], True)
    new = parse_input_spec(["COMBO", {"options": ["a", "b"], "default": "a"}], False)
    assert old.type == new.type == "COMBO" and old.options == new.options == ("a", "b")
    assert not new.required and new.default == "a"
    real = node_inputs(REAL, "SaveAnimatedWEBP")
    assert real is not None
    assert real["method"].options == ("default", "fastest", "slowest")
    assert real["lossless"].type == "BOOLEAN" and real["fps"].minimum == 0.01
    assert "prompt" not in real  # hidden inputs are ComfyUI's own


def test_loader_inputs_are_marked_and_take_any_string() -> None:
    workflow = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "https://example.com/cat.png"}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "x"}},
    }
    assert validate_workflow(workflow, REAL, LOADER_INPUTS) == []
    assert schema_of(workflow, REAL)["1.image"]["loader"] is True


def test_a_valid_workflow_has_no_problems_and_a_seed_of_minus_one_is_allowed() -> None:
    assert validate_workflow(txt2img(seed=-1), OBJECT_INFO, LOADER_INPUTS) == []


def test_every_problem_of_a_bad_registration_is_listed_in_node_errors_shape() -> None:
    bad = copy.deepcopy(WORKFLOW)
    bad["3"]["inputs"]["steps"] = 0  # below min
    bad["3"]["inputs"]["sampler_name"] = "no-such-sampler"  # not in options
    bad["3"]["inputs"]["cfg"] = "eight"  # wrong type
    del bad["5"]["inputs"]["height"]  # required missing
    bad["8"]["inputs"]["vae"] = ["4", 7]  # no such slot
    bad["8"]["inputs"]["samples"] = ["4", 0]  # MODEL into LATENT
    bad["7"]["inputs"]["clip"] = ["99", 1]  # no such node
    bad["10"] = {"class_type": "NoSuchNode", "inputs": {}}
    problems = validate_workflow(bad, OBJECT_INFO, LOADER_INPUTS)
    assert sorted(kinds(problems)) == sorted(
        [
            ("3", "cfg", "invalid_input_type"),
            ("3", "steps", "value_smaller_than_min"),
            ("3", "sampler_name", "value_not_in_list"),
            ("5", "height", "required_input_missing"),
            ("7", "clip", "bad_linked_input"),
            ("8", "samples", "return_type_mismatch"),
            ("8", "vae", "bad_linked_input"),
            ("10", None, "unknown_class_type"),
        ]
    )
    errors = node_errors(problems)
    steps = next(e for e in errors["3"]["errors"] if e["extra_info"]["input_name"] == "steps")
    assert errors["3"]["class_type"] == "KSampler"
    assert steps["extra_info"]["allowed"] == {"min": 1, "max": 10000} and steps["extra_info"]["received_value"] == 0
    sampler = next(e for e in errors["3"]["errors"] if e["type"] == "value_not_in_list")
    assert "euler" in sampler["extra_info"]["allowed"]["options"]
    assert set(prompt_error(problems)) == {"error", "node_errors"}


def test_a_workflow_without_an_output_node_is_refused() -> None:
    workflow = {"1": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}}}
    assert kinds(validate_workflow(workflow, REAL, LOADER_INPUTS)) == [("", None, "prompt_no_outputs")]


def overrides(body: Any, workflow: dict[str, Any] = WORKFLOW) -> tuple[dict[tuple[str, str], Any], list[Any]]:
    parsed = parse_overrides(body, workflow, OBJECT_INFO)
    problems = parsed.problems + validate_overrides(
        parsed.values, build_schema(workflow, OBJECT_INFO, LOADER_INPUTS), workflow
    )
    return parsed.values, problems


@pytest.mark.parametrize(
    "body",
    [
        {"3": {"inputs": {"seed": -1, "steps": 2}}, "6": {"inputs": {"text": "a red fox"}}},
        {"prompt": {"3": {"inputs": {"seed": -1, "steps": 2}}, "6": {"inputs": {"text": "a red fox"}}}},
        {"3.seed": -1, "3.steps": 2, "6.text": "a red fox"},
        {"prompt": "a red fox", "3.seed": -1, "3.steps": 2},
        {"prompt": "a red fox", "target_node": "6", "3": {"inputs": {"seed": -1, "steps": 2}}},
    ],
)
def test_the_three_override_forms_read_the_same(body: Any) -> None:
    values, problems = overrides(body)
    assert problems == []
    assert values == {("3", "seed"): -1, ("3", "steps"): 2, ("6", "text"): "a red fox"}
    merged = merge(WORKFLOW, values)
    assert merged["6"]["inputs"]["text"] == "a red fox" and WORKFLOW["6"]["inputs"]["text"] != "a red fox"


def test_the_positive_prompt_is_found_through_conditioning_chains_not_by_node_order() -> None:
    workflow = copy.deepcopy(WORKFLOW)
    # swap: node 6 becomes the negative prompt, 7 the positive
    workflow["3"]["inputs"]["positive"], workflow["3"]["inputs"]["negative"] = ["7", 0], ["6", 0]
    assert positive_prompt_node(workflow, OBJECT_INFO) == "7"
    assert positive_prompt_node({"1": WORKFLOW["9"]}, OBJECT_INFO) is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"3.steps": 0}, ("3", "steps", "value_smaller_than_min")),
        ({"3.steps": 1.5}, ("3", "steps", "invalid_input_type")),
        ({"3.cfg": True}, ("3", "cfg", "invalid_input_type")),
        ({"3.sampler_name": "nope"}, ("3", "sampler_name", "value_not_in_list")),
        ({"3.seed": -2}, ("3", "seed", "value_smaller_than_min")),
        ({"3.model": ["4", 0, 1]}, ("3", "model", "link_overridden")),
        ({"3.nonsense": 1}, ("3", "nonsense", "unknown_input")),
        ({"42": {"inputs": {"text": "x"}}}, ("42", "text", "unknown_node")),
        ({"6.text": 7}, ("6", "text", "invalid_input_type")),
        ({"3": {"seed": 5}}, ("3", None, "invalid_overrides")),
        ({"3": {"inputs": {"seed": 5}, "class_type": "KSamplerAdvanced"}}, ("3", None, "class_type_changed")),
        ({"prompt": "x", "target_node": "9"}, ("9", "text", "unknown_input")),
    ],
)
def test_each_kind_of_bad_override_is_named(body: Any, expected: tuple[str, str | None, str]) -> None:
    assert expected in kinds(overrides(body)[1])


def test_the_same_link_sent_back_is_no_change() -> None:
    values, problems = overrides({"3": {"inputs": {"model": ["4", 0], "steps": 3}}})
    assert problems == [] and merge(WORKFLOW, values)["3"]["inputs"]["model"] == ["4", 0]


def test_a_body_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidParams):
        parse_overrides(["3.seed", 1], WORKFLOW, OBJECT_INFO)


PARAMETERS = build_schema(WORKFLOW, OBJECT_INFO, LOADER_INPUTS)
VALUES = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.booleans(),
    st.text(max_size=8),
    st.sampled_from(["euler", "normal", "sd-v1-5-inpainting.ckpt"]),
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([p.key for p in PARAMETERS] + ["3.model", "99.x"]), VALUES, max_size=6))
def test_any_accepted_override_gives_a_workflow_that_validates(flat: dict[str, Any]) -> None:
    values, problems = overrides(flat)
    if problems:
        return
    assert validate_workflow(merge(WORKFLOW, values), OBJECT_INFO, LOADER_INPUTS) == []


def test_the_openapi_document_validates_and_carries_types_ranges_enums_and_defaults() -> None:
    document = openapi_document("txt2img", PARAMETERS, "http://127.0.0.1:9000")
    validate_openapi(document)
    body = document["components"]["schemas"]["Overrides"]["properties"]
    assert body["3.steps"]["type"] == "integer" and body["3.steps"]["minimum"] == 1
    assert body["3.sampler_name"]["enum"][0] == "euler" and body["3.cfg"]["type"] == "number"
    assert {"const": -1} in body["3.seed"]["anyOf"] and body["6.text"]["default"] == WORKFLOW["6"]["inputs"]["text"]
    assert "K采样器" in body["3.seed"]["description"]


def test_a_class_inputs_are_read_anew_from_a_new_object_info_entry() -> None:
    from serverless.workflows.schema import node_inputs

    before = {"Thing": {"input": {"required": {"size": ["INT", {"min": 1, "max": 8}]}}}}
    after = {"Thing": {"input": {"required": {"size": ["INT", {"min": 1, "max": 64}]}, "optional": {"x": ["FLOAT"]}}}}
    first = node_inputs(before, "Thing")
    assert first is not None and first["size"].maximum == 8
    assert node_inputs(before, "Thing") == first  # the same entry: the same inputs
    changed = node_inputs(after, "Thing")  # ComfyUI restarted with another version of the node
    assert changed is not None and changed["size"].maximum == 64 and set(changed) == {"size", "x"}
    assert node_inputs({}, "Thing") is None
