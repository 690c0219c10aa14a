"""Parameters by title (pure): where a node's title is unique, `<title>.<input>` names its inputs
in overrides (every form), in the schema beside `<node_id>.<input>`, and in the OpenAPI document."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from openapi_spec_validator import validate as validate_openapi

import comfyui_emulator
from serverless.inputs.resolve import LOADER_INPUTS
from serverless.workflows.openapi import openapi_document
from serverless.workflows.overrides import merge, parse_overrides
from serverless.workflows.schema import build_schema, unique_titles
from serverless.workflows.validate import validate_overrides
from tests.helpers import txt2img

OBJECT_INFO: dict[str, Any] = json.loads((Path(comfyui_emulator.__file__).parent / "object_info.json").read_text())
WORKFLOW = txt2img(seed=5, steps=4, size=64)  # titled in Chinese; both prompt nodes are "CLIP文本编码(提示)"


def titled(**titles: str) -> dict[str, Any]:
    workflow = txt2img(seed=5, steps=4, size=64)
    for node_id, title in titles.items():
        workflow[node_id.lstrip("n")]["_meta"] = {"title": title}
    return workflow


def test_only_titles_one_node_bears_name_it() -> None:
    titles = unique_titles(WORKFLOW)
    assert titles["K采样器"] == "3" and titles["保存图像"] == "9"
    assert "CLIP文本编码(提示)" not in titles  # two nodes bear it


def test_a_title_that_is_another_nodes_id_does_not_name_a_node() -> None:
    assert "3" not in unique_titles(titled(n9="3"))


def test_the_schema_shows_both_names() -> None:
    schema = {p.key: p.to_payload() for p in build_schema(WORKFLOW, OBJECT_INFO, LOADER_INPUTS)}
    assert schema["3.seed"]["name"] == "3.seed" and schema["3.seed"]["title_name"] == "K采样器.seed"
    assert schema["6.text"]["title_name"] is None  # its title is not unique


def test_overrides_by_title_reach_the_same_inputs_in_every_form() -> None:
    workflow = titled(n6="Positive", n7="Negative", n3="Sampler")
    bodies = [
        {"Sampler.seed": 9, "Positive.text": "a cat"},
        {"Sampler": {"inputs": {"seed": 9}}, "Positive": {"inputs": {"text": "a cat"}}},
        {"prompt": {"Sampler": {"inputs": {"seed": 9}}, "6": {"inputs": {"text": "a cat"}}}},
        {"prompt": "a cat", "target_node": "Positive", "3.seed": 9},
    ]
    for body in bodies:
        parsed = parse_overrides(body, workflow, OBJECT_INFO)
        assert parsed.problems == [] and parsed.values == {("3", "seed"): 9, ("6", "text"): "a cat"}, body
        parameters = build_schema(workflow, OBJECT_INFO, LOADER_INPUTS)
        assert validate_overrides(parsed.values, parameters, workflow) == []
        merged = merge(workflow, parsed.values)
        assert merged["3"]["inputs"]["seed"] == 9 and merged["6"]["inputs"]["text"] == "a cat"


def test_a_title_with_dots_names_its_node() -> None:
    parsed = parse_overrides({"SD1.5 sampler.steps": 8}, titled(n3="SD1.5 sampler"), OBJECT_INFO)
    assert parsed.values == {("3", "steps"): 8}


def test_the_same_input_by_id_and_by_title_must_agree() -> None:
    workflow = titled(n3="Sampler")
    assert parse_overrides({"3.seed": 1, "Sampler.seed": 1}, workflow, OBJECT_INFO).problems == []
    problems = parse_overrides({"3.seed": 1, "Sampler.seed": 2}, workflow, OBJECT_INFO).problems
    assert [(p.node_id, p.input, p.kind) for p in problems] == [("3", "seed", "invalid_overrides")]


def test_a_shared_title_is_no_name() -> None:
    workflow = titled(n6="Prompt", n7="Prompt")
    parsed = parse_overrides({"Prompt.text": "x"}, workflow, OBJECT_INFO)
    problems = validate_overrides(parsed.values, build_schema(workflow, OBJECT_INFO, LOADER_INPUTS), workflow)
    assert [(p.node_id, p.kind) for p in problems] == [("Prompt", "unknown_node")]


def test_the_openapi_document_names_each_parameter_both_ways() -> None:
    workflow = titled(n3="Sampler")
    document = openapi_document("t", build_schema(workflow, OBJECT_INFO, LOADER_INPUTS), "http://x")
    validate_openapi(document)
    properties = document["components"]["schemas"]["Overrides"]["properties"]
    assert properties["Sampler.seed"]["anyOf"] == properties["3.seed"]["anyOf"]
    assert properties["Sampler.seed"]["description"].startswith("the same as `3.seed`")
    assert "保存图像.filename_prefix" in properties
