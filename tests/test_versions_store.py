"""Versions and aliases without servers: the `<id>@<ref>` parser, what counts as missing, and the
folder on disk (numbering under concurrent registrations, the newest as the head, a workflow stored
before versions were kept, deletion rules)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from serverless.errors import Conflict, InvalidParams, NotFound
from serverless.workflows.environment import is_model_input, missing
from serverless.workflows.refs import WorkflowRef, parse_ref
from serverless.workflows.store import WorkflowStore
from serverless.workflows.validate import Problem
from tests.helpers import empty_image


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("t2i", WorkflowRef("t2i")),
        ("t2i@3", WorkflowRef("t2i", version=3)),
        ("t2i@prod", WorkflowRef("t2i", alias="prod")),
        ("my.flow-1@canary_2", WorkflowRef("my.flow-1", alias="canary_2")),
    ],
)
def test_a_ref_names_the_bare_id_a_version_or_an_alias(text: str, ref: WorkflowRef) -> None:
    assert parse_ref(text) == ref and str(ref) == text


@pytest.mark.parametrize("text", ["t2i@", "t2i@0", "t2i@01", "t2i@2x", "t2i@-a", "t2i@a/b", "../x@1", "a@b@c", "@1"])
def test_a_malformed_ref_is_invalid_params(text: str) -> None:
    with pytest.raises(InvalidParams):
        parse_ref(text)


def problem(kind: str, class_type: str, name: str | None = None, value: object = None) -> Problem:
    return Problem("1", class_type, name, kind, "", received=value)


def test_missing_names_unknown_classes_and_absent_models_but_not_references_or_other_options() -> None:
    found = missing(
        [
            problem("unknown_class_type", "FancyUpscaler"),
            problem("unknown_class_type", "FancyUpscaler"),
            problem("value_not_in_list", "CheckpointLoaderSimple", "ckpt_name", "absent.safetensors"),
            problem("value_not_in_list", "DualCLIPLoader", "clip_name2", "t5.safetensors"),
            problem("value_not_in_list", "CheckpointLoaderSimple", "ckpt_name", "https://x.test/m.safetensors"),
            problem("value_not_in_list", "CheckpointLoaderSimple", "ckpt_name", "sha256:" + "a" * 64),
            problem("value_not_in_list", "KSampler", "sampler_name", "nope"),
        ]
    )
    assert found == {"nodes": ["FancyUpscaler"], "models": ["absent.safetensors", "t5.safetensors"]}
    assert missing([problem("value_not_in_list", "KSampler", "scheduler", "x")]) is None
    assert is_model_input("UpscaleModelLoader", "model_name") and not is_model_input("LoadImage", "image")


def test_concurrent_registrations_get_distinct_numbers_and_the_head_is_the_newest(tmp_path: Path) -> None:
    async def scenario() -> None:
        stores = [WorkflowStore(tmp_path), WorkflowStore(tmp_path)]  # two instances, one disk
        await stores[0].write("w", empty_image(color=0), new=True)
        written = await asyncio.gather(*(stores[i % 2].write("w", empty_image(color=i + 1)) for i in range(12)))
        numbers = sorted(number for _, number in written)
        assert numbers == list(range(2, 14))
        head = await stores[1].read("w")
        assert head.number == 13
        newest = await stores[0].read_version(head, 13)
        assert head.workflow == newest.workflow

    asyncio.run(scenario())


def test_a_workflow_stored_before_versions_becomes_version_one(tmp_path: Path) -> None:
    (tmp_path / "old.json").write_text(json.dumps({"prompt": empty_image(color=7)}))

    async def scenario() -> None:
        store = WorkflowStore(tmp_path)
        assert (await store.read("old")).number is None
        created, number = await store.write("old", empty_image(color=8))
        assert (created, number) == (False, 2)
        head = await store.read("old")
        first = await store.read_version(head, 1)
        assert first.workflow["1"]["inputs"]["color"] == 7 and head.workflow["1"]["inputs"]["color"] == 8
        versions, aliases = await store.history("old")
        assert [v.number for v in versions] == [1, 2] and aliases == {}

    asyncio.run(scenario())


def test_a_version_an_alias_names_or_the_only_one_is_not_deleted(tmp_path: Path) -> None:
    async def scenario() -> None:
        store = WorkflowStore(tmp_path)
        await store.write("w", empty_image(color=1), new=True)
        await store.write("w", empty_image(color=2))
        head = await store.read("w")
        await store.set_alias(head, "prod", 2, None)
        with pytest.raises(NotFound):
            await store.set_alias(head, "prod", 9, None)
        with pytest.raises(Conflict):
            await store.delete_version(head, 2)  # prod names it
        await store.set_alias(head, "prod", 1, None)  # rollback
        await store.delete_version(head, 2)  # the newest: the head goes back to 1
        head = await store.read("w")
        assert head.number == 1 and head.workflow["1"]["inputs"]["color"] == 1
        await store.delete_alias("w", "prod")
        with pytest.raises(Conflict):
            await store.delete_version(head, 1)  # the only one
        await store.delete("w")

    asyncio.run(scenario())
    assert not any(tmp_path.iterdir())
