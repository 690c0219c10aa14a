"""UI-format workflows (the editor's own save) converted to the API format, without servers.

The corpus is in tests/fixtures/uiformat/ (see its README): each `<name>.json` converts to
`<name>.api.json`, the API format ComfyUI's editor would export for it (`graphToPrompt`), with the
emulator's /object_info."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serverless.core.request import split_workflow
from serverless.core.uiformat import UIFormatWorkflow, convert, widgets
from serverless.errors import InvalidParams

FIXTURES = Path(__file__).parent / "fixtures" / "uiformat"
OBJECT_INFO: dict[str, Any] = json.loads(
    (Path(__file__).parent.parent / "comfyui_emulator" / "object_info.json").read_text()
)
REAL: dict[str, Any] = json.loads(
    (Path(__file__).parent / "fixtures" / "traces" / "object_info_subset.json").read_text()
)["full_entries"]  # real ComfyUI 0.3.64's entries for the classes it recorded
CORPUS = ["bypass_mute", "frontend_default", "loadimage", "reroute_primitive", "subgraph", "template_default"]
"""The workflows whose classes the emulator knows (they run on it)."""
TEMPLATE_CLASSES: dict[str, Any] = {
    name: entry
    for name, entry in json.loads((FIXTURES / "object_info_template_classes.json").read_text()).items()
    if not name.startswith("_")
}


def load(name: str) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return document


def node(node_id: int, type_: str, widgets_values: Any = None, **fields: Any) -> dict[str, Any]:
    made = {"id": node_id, "type": type_, "mode": 0, "order": node_id, "inputs": [], "outputs": [], **fields}
    if widgets_values is not None:
        made["widgets_values"] = widgets_values
    return made


def slot(name: str, type_: str, link: int | None) -> dict[str, Any]:
    return {"name": name, "type": type_, "link": link}


def test_every_workflow_of_the_fixture_folder_is_tested() -> None:
    workflows = {path.stem for path in FIXTURES.glob("*.json") if (FIXTURES / f"{path.stem}.api.json").exists()}
    assert workflows == {*CORPUS, "template_subgraph_zimage"}


@pytest.mark.parametrize("name", CORPUS)
def test_each_workflow_of_the_corpus_converts_to_the_editors_api_export(name: str) -> None:
    expected = json.loads((FIXTURES / f"{name}.api.json").read_text())
    assert convert(load(name), OBJECT_INFO).prompt == expected


@pytest.mark.parametrize("name", CORPUS)
def test_real_comfyuis_declarations_give_the_same_prompt(name: str) -> None:
    """Real ComfyUI 0.3.64's entries (its input_order differs from the emulator's for KSampler)
    where it recorded them, the emulator's elsewhere."""
    assert convert(load(name), {**OBJECT_INFO, **REAL}).prompt == convert(load(name), OBJECT_INFO).prompt


def test_the_editors_subgraph_template_converts_with_its_bypassed_inner_node_spliced() -> None:
    """Comfy-Org's "get started" template as the editor saves subgraphs today: promoted widgets
    (`proxyWidgets`) read from the inner nodes, a bypassed ModelSamplingAuraFlow inside."""
    converted = convert(load("template_subgraph_zimage"), {**OBJECT_INFO, **TEMPLATE_CLASSES})
    assert converted.prompt == json.loads((FIXTURES / "template_subgraph_zimage.api.json").read_text())
    assert converted.notes == ["node 83:11 (ModelSamplingAuraFlow) is bypassed: what it feeds takes its inputs instead"]


def test_the_default_workflow_converts_to_the_graph_of_comfyuis_own_example_export() -> None:
    """ComfyUI's script_examples/basic_api_example.py holds the editor's export of the default
    workflow (other values, same graph): same ids, classes, inputs and links."""
    example = json.loads((FIXTURES / "comfyui_basic_api_example.api.json").read_text())
    converted = convert(load("frontend_default"), OBJECT_INFO).prompt

    def shape(prompt: dict[str, Any]) -> dict[str, Any]:
        return {
            node_id: (
                node["class_type"],
                {k: v for k, v in node["inputs"].items() if isinstance(v, list)},
                set(node["inputs"]),
            )
            for node_id, node in prompt.items()
        }

    assert shape(converted) == shape(example)


def test_notes_tell_what_was_left_out_and_groups_and_notes_make_no_node() -> None:
    converted = convert(load("bypass_mute"), OBJECT_INFO)
    assert set(converted.prompt) == {"1", "3", "4"}  # the MarkdownNote and the group are not nodes
    assert converted.notes == [
        "node 2 (ImageInvert) is bypassed: what it feeds takes its inputs instead",
        "node 5 (ImageScale) is muted: left out",
        "node 6 (PreviewImage) is muted: left out",
    ]


def test_seed_controls_follow_the_flag_else_the_name() -> None:
    info = {
        "Rand": {
            "input": {
                "required": {
                    "seed": ["INT", {}],
                    "noise_seed": ["INT", {"control_after_generate": False}],
                    "value": ["INT", {"control_after_generate": True}],
                    "pick": [["a", "b"], {"control_after_generate": True}],
                    "strength": ["FLOAT", {"default": 0.5}],
                }
            },
            "output": [],
        }
    }
    names = [w.name for w in widgets(info["Rand"])]
    assert names == [
        "seed",
        "control_after_generate",
        "noise_seed",
        "value",
        "control_after_generate",
        "pick",
        "control_after_generate",
        "control_filter_list",
        "strength",
    ]
    document = {
        "nodes": [node(1, "Rand", [1, "randomize", 2, 3, "fixed", "b", "fixed", "", 0.25])],
        "links": [],
    }
    converted = convert(document, {**OBJECT_INFO, **info}).prompt["1"]["inputs"]
    assert converted == {"seed": 1, "noise_seed": 2, "value": 3, "pick": "b", "strength": 0.25}


def test_an_upload_combo_saves_its_button_after_the_required_inputs_and_it_is_not_sent() -> None:
    document = {"nodes": [node(1, "LoadImageMask", ["mask.png", "red", "image"])], "links": []}
    assert convert(document, OBJECT_INFO).prompt["1"]["inputs"] == {"image": "mask.png", "channel": "red"}


def test_missing_values_take_defaults_and_extra_values_are_told() -> None:
    document = {"nodes": [node(1, "EmptyImage", [8]), node(2, "ImageBlur", [3, 1.0, "surplus"])], "links": []}
    converted = convert(document, OBJECT_INFO)
    assert converted.prompt["1"]["inputs"] == {"width": 8, "height": 512, "batch_size": 1, "color": 0}
    assert converted.prompt["2"]["inputs"] == {"blur_radius": 3, "sigma": 1.0}
    assert any("height, batch_size, color" in note and "default" in note for note in converted.notes)
    assert any("1 saved widget value(s) match no input" in note for note in converted.notes)


def test_values_saved_by_name_and_list_values_are_boxed() -> None:
    info = {"Lists": {"input": {"required": {"items": ["COMBO", {"options": [["a"], ["b"]]}]}}, "output": []}}
    document = {"nodes": [node(1, "Lists", {"items": ["b"], "other": 1})], "links": []}
    assert convert(document, {**OBJECT_INFO, **info}).prompt["1"]["inputs"] == {"items": {"__value__": ["b"]}}


def test_a_class_the_instance_lacks_is_invalid_params_naming_every_one() -> None:
    document = load("reroute_primitive")
    document["nodes"] += [node(50, "FancyUpscaler"), node(51, "AnotherPack"), node(52, "FancyUpscaler")]
    document["nodes"] += [node(53, "MutedPack", mode=2), node(54, "BypassedPack", mode=4)]
    with pytest.raises(InvalidParams) as refused:
        convert(document, OBJECT_INFO)
    assert "AnotherPack, FancyUpscaler" in refused.value.message
    assert refused.value.raw == {"missing": {"nodes": ["AnotherPack", "FancyUpscaler"], "models": []}}


def test_rgthree_reroutes_pass_through_and_its_frontend_only_nodes_make_nothing() -> None:
    document = load("bypass_mute")
    document["nodes"] += [
        node(
            20, "Reroute (rgthree)", inputs=[slot("", "*", 20)], outputs=[{"name": "", "type": "IMAGE", "links": [21]}]
        ),
        node(21, "PreviewImage", inputs=[slot("images", "IMAGE", 21)]),
        node(22, "Fast Groups Bypasser (rgthree)", inputs=[slot("", "*", None)]),
        node(23, "Label (rgthree)"),
    ]
    document["links"] += [[20, 3, 0, 20, 0, "IMAGE"], [21, 20, 0, 21, 0, "IMAGE"]]
    prompt = convert(document, OBJECT_INFO).prompt
    assert set(prompt) == {"1", "3", "4", "21"} and prompt["21"]["inputs"] == {"images": ["3", 0]}


def test_a_legacy_group_node_is_refused_with_a_hint() -> None:
    document = {"nodes": [node(1, "workflow>upscale")], "links": [], "extra": {"groupNodes": {"upscale": {}}}}
    with pytest.raises(InvalidParams, match="make them subgraphs") as refused:
        convert(document, OBJECT_INFO)
    assert refused.value.raw["missing"]["nodes"] == ["workflow>upscale"]


def test_an_input_fed_by_a_muted_node_is_left_out() -> None:
    document = {
        "nodes": [
            node(1, "EmptyImage", [8, 8, 1, 0], mode=2, outputs=[{"name": "IMAGE", "type": "IMAGE", "links": [1]}]),
            node(2, "ImageInvert", inputs=[slot("image", "IMAGE", 1)]),
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"]],
    }
    converted = convert(document, OBJECT_INFO)
    assert converted.prompt == {"2": {"inputs": {}, "class_type": "ImageInvert", "_meta": {"title": "Invert Image"}}}
    assert "node 2 (ImageInvert) input 'image' is left out: it comes from node 1 (EmptyImage), which is muted" in (
        converted.notes
    )


def _bypassed_sampler(consumer_type: str, consumer_input: str, wanted: str) -> dict[str, Any]:
    sampler_inputs = [
        slot("model", "MODEL", 1),
        slot("positive", "CONDITIONING", None),
        slot("negative", "CONDITIONING", None),
        slot("latent_image", "LATENT", 2),
    ]
    return {
        "nodes": [
            node(1, "CheckpointLoaderSimple", ["v1-5-pruned-emaonly.safetensors"]),
            node(2, "EmptyLatentImage", [64, 64, 1]),
            node(3, "KSampler", [1, "fixed", 1, 1, "euler", "normal", 1], mode=4, inputs=sampler_inputs,
                 outputs=[{"name": "LATENT", "type": "LATENT", "links": [3]}]),
            node(4, consumer_type, inputs=[slot(consumer_input, wanted, 3)]),
        ],
        "links": [[1, 1, 0, 3, 0, "MODEL"], [2, 2, 0, 3, 3, "LATENT"], [3, 3, 0, 4, 0, wanted]],
    }  # fmt: skip


def test_a_bypassed_node_feeds_its_first_input_of_the_wanted_type() -> None:
    converted = convert(_bypassed_sampler("VAEDecode", "samples", "LATENT"), OBJECT_INFO)
    assert converted.prompt["4"]["inputs"] == {"samples": ["2", 0]}  # latent_image, not slot 0 (MODEL)


def test_a_bypassed_node_without_an_input_of_the_wanted_type_feeds_nothing() -> None:
    converted = convert(_bypassed_sampler("SaveImage", "images", "IMAGE"), OBJECT_INFO)
    assert "images" not in converted.prompt["4"]["inputs"]
    assert any("bypassed node 3 (KSampler) has no input of type IMAGE" in note for note in converted.notes)


def test_a_subgraph_instance_without_saved_widget_values_keeps_the_inner_values() -> None:
    document = load("subgraph")
    document["nodes"][1]["widgets_values"] = []
    assert convert(document, OBJECT_INFO).prompt["10:1"]["inputs"]["blur_radius"] == 1


def test_a_subgraph_input_fed_from_outside_is_linked_through() -> None:
    document = load("subgraph")
    document["nodes"].append(
        node(30, "PrimitiveNode", [9, "fixed"], outputs=[{"name": "INT", "type": "INT", "links": [3]}])
    )
    document["nodes"][1]["inputs"][1]["link"] = 3
    document["links"].append([3, 30, 0, 10, 1, "INT"])
    assert convert(document, OBJECT_INFO).prompt["10:1"]["inputs"]["blur_radius"] == 9


def test_values_an_instance_saved_for_its_promoted_widgets_are_its_own() -> None:
    """Today's editor keeps one value per instance (`proxyWidgets` and the instance's
    `widgets_values`, in that order); they win over the definition's inner values."""
    document = load("template_subgraph_zimage")
    document["nodes"][0]["widgets_values"] = ["a cat", 512, 768, 42, "fixed"]
    prompt = convert(document, {**OBJECT_INFO, **TEMPLATE_CLASSES}).prompt
    assert prompt["83:27"]["inputs"]["text"] == "a cat"
    assert prompt["83:13"]["inputs"] == {"width": 768, "height": 512, "batch_size": 1}
    assert prompt["83:3"]["inputs"]["seed"] == 42 and "control_after_generate" not in prompt["83:3"]["inputs"]
    subgraph = load("subgraph")  # a widget bound through a subgraph input: `["-1", name]`
    subgraph["nodes"][1]["properties"]["proxyWidgets"] = [["-1", "blur_radius"]]
    subgraph["nodes"][1]["widgets_values"] = [5]
    assert convert(subgraph, OBJECT_INFO).prompt["10:1"]["inputs"]["blur_radius"] == 5


def test_a_subgraph_that_contains_itself_is_refused() -> None:
    document = load("subgraph")
    inner = document["definitions"]["subgraphs"][1]
    inner["nodes"].append(node(9, inner["id"]))
    with pytest.raises(InvalidParams, match="contains itself"):
        convert(document, OBJECT_INFO)


def test_a_loop_of_reroutes_is_refused() -> None:
    document = {
        "nodes": [
            node(1, "Reroute", inputs=[slot("", "*", 2)], outputs=[{"name": "", "type": "*", "links": [1]}]),
            node(2, "Reroute", inputs=[slot("", "*", 1)], outputs=[{"name": "", "type": "*", "links": [2, 3]}]),
            node(3, "ImageInvert", inputs=[slot("image", "IMAGE", 3)]),
        ],
        "links": [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 1, 0, "*"], [3, 2, 0, 3, 0, "IMAGE"]],
    }
    with pytest.raises(InvalidParams, match="loops through"):
        convert(document, OBJECT_INFO)


@pytest.mark.parametrize(
    "document, words",
    [
        ({"nodes": [], "links": []}, "no node that ComfyUI would run"),
        ({"nodes": [{"id": 1}], "links": []}, "without a type"),
        ({"nodes": [node(1, "ImageInvert")], "links": [[1, 2]]}, "malformed link"),
        ({"nodes": [node(1, "ImageInvert")], "links": [[1, 2, "x", 1, 0, "IMAGE"]]}, "malformed link"),
        ({"nodes": "many"}, "not a UI-format workflow"),
    ],
)
def test_malformed_ui_workflows_are_invalid_params(document: dict[str, Any], words: str) -> None:
    with pytest.raises(InvalidParams, match=words):
        convert(document, OBJECT_INFO)


def test_request_parsing_hands_a_ui_workflow_and_its_extra_data_to_the_caller() -> None:
    document = load("subgraph")
    with pytest.raises(UIFormatWorkflow) as raised:
        split_workflow({"prompt": document, "extra_data": {"client_id": "x"}})
    assert raised.value.document is document and raised.value.extra_data == {"client_id": "x"}
    assert raised.value.code == "INVALID_PARAMS" and "POST /api/workflows/convert" in raised.value.message


def test_converting_leaves_the_document_unchanged() -> None:
    document = load("subgraph")
    before = copy.deepcopy(document)
    convert(document, OBJECT_INFO)
    assert document == before


values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-3, 60), st.floats(allow_nan=False), st.text(max_size=5)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
types = st.sampled_from(["KSampler", "ImageInvert", "Reroute", "PrimitiveNode", "Note", "EmptyImage", "sg", "X", ""])
slot_fields = {
    "name": st.sampled_from(["image", "seed", "", "x"]),
    "type": st.sampled_from(["IMAGE", "INT", "*"]),
    "link": st.one_of(st.none(), st.integers(0, 6)),
}
slots = st.lists(st.fixed_dictionaries(slot_fields, optional={"widget": values}), max_size=3)
node_fields = {
    "mode": st.sampled_from([0, 2, 4, "x"]),
    "inputs": st.one_of(slots, values),
    "outputs": values,
    "widgets_values": values,
    "order": values,
    "title": values,
    "properties": values,
}
ui_nodes = st.fixed_dictionaries({"id": st.integers(0, 6), "type": types}, optional=node_fields)
links = st.one_of(
    st.tuples(st.integers(0, 6), st.integers(-20, 6), st.integers(-1, 3), st.integers(-20, 6), st.integers(-1, 3),
              st.just("IMAGE")).map(list),
    values,
)  # fmt: skip
documents = st.builds(
    lambda nodes, links, inner_nodes, inner_links: {
        "nodes": nodes,
        "links": links,
        "definitions": {
            "subgraphs": [{"id": "sg", "nodes": inner_nodes, "links": inner_links, "outputs": [{"linkIds": [1]}]}]
        },
    },
    st.lists(ui_nodes, max_size=6),
    st.lists(links, max_size=6),
    st.lists(ui_nodes, max_size=3),
    st.lists(links, max_size=3),
)


@settings(max_examples=300, deadline=None)
@given(documents)
def test_any_ui_document_converts_or_is_invalid_params(document: dict[str, Any]) -> None:
    try:
        converted = convert(document, OBJECT_INFO)
    except InvalidParams:
        return
    for node_id, api_node in converted.prompt.items():
        assert isinstance(node_id, str) and api_node["class_type"] in OBJECT_INFO
        json.dumps(api_node)
