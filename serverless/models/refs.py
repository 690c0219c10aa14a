"""Model references in a workflow (pure): which loader inputs name models, and what a value names.

A value is a reference when it is `http(s)://…`, `oss://bucket/key`, `s3://bucket/key` or
`sha256:<64 hex>`; a URL may end `#sha256=<64 hex>` to pin its content. Anything else is a name
ComfyUI lists, left alone. The folder a model goes to comes from the loader.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple
from urllib.parse import unquote, urlsplit

from ..errors import InvalidParams

RefKind = Literal["url", "oss", "s3", "hash"]

# Inputs named so hold a model of this folder, whatever the class (ComfyUI's own loaders).
MODEL_INPUT_FOLDERS: Mapping[str, str] = {
    "ckpt_name": "checkpoints",
    "lora_name": "loras",
    "vae_name": "vae",
    "unet_name": "diffusion_models",
    "clip_name": "text_encoders",
    "clip_name1": "text_encoders",
    "clip_name2": "text_encoders",
    "clip_name3": "text_encoders",
    "control_net_name": "controlnet",
}
# Where a class's input says otherwise (or is too common a name to mean a model everywhere).
MODEL_CLASS_INPUTS: Mapping[tuple[str, str], str] = {
    ("UpscaleModelLoader", "model_name"): "upscale_models",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
}
# Every input name a built-in loader reads a model from: looked up before anything else is.
_MODEL_INPUT_NAMES = frozenset({*MODEL_INPUT_FOLDERS, *(name for _, name in MODEL_CLASS_INPUTS)})
MODEL_FOLDERS = frozenset(
    {*MODEL_INPUT_FOLDERS.values(), *MODEL_CLASS_INPUTS.values(), "embeddings", "clip", "unet", "style_models"}
)

_HEX = re.compile(r"[0-9a-f]{64}")
_PIN = re.compile(r"#sha256=([0-9A-Fa-f]{64})$")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._ +()\-]{0,150}")
_FOLDER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_DEFAULT_EXT = ".safetensors"


@dataclass(frozen=True, slots=True)
class ModelRef:
    """What a reference names: `location` is the URL or object without its pin (what is fetched),
    `sha256` the pinned (or, for `sha256:`, named) content, if any."""

    kind: RefKind
    location: str
    sha256: str | None

    @property
    def key(self) -> str:
        """What single-flight and the URL index go by (a hash: a signed URL's query stays secret)."""
        return hashlib.sha256(self.location.encode()).hexdigest()

    @property
    def shown(self) -> str:
        """The source as listings and results show it: no query (signatures live there), no user."""
        if self.kind == "hash":
            return self.location
        parts = urlsplit(self.location)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}"

    def file_name(self) -> str:
        """The last path segment, if it is a safe file name; else `model.safetensors`."""
        last = unquote(urlsplit(self.location).path.rsplit("/", 1)[-1]) if self.kind != "hash" else ""
        return last if _SAFE_NAME.fullmatch(last) and not last.startswith(".") else "model" + _DEFAULT_EXT


class ModelInput(NamedTuple):
    """One loader input whose value is a model reference."""

    node_id: str
    input_name: str
    folder: str
    ref: ModelRef


def is_reference(value: str) -> bool:
    lowered = value[:8].lower()
    return lowered.startswith(("http://", "https://", "oss://", "s3://", "sha256:"))


def parse_reference(value: str) -> ModelRef:
    """The reference `value` makes; InvalidParams for a malformed one."""
    if value[:7].lower() == "sha256:":
        digest = value[7:].lower()
        if not _HEX.fullmatch(digest):
            raise InvalidParams("a sha256: model reference needs 64 hex digits")
        return ModelRef("hash", f"sha256:{digest}", digest)
    pin = _PIN.search(value)
    location = value[: pin.start()] if pin else value
    if "#" in location:
        raise InvalidParams("a model URL may end only with #sha256=<64 hex digits>")
    scheme = location.split("://", 1)[0].lower()
    kind: RefKind = "url" if scheme in ("http", "https") else "oss" if scheme == "oss" else "s3"
    parts = urlsplit(location)
    if not parts.netloc or (kind != "url" and not parts.path.strip("/")):
        raise InvalidParams(f"a {scheme}:// model reference needs a host and a path")
    return ModelRef(kind, location, pin[1].lower() if pin else None)


def model_loaders(extra: Collection[tuple[str, str, str]] = ()) -> dict[tuple[str, str], str]:
    """(class, input) -> folder for the inputs MODEL_INPUTS adds (the built-in ones go by name)."""
    return {(class_type, name): folder for class_type, name, folder in extra}


def folder_of(class_type: Any, input_name: str, extra: Mapping[tuple[str, str], str]) -> str | None:
    """The models folder a loader input reads, or None when it is not a model input."""
    key = (str(class_type), input_name)
    if key in extra:
        return extra[key]
    if key in MODEL_CLASS_INPUTS:
        return MODEL_CLASS_INPUTS[key]
    if input_name == "model_name":
        return None
    return MODEL_INPUT_FOLDERS.get(input_name)


def is_model_reference(class_type: Any, input_name: str, value: Any) -> bool:
    """Whether `value` is a model reference in a built-in model loader input (which ComfyUI
    will be given a placed name for, not this value)."""
    return (
        input_name in _MODEL_INPUT_NAMES
        and isinstance(value, str)
        and is_reference(value)
        and folder_of(class_type, input_name, {}) is not None
    )


def find_model_inputs(workflow: Mapping[str, Any], extra: Mapping[tuple[str, str], str]) -> list[ModelInput]:
    """The model references of an API-format workflow, in workflow order; InvalidParams (naming
    the node and input) for a malformed one."""
    found = []
    names = _MODEL_INPUT_NAMES | {name for _, name in extra}
    for node_id, node in workflow.items():
        inputs = node.get("inputs") if type(node) is dict else None  # JSON: dicts (an ABC check is slow)
        if type(inputs) is not dict:
            continue
        for name, value in inputs.items():
            if name not in names or not isinstance(value, str) or not is_reference(value):
                continue
            folder = folder_of(node.get("class_type"), name, extra)
            if folder is None:
                continue
            try:
                ref = parse_reference(value)
            except InvalidParams as exc:
                where = f"node {node_id} ({node.get('class_type')}) input '{name}': {exc.message}"
                raise InvalidParams(where, {"node_id": node_id, "input_name": name}) from exc
            found.append(ModelInput(str(node_id), name, folder, ref))
    return found


def check_folder(folder: str) -> str:
    """A models folder name: one safe path segment."""
    if not _FOLDER.fullmatch(folder) or folder in (".", ".."):
        raise InvalidParams(f"not a models folder name: {folder[:64]!r}")
    return folder


def check_name(name: str) -> str:
    """A model's file name inside its folder: one safe segment (no `/`, no leading `.`)."""
    if not _SAFE_NAME.fullmatch(name) or name.startswith("."):
        raise InvalidParams(f"not a model file name: {name[:64]!r} (letters, digits, . _ - + ( ) and spaces)")
    return name
