"""Model references and checks without servers: what a value names, which inputs are model
inputs, names that cannot escape their folder, safetensors headers, what a workflow needs."""

from __future__ import annotations

from pathlib import Path

import pytest

from serverless.errors import InvalidParams
from serverless.models.needs import needed_models
from serverless.models.refs import check_folder, check_name, find_model_inputs, folder_of, parse_reference
from serverless.models.safetensors import check_safetensors
from tests.model_server import safetensors

HEX = "ab" * 32


def test_a_url_reference_may_pin_its_content() -> None:
    ref = parse_reference(f"https://user:pw@host.example/m/a%20b.safetensors?sig=secret#sha256={HEX.upper()}")
    assert ref.kind == "url" and ref.sha256 == HEX
    assert ref.location.endswith("?sig=secret")
    assert ref.shown == "https://host.example/m/a%20b.safetensors"  # no user, no query
    assert ref.file_name() == "a b.safetensors"


@pytest.mark.parametrize(
    ("value", "kind"),
    [("oss://bucket/key/x.ckpt", "oss"), ("s3://bucket/x.pt", "s3"), (f"sha256:{HEX}", "hash")],
)
def test_bucket_and_hash_references(value: str, kind: str) -> None:
    assert parse_reference(value).kind == kind


@pytest.mark.parametrize("value", ["sha256:abc", "https://host/x#other", "oss://bucket", "s3:///key"])
def test_malformed_references_are_invalid_params(value: str) -> None:
    with pytest.raises(InvalidParams):
        parse_reference(value)


def test_a_file_name_from_a_url_is_safe_or_replaced() -> None:
    assert parse_reference("https://host/a/..%2F..%2Fetc%2Fpasswd").file_name() == "model.safetensors"
    assert parse_reference("https://host/.hidden").file_name() == "model.safetensors"


@pytest.mark.parametrize("name", ["../x.safetensors", "a/b.safetensors", ".x", "", "a\x00b", "x" * 300])
def test_names_cannot_leave_their_folder(name: str) -> None:
    with pytest.raises(InvalidParams):
        check_name(name)


@pytest.mark.parametrize("folder", ["..", "../loras", "a/b", ""])
def test_folders_are_one_safe_segment(folder: str) -> None:
    with pytest.raises(InvalidParams):
        check_folder(folder)


def test_the_folder_comes_from_the_loader() -> None:
    assert folder_of("CheckpointLoaderSimple", "ckpt_name", {}) == "checkpoints"
    assert folder_of("LoraLoader", "lora_name", {}) == "loras"
    assert folder_of("UpscaleModelLoader", "model_name", {}) == "upscale_models"
    assert folder_of("SomethingElse", "model_name", {}) is None
    assert folder_of("CLIPVisionLoader", "clip_name", {}) == "clip_vision"
    assert (
        folder_of("IPAdapterModelLoader", "ipadapter_file", {("IPAdapterModelLoader", "ipadapter_file"): "ipadapter"})
        == "ipadapter"
    )


def test_only_references_in_model_inputs_are_found() -> None:
    workflow = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "https://h/x.safetensors"}},
        "2": {"class_type": "LoraLoader", "inputs": {"lora_name": "plain.safetensors", "model": ["1", 0]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "https://h/not-a-model"}},
    }
    assert [(m.node_id, m.folder) for m in find_model_inputs(workflow, {})] == [("1", "checkpoints")]


def test_safetensors_headers_are_checked(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    good.write_bytes(safetensors(1000))
    assert check_safetensors(good) is None
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(safetensors(1000)[:-10])
    assert "past the end" in str(check_safetensors(truncated))
    html = tmp_path / "page.safetensors"
    html.write_bytes(b"<html><body>Not Found</body></html>")
    assert check_safetensors(html) is not None
    nested = b"[" * 50_000 + b"]" * 50_000  # a downloaded file's header: nested past any parser's depth
    deep = tmp_path / "deep.safetensors"
    deep.write_bytes(len(nested).to_bytes(8, "little") + nested)
    assert check_safetensors(deep) == "its safetensors header is not JSON"


def test_a_workflow_needs_names_comfyui_lists_and_references_the_store_holds() -> None:
    workflow = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "have.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "https://h/m/x.safetensors?sig=1"}},
        "3": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "lack.safetensors"}},
    }
    info = {"CheckpointLoaderSimple": {"input": {"required": {"ckpt_name": [["have.safetensors"], {}]}}}}
    held = [{"folder": "checkpoints", "name": "x.safetensors", "source": "https://h/m/x.safetensors", "sha256": HEX}]
    assert [(m["node_id"], m["model"], m["held"]) for m in needed_models(workflow, info, {}, held)] == [
        ("1", "have.safetensors", True),
        ("2", "https://h/m/x.safetensors", True),
        ("3", "lack.safetensors", False),
    ]
