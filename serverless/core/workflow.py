"""Workflow preparation (pure): random seeds and per-instance output names.

Returns new objects; the caller's workflow is never changed in place.
"""

from __future__ import annotations

import copy
import posixpath
import random
import re
from dataclasses import dataclass
from typing import Any

from ..errors import InvalidParams

SEED_INPUTS = ("seed", "noise_seed")
SEED_LIMIT = 2**32
PREFIX_INPUT = "filename_prefix"
DEFAULT_PREFIX = "ComfyUI"
SAVE_IMAGE = "SaveImage"

Workflow = dict[str, Any]
Seeds = dict[str, dict[str, int]]


@dataclass(frozen=True, slots=True)
class PreparedWorkflow:
    """The workflow to submit and the seeds chosen for `-1` inputs (node id -> input -> value)."""

    workflow: Workflow
    seeds: Seeds


def safe_instance_suffix(instance_id: str) -> str:
    """Instance ids become part of file names: keep only characters that are safe there."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", instance_id)[:64] or "instance"


def _is_minus_one(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value == -1


def randomize_seeds(workflow: Workflow, rng: random.Random) -> Seeds:
    """Replace every `seed`/`noise_seed` input equal to -1 (KSampler, KSamplerAdvanced,
    RandomNoise, custom nodes...) by a random integer in [0, 2**32), in place on `workflow`."""
    seeds: Seeds = {}
    for node_id, node in workflow.items():
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            continue
        for name in SEED_INPUTS:
            if _is_minus_one(inputs.get(name)):
                inputs[name] = rng.randrange(SEED_LIMIT)
                seeds.setdefault(node_id, {})[name] = inputs[name]
    return seeds


def suffix_output_prefixes(workflow: Workflow, instance_id: str) -> None:
    """Append `_<instance id>` to every string `filename_prefix` (SaveImage and other savers),
    in place, because instances share one output folder on NAS and would overwrite each other."""
    suffix = "_" + safe_instance_suffix(instance_id)
    for node in workflow.values():
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            continue
        prefix = inputs.get(PREFIX_INPUT)
        if prefix is None and node.get("class_type") == SAVE_IMAGE:
            prefix = DEFAULT_PREFIX
        if isinstance(prefix, str):
            inputs[PREFIX_INPUT] = prefix + suffix


def check_output_paths(workflow: Workflow, reserved: tuple[tuple[str, ...], ...]) -> None:
    """Refuse a `filename_prefix` that leaves ComfyUI's output folder or reaches into one of ours
    inside it (`reserved`: paths relative to the output folder, e.g. the status logs'
    `("serverless_api",)`), where a saved file or folder would take the place of a task's log."""
    for node_id, node in workflow.items():
        inputs = node.get("inputs")
        prefix = inputs.get(PREFIX_INPUT) if isinstance(inputs, dict) else None
        if not isinstance(prefix, str):
            continue
        normalized = posixpath.normpath(prefix.replace("\\", "/"))
        parts = tuple(part for part in normalized.split("/") if part not in ("", "."))
        if prefix.startswith(("/", "\\")) or ".." in parts:
            raise InvalidParams(f"node {node_id}: filename_prefix {prefix!r} leaves the output folder")
        for folder in reserved:
            if len(parts) > len(folder) and parts[: len(folder)] == folder:
                raise InvalidParams(
                    f"node {node_id}: filename_prefix {prefix!r} writes into {'/'.join(folder)}/, "
                    "which this service keeps for itself"
                )


def copy_json(value: Any) -> Any:
    """A deep copy of JSON-shaped data (dicts, lists, immutable scalars), several times faster than
    `copy.deepcopy`, which it leaves anything else to."""
    kind = type(value)
    if kind is dict:
        return {key: copy_json(item) for key, item in value.items()}
    if kind is list:
        return [copy_json(item) for item in value]
    if kind in _IMMUTABLE:
        return value
    return copy.deepcopy(value)


_IMMUTABLE = frozenset({str, int, float, bool, type(None)})


def prepare_workflow(workflow: Workflow, instance_id: str | None, rng: random.Random | None = None) -> PreparedWorkflow:
    """Seeds and output names (suffixed with `instance_id`, unless None), on a deep copy of `workflow`."""
    prepared = copy_json(workflow)
    seeds = randomize_seeds(prepared, rng or random.SystemRandom())
    if instance_id is not None:
        suffix_output_prefixes(prepared, instance_id)
    return PreparedWorkflow(prepared, seeds)
