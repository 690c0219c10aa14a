"""Workflow preparation: random seeds reported, output prefixes made per instance."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

from serverless.core.workflow import copy_json, prepare_workflow

FIXTURES = Path(__file__).parent / "fixtures"


def txt2img(seed: int = -1) -> dict:
    workflow = json.loads((FIXTURES / "txt2img_fc_doc.json").read_text())
    workflow["3"]["inputs"]["seed"] = seed
    return workflow


def test_ksampler_seed_minus_one_is_randomised_and_reported():
    original = txt2img()
    prepared = prepare_workflow(original, "i-1", random.Random(7))
    seed = prepared.workflow["3"]["inputs"]["seed"]
    assert 0 <= seed < 2**32
    assert prepared.seeds == {"3": {"seed": seed}}
    assert original["3"]["inputs"]["seed"] == -1, "the caller's workflow must not change"


def test_every_seed_like_input_is_randomised():
    workflow = {
        "1": {"class_type": "KSamplerAdvanced", "inputs": {"noise_seed": -1, "steps": 2}},
        "2": {"class_type": "RandomNoise", "inputs": {"noise_seed": -1}},
        "3": {"class_type": "ImageAddNoise", "inputs": {"seed": -1, "strength": 0.5}},
        "4": {"class_type": "KSampler", "inputs": {"seed": 5}},
        "5": {"class_type": "Custom", "inputs": {"seed": True}},
    }
    prepared = prepare_workflow(workflow, "i", random.Random(1))
    assert set(prepared.seeds) == {"1", "2", "3"}
    assert prepared.seeds["1"]["noise_seed"] == prepared.workflow["1"]["inputs"]["noise_seed"]
    assert prepared.workflow["4"]["inputs"]["seed"] == 5
    assert prepared.workflow["5"]["inputs"]["seed"] is True


def test_fixed_seeds_are_left_alone_and_not_reported():
    prepared = prepare_workflow(txt2img(seed=42), "i-1")
    assert prepared.workflow["3"]["inputs"]["seed"] == 42
    assert prepared.seeds == {}


def test_save_prefix_gets_the_instance_id():
    prepared = prepare_workflow(txt2img(), "c-64f1ab")
    assert prepared.workflow["9"]["inputs"]["filename_prefix"] == "ComfyUI_c-64f1ab"


def test_missing_save_prefix_gets_the_default_with_instance_id():
    workflow = {"9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}}}
    prepared = prepare_workflow(workflow, "i-2")
    assert prepared.workflow["9"]["inputs"]["filename_prefix"] == "ComfyUI_i-2"


def test_instance_id_cannot_inject_path_separators():
    prepared = prepare_workflow(txt2img(), "../../etc")
    prefix = prepared.workflow["9"]["inputs"]["filename_prefix"]
    assert "/" not in prefix.removeprefix("ComfyUI") and ".." not in prefix


def test_linked_prefix_is_left_alone():
    workflow = {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": ["5", 0]}}}
    before = copy.deepcopy(workflow)
    assert prepare_workflow(workflow, "i").workflow == before


def test_a_json_copy_shares_nothing_mutable_with_the_original():
    original = {"1": {"inputs": {"list": [1, [2.5, None]], "flag": True, "text": "é"}}, "odd": {(1, 2): {3}}}
    copied = copy_json(original)
    assert copied == original
    copied["1"]["inputs"]["list"][1].append(3)
    copied["odd"][(1, 2)].add(4)  # what is not JSON is deep-copied too
    assert original == {"1": {"inputs": {"list": [1, [2.5, None]], "flag": True, "text": "é"}}, "odd": {(1, 2): {3}}}
