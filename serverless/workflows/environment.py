"""What a workflow needs that an instance lacks (pure): node classes its `/object_info` does not
list, and models a loader input names that are not among the input's options. Read from the
problems `validate_workflow` found, and answered as `raw.missing = {"nodes": [...], "models":
[...]}` of the refusal, before anything runs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .validate import Problem

MODEL_INPUTS = frozenset(
    {"ckpt_name", "lora_name", "vae_name", "unet_name", "clip_name", "control_net_name", "model_name"}
)
"""Inputs that name a model file whatever their node (CONTRACT section 8, "Models")."""


def is_model_reference(value: Any) -> bool:
    """A model fetched on demand (a URL, `oss://...`, `sha256:<hex>`): not missing, whatever the
    options say."""
    return isinstance(value, str) and ("://" in value or value.startswith("sha256:"))


def is_model_input(class_type: str | None, name: str | None) -> bool:
    """A model loader's input: one of MODEL_INPUTS, or a `..._name` input of a `...Loader` node
    (`clip_name1` of DualCLIPLoader, `style_model_name` of StyleModelLoader...)."""
    if name is None:
        return False
    if name in MODEL_INPUTS:
        return True
    return "Loader" in (class_type or "") and name.rstrip("0123456789").endswith("_name")


def missing(problems: Iterable[Problem]) -> dict[str, list[str]] | None:
    """`{"nodes": [...], "models": [...]}` (sorted, each once); None when nothing is missing."""
    nodes: set[str] = set()
    models: set[str] = set()
    for problem in problems:
        if problem.kind == "unknown_class_type" and problem.class_type:
            nodes.add(problem.class_type)
        elif (
            problem.kind == "value_not_in_list"
            and is_model_input(problem.class_type, problem.input)
            and isinstance(problem.received, str)
            and not is_model_reference(problem.received)
        ):
            models.add(problem.received)
    if not nodes and not models:
        return None
    return {"nodes": sorted(nodes), "models": sorted(models)}
