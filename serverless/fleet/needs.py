"""What a job needs of a worker, and what a worker holds (pure): the node classes of its workflow
and the model files its loaders name; a worker's node classes and model files come from its
ComfyUI's `/object_info` (a loader's input lists the files it can load)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# The loader inputs that name a model file (CONTRACT section 8, "Models").
MODEL_INPUTS = frozenset(
    {"ckpt_name", "lora_name", "vae_name", "unet_name", "clip_name", "control_net_name", "model_name"}
)


@dataclass(frozen=True, slots=True)
class Needs:
    """A job's node classes and the model files its loaders name."""

    nodes: frozenset[str]
    models: frozenset[str]

    def to_wire(self) -> dict[str, list[str]]:
        return {"nodes": sorted(self.nodes), "models": sorted(self.models)}

    @classmethod
    def from_wire(cls, raw: Any) -> Needs:
        raw = raw if isinstance(raw, dict) else {}
        return cls(frozenset(_strings(raw.get("nodes"))), frozenset(_strings(raw.get("models"))))


def needs_of(workflow: Mapping[str, Any], model_inputs: Iterable[str] = MODEL_INPUTS) -> Needs:
    """The needs of an API-format workflow."""
    names = frozenset(model_inputs)
    nodes: set[str] = set()
    models: set[str] = set()
    for node in workflow.values():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            continue
        nodes.add(node["class_type"])
        inputs = node.get("inputs")
        for name, value in inputs.items() if isinstance(inputs, dict) else ():
            if name in names and isinstance(value, str) and value and not _fetched(value):
                models.add(value)
    return Needs(frozenset(nodes), frozenset(models))


async def needs_of_spec(workflow: Mapping[str, Any], big: bool) -> Needs:
    """`needs_of`, in a thread for a big workflow (the event loop never walks thousands of nodes)."""
    if big:
        return await asyncio.to_thread(needs_of, workflow)
    return needs_of(workflow)


def model_files(object_info: Mapping[str, Any], model_inputs: Iterable[str] = MODEL_INPUTS) -> frozenset[str]:
    """The model files a ComfyUI can load: the options of its loaders' model inputs."""
    names = frozenset(model_inputs)
    found: set[str] = set()
    for entry in object_info.values():
        inputs = entry.get("input") if isinstance(entry, dict) else None
        for group in (inputs or {}).values() if isinstance(inputs, dict) else ():
            if not isinstance(group, dict):
                continue
            for name, spec in group.items():
                if name in names and isinstance(spec, list) and spec:
                    found.update(option for option in _options(spec) if isinstance(option, str))
    return frozenset(found)


def _fetched(value: str) -> bool:
    """A model named by where to fetch it (a URL, `sha256:<hex>`): fetched on demand, by any worker."""
    return "://" in value or value.startswith("sha256:")


def _options(spec: list[Any]) -> list[Any]:
    """A combo input's options: `[[...], {...}]`, or the newer `["COMBO", {"options": [...]}]`."""
    if isinstance(spec[0], list):
        return spec[0]
    extra = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    options = extra.get("options") if spec[0] == "COMBO" else None
    return options if isinstance(options, list) else []


def _strings(value: Any) -> list[str]:
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []
