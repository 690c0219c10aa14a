"""The body of a hosted run (pure): overrides of a stored workflow, in any of three forms, read
into one `{(node_id, input): value}` mapping, then merged into a copy of the workflow.

    advanced (GenStudio)  {"<node_id>": {"inputs": {"<input>": value}}}, bare or under "prompt"
    flat                  {"<node_id>.<input>": value}, or {"<title>.<input>": value} where no other
                          node bears that title (in every form a unique title names its node)
    simple (Flask)        {"prompt": "text", "target_node": "<node_id>"}: the text goes to that
                          node's `text` input, or without `target_node` to the positive prompt

The forms mix in one body (`{"prompt": "a cat", "3.seed": -1}`); `extra_data` passes to ComfyUI
as in an ordinary run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..core.request import MAX_INPUT_DEPTH, _depth
from ..core.workflow import copy_json
from ..errors import InvalidParams
from .schema import ObjectInfo, Workflow, is_link, node_inputs, node_order, unique_titles
from .validate import Overrides, Problem

TEXT_INPUT = "text"
POSITIVE_INPUT = "positive"
PROMPT_CLASS = "CLIPTextEncode"
NODE_KEYS = frozenset({"inputs", "class_type", "_meta"})
OUTPUT_KEYS = frozenset({"format", "quality", "max_side"})
FORMS_HINT = 'use {"<node_id>": {"inputs": {...}}}, {"<node_id>.<input>": value} or {"prompt": "text"}'


@dataclass(frozen=True, slots=True)
class ParsedOverrides:
    """What a run body asks to change, what it passes to ComfyUI, and what is wrong with its shape."""

    values: Overrides
    extra_data: dict[str, Any] | None = None
    problems: list[Problem] = field(default_factory=list)
    output: dict[str, Any] | None = None  # `{"format", "quality", "max_side"}`: how outputs are delivered


def parse_overrides(document: Any, workflow: Workflow, object_info: ObjectInfo) -> ParsedOverrides:
    """Read a decoded run body (None: no body, no overrides); raise InvalidParams when it is not an object."""
    if document is None:
        return ParsedOverrides({})
    if not isinstance(document, dict):
        raise InvalidParams("the body of a hosted run must be a JSON object of overrides; " + FORMS_HINT)
    values: Overrides = {}
    problems: list[Problem] = []
    titles = unique_titles(workflow)
    extra_data = _extra_data(document.get("extra_data"))
    output = _output(document.get("output"))
    prompt = document.get("prompt")
    if isinstance(prompt, dict) and "inputs" in prompt and "inputs" not in workflow:
        _advanced({"prompt": prompt}, workflow, titles, values, problems)  # the workflow's node named "prompt"
    elif isinstance(prompt, dict):
        _advanced(prompt, workflow, titles, values, problems)
    elif isinstance(prompt, str):
        target = document.get("target_node")
        target = titles.get(target, target) if isinstance(target, str) and target not in workflow else target
        _simple(prompt, target, workflow, object_info, values, problems)
    elif prompt is not None:
        problems.append(Problem("prompt", None, None, "invalid_overrides", "must be a text or an object of nodes"))
    for key, value in document.items():
        if key in ("prompt", "extra_data", "target_node", "output"):
            continue
        if isinstance(value, dict) and "inputs" in value:
            _advanced({key: value}, workflow, titles, values, problems)
        elif "." in key:
            node, _, name = key.rpartition(".")
            _set(values, (resolve_node(node, workflow, titles), name), value, key, problems)
        else:
            problems.append(Problem(key, None, None, "invalid_overrides", f"is not an override: {FORMS_HINT}"))
    if "target_node" in document and not isinstance(prompt, str):
        problems.append(
            Problem("target_node", None, None, "invalid_overrides", 'goes with a text "prompt" (the simple form)')
        )
    return ParsedOverrides(values, extra_data, problems, output)


def _output(value: Any) -> dict[str, Any] | None:
    """The body's delivery options (checked further with the query's, at the edge)."""
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) - OUTPUT_KEYS:
        raise InvalidParams('output must be an object of "format", "quality" and "max_side"')
    return value


def _extra_data(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise InvalidParams("extra_data must be a JSON object")
    # ComfyUI deep-copies extra_data in its prompt worker: too deep, and the worker dies.
    if _depth(value) > MAX_INPUT_DEPTH:
        raise InvalidParams(f"extra_data is nested more than {MAX_INPUT_DEPTH} levels deep")
    return value


def resolve_node(name: str, workflow: Workflow, titles: Mapping[str, str]) -> str:
    """A node named by its id, or by its title where no other node bears it."""
    return name if name in workflow else titles.get(name, name)


def _set(values: Overrides, where: tuple[str, str], value: Any, key: str, problems: list[Problem]) -> None:
    """One override; the same input given twice (by id and by title) must agree."""
    if where in values and values[where] != value:
        problems.append(
            Problem(where[0], None, where[1], "invalid_overrides", f"is given twice with different values ({key!r})")
        )
    values[where] = value


def _advanced(
    nodes: Mapping[str, Any], workflow: Workflow, titles: Mapping[str, str], values: Overrides, problems: list[Problem]
) -> None:
    for name, node in nodes.items():
        node_id = resolve_node(name, workflow, titles)
        if not isinstance(node, dict) or not isinstance(node.get("inputs"), dict):
            problems.append(Problem(node_id, None, None, "invalid_overrides", 'must be {"inputs": {...}}'))
            continue
        stored = workflow.get(node_id)
        stored_class = stored.get("class_type") if isinstance(stored, Mapping) else None
        for key in sorted(set(node) - NODE_KEYS):
            problems.append(Problem(node_id, stored_class, None, "invalid_overrides", f"unexpected key {key!r}"))
        if "class_type" in node and stored is not None and node["class_type"] != stored_class:
            problems.append(
                Problem(
                    node_id,
                    stored_class,
                    None,
                    "class_type_changed",
                    f"is a {stored_class}; an override cannot make it a {node['class_type']}",
                    {"class_type": stored_class},
                    node["class_type"],
                )
            )
        for input_name, value in node["inputs"].items():
            _set(values, (node_id, input_name), value, f"{name}.{input_name}", problems)


def _simple(
    text: str, target: Any, workflow: Workflow, object_info: ObjectInfo, values: Overrides, problems: list[Problem]
) -> None:
    if target is not None and not isinstance(target, str):
        problems.append(Problem("target_node", None, None, "invalid_overrides", "must be a node id (a string)"))
        return
    node_id = target or positive_prompt_node(workflow, object_info)
    if node_id is None:
        problems.append(
            Problem(
                "",
                None,
                TEXT_INPUT,
                "no_prompt_node",
                'has no single positive-prompt text node: name one with "target_node"',
                {"nodes": text_nodes(workflow, object_info)},
            )
        )
        return
    values[(node_id, TEXT_INPUT)] = text


def text_nodes(workflow: Workflow, object_info: ObjectInfo) -> list[str]:
    """Nodes with a literal `text` input that is multiline (a prompt box), CLIPTextEncode included."""
    found = []
    for node_id in sorted(workflow, key=node_order):
        node = workflow[node_id]
        inputs = node.get("inputs") if isinstance(node, Mapping) else None
        if not isinstance(inputs, Mapping) or TEXT_INPUT not in inputs or is_link(inputs[TEXT_INPUT]):
            continue
        class_type = node.get("class_type")
        declared = node_inputs(object_info, class_type) if isinstance(class_type, str) else None
        spec = declared.get(TEXT_INPUT) if declared else None
        if class_type == PROMPT_CLASS or (spec is not None and spec.type == "STRING" and spec.multiline):
            found.append(node_id)
    return found


def positive_prompt_node(workflow: Workflow, object_info: ObjectInfo) -> str | None:
    """The first text node whose output reaches a sampler's `positive` input (through any chain of
    conditioning nodes); else the only text node; else None."""
    candidates = text_nodes(workflow, object_info)
    consumers = _consumers(workflow)
    for node_id in candidates:
        if _reaches_positive(node_id, consumers):
            return node_id
    return candidates[0] if len(candidates) == 1 else None


def _consumers(workflow: Workflow) -> dict[str, list[tuple[str, str]]]:
    """node id -> the (node, input) pairs its outputs are linked to."""
    consumers: dict[str, list[tuple[str, str]]] = {}
    for node_id, node in workflow.items():
        inputs = node.get("inputs") if isinstance(node, Mapping) else None
        for name, value in inputs.items() if isinstance(inputs, Mapping) else ():
            if is_link(value) and value and isinstance(value[0], str):
                consumers.setdefault(value[0], []).append((node_id, name))
    return consumers


def _reaches_positive(start: str, consumers: dict[str, list[tuple[str, str]]]) -> bool:
    seen, queue = {start}, deque([start])
    while queue:
        for node_id, name in consumers.get(queue.popleft(), []):
            if name == POSITIVE_INPUT:
                return True
            if node_id not in seen:
                seen.add(node_id)
                queue.append(node_id)
    return False


def merge(workflow: Workflow, values: Overrides) -> dict[str, Any]:
    """A copy of the workflow with the overrides set; the stored workflow is never changed."""
    merged: dict[str, Any] = copy_json(dict(workflow))
    for (node_id, name), value in values.items():
        merged[node_id]["inputs"][name] = copy_json(value)
    return merged
