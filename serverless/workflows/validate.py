"""Checks of a workflow against `/object_info`, and of overrides against its schema (pure).

Every problem is collected, never just the first; `node_errors` renders them in the shape of
ComfyUI's own `/prompt` refusal (`{node_id: {"errors": [{type, message, details, extra_info}],
"dependent_outputs", "class_type"}}`), with `extra_info.allowed` saying what would be accepted.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..core.workflow import SEED_INPUTS
from ..models.refs import is_model_reference
from .schema import (
    InputSpec,
    Loaders,
    ObjectInfo,
    Parameter,
    Workflow,
    is_link,
    is_output_node,
    node_inputs,
    node_order,
    node_outputs,
)

MAX_LISTED_OPTIONS = 20  # in messages; `extra_info.allowed` has them all
REFRESHABLE = frozenset({"value_not_in_list", "unknown_class_type"})
"""Problems a newer `/object_info` may solve (a model or custom node added since it was read)."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong, at a node (and an input, when it is about one)."""

    node_id: str
    class_type: str | None
    input: str | None
    kind: str
    message: str
    allowed: Any = None
    received: Any = None

    def sentence(self) -> str:
        where = f"node {self.node_id}" if self.node_id else "the workflow"
        if self.class_type:
            where += f" ({self.class_type})"
        if self.input:
            where += f" input {self.input!r}"
        return f"{where}: {self.message}"


def summary(problems: list[Problem], what: str) -> str:
    """One message for a person naming every problem."""
    return f"{what}: " + "; ".join(problem.sentence() for problem in problems)


def prompt_error(problems: list[Problem]) -> dict[str, Any]:
    """`raw` of the refusal: ComfyUI's 400 body shape, `{"error", "node_errors"}`."""
    return {
        "error": {
            "type": "invalid_params",
            "message": "the workflow or its overrides failed validation",
            "details": "; ".join(p.sentence() for p in problems),
            "extra_info": {},
        },
        "node_errors": node_errors(problems),
    }


def node_errors(problems: list[Problem]) -> dict[str, Any]:
    errors: dict[str, Any] = {}
    for problem in problems:
        entry = errors.setdefault(
            problem.node_id, {"errors": [], "dependent_outputs": [], "class_type": problem.class_type}
        )
        extra: dict[str, Any] = {"allowed": problem.allowed}
        if problem.input is not None:
            extra["input_name"] = problem.input
        if problem.received is not None:
            extra["received_value"] = _json_safe(problem.received)
        entry["errors"].append(
            {
                "type": problem.kind,
                "message": problem.message,
                "details": problem.input or "",
                "extra_info": extra,
            }
        )
    return errors


def _listed(options: tuple[Any, ...]) -> str:
    if len(options) <= MAX_LISTED_OPTIONS:
        return ", ".join(repr(option) for option in options)
    return ", ".join(repr(option) for option in options[:MAX_LISTED_OPTIONS]) + f" ... ({len(options)} in all)"


def _json_safe(value: Any) -> Any:
    """A received value as strict JSON can carry it (NaN or Infinity as their text)."""
    try:
        json.dumps(value, allow_nan=False)
    except (ValueError, TypeError):
        return repr(value)[:200]
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_problem(spec: InputSpec, value: Any) -> tuple[str, Any] | None:
    """(message, allowed) when the value is not of the input's JSON type."""
    if spec.type == "INT" and not _is_int(value):
        return "must be a whole number", {"type": "INT"}
    if spec.type == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "must be a number", {"type": "FLOAT"}
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number", {"type": spec.type}
    if spec.type == "STRING" and not isinstance(value, str):
        return "must be a string", {"type": "STRING"}
    if spec.type == "BOOLEAN" and not isinstance(value, bool):
        return "must be true or false", {"type": "BOOLEAN"}
    return None


def check_value(spec: InputSpec, value: Any, seed: bool, loader: bool) -> tuple[str, str, Any] | None:
    """(kind, message, allowed) when `value` is not acceptable for `spec`, else None. A seed
    takes -1 (random); a loader input takes any string (a URL, base64, oss:// or s3:// as well as a file)."""
    if seed and _is_int(value) and value == -1:
        return None
    if loader:
        return None if isinstance(value, str) else ("invalid_input_type", "must be a string", {"type": "STRING"})
    wrong = _type_problem(spec, value)
    if wrong is not None:
        return "invalid_input_type", f"{value!r} is of the wrong type: {wrong[0]}", wrong[1]
    bounds = {k: v for k, v in (("min", spec.minimum), ("max", spec.maximum)) if v is not None}
    if seed:
        bounds["or"] = -1
    if spec.type in ("INT", "FLOAT"):
        if spec.minimum is not None and value < spec.minimum:
            return "value_smaller_than_min", f"{value} is smaller than the minimum {spec.minimum}", bounds
        if spec.maximum is not None and value > spec.maximum:
            return "value_bigger_than_max", f"{value} is bigger than the maximum {spec.maximum}", bounds
    if spec.type == "COMBO" and spec.options is not None and value not in spec.options:
        return "value_not_in_list", f"{value!r} is not one of {_listed(spec.options)}", {"options": list(spec.options)}
    return None


def validate_workflow(workflow: Workflow, object_info: ObjectInfo, loaders: Loaders) -> list[Problem]:
    """Every class known, every required input present, every link to an existing node and
    output slot of a fitting type, every literal of the right type and in range; and an output."""
    problems: list[Problem] = []
    outputs = 0
    for node_id in sorted(workflow, key=node_order):
        node = workflow[node_id]
        class_type = node.get("class_type") if isinstance(node, Mapping) else None
        if not isinstance(class_type, str):
            problems.append(Problem(node_id, None, None, "missing_class_type", "has no class_type"))
            continue
        declared = node_inputs(object_info, class_type)
        if declared is None:
            problems.append(
                Problem(
                    node_id,
                    class_type,
                    None,
                    "unknown_class_type",
                    f"ComfyUI has no node class {class_type!r} (a missing custom node?)",
                )
            )
            continue
        outputs += is_output_node(object_info, class_type)
        inputs: Mapping[str, Any] = node["inputs"] if isinstance(node.get("inputs"), Mapping) else {}
        problems += _node_problems(workflow, object_info, node_id, class_type, declared, inputs, loaders)
    if workflow and not problems and not outputs:
        problems.append(
            Problem(
                "",
                None,
                None,
                "prompt_no_outputs",
                "has no output node (SaveImage, PreviewImage...): nothing would run",
            )
        )
    return problems


def _node_problems(
    workflow: Workflow,
    object_info: ObjectInfo,
    node_id: str,
    class_type: str,
    declared: Mapping[str, InputSpec],
    inputs: Mapping[str, Any],
    loaders: Loaders,
) -> list[Problem]:
    problems = []
    for name, spec in declared.items():
        if name not in inputs:
            if spec.required:
                problems.append(
                    Problem(
                        node_id,
                        class_type,
                        name,
                        "required_input_missing",
                        "is required but missing",
                        {"type": spec.type},
                    )
                )
            continue
        value = inputs[name]
        if is_link(value):
            problem = _link_problem(workflow, object_info, spec, value)
            if problem is not None:
                problems.append(Problem(node_id, class_type, name, problem[0], problem[1], problem[2], value))
            continue
        loader = (class_type, name) in loaders or is_model_reference(class_type, name, value)
        wrong = check_value(spec, value, name in SEED_INPUTS and spec.type == "INT", loader)
        if wrong is not None:
            problems.append(Problem(node_id, class_type, name, wrong[0], wrong[1], wrong[2], value))
    return problems


def _types_fit(given: str, wanted: str) -> bool:
    """Link compatibility as ComfyUI has it: `*` fits all, else the comma-separated unions meet."""
    if "*" in (given, wanted) or given == wanted:
        return True
    return bool({t.strip() for t in given.split(",")} & {t.strip() for t in wanted.split(",")})


def _link_problem(
    workflow: Workflow, object_info: ObjectInfo, spec: InputSpec, link: list[Any]
) -> tuple[str, str, Any] | None:
    if len(link) != 2 or not isinstance(link[0], str) or not _is_int(link[1]):
        return "bad_linked_input", "a link must be [node_id, output_slot]", {"link": spec.type}
    source_id, slot = link
    source = workflow.get(source_id)
    if not isinstance(source, Mapping):
        return (
            "bad_linked_input",
            f"links to node {source_id!r}, which is not in the workflow",
            {"nodes": sorted(workflow, key=node_order)},
        )
    source_class = source.get("class_type")
    if not isinstance(source_class, str) or node_inputs(object_info, source_class) is None:
        return None  # that node's own problem is reported there
    outputs = node_outputs(object_info, source_class)
    if not 0 <= slot < len(outputs):
        return (
            "bad_linked_input",
            f"links to output {slot} of node {source_id} ({source_class}), which has {len(outputs)} output(s)",
            {"outputs": outputs},
        )
    wanted = "COMBO" if spec.type == "COMBO" else spec.type
    if not _types_fit(outputs[slot], wanted):
        return (
            "return_type_mismatch",
            f"takes {wanted} but output {slot} of node {source_id} ({source_class}) gives {outputs[slot]}",
            {"type": wanted},
        )
    return None


Overrides = dict[tuple[str, str], Any]


def validate_overrides(overrides: Overrides, parameters: list[Parameter], workflow: Workflow) -> list[Problem]:
    """Each override names a parameter of the schema and has a value it accepts. Overriding a
    link is refused, unless with the very same link (a caller sending the whole workflow back)."""
    by_key = {(p.node_id, p.input): p for p in parameters}
    problems = []
    for (node_id, name), value in overrides.items():
        parameter = by_key.get((node_id, name))
        node = workflow.get(node_id)
        class_type = node.get("class_type") if isinstance(node, Mapping) else None
        if parameter is None:
            problem = _not_a_parameter(node_id, name, value, class_type, node, parameters)
            if problem is not None:
                problems.append(problem)
            continue
        wrong = check_value(parameter.spec, value, parameter.seed, parameter.loader)
        if wrong is not None:
            problems.append(Problem(node_id, parameter.class_type, name, wrong[0], wrong[1], wrong[2], value))
    return problems


def _not_a_parameter(
    node_id: str, name: str, value: Any, class_type: Any, node: Any, parameters: list[Parameter]
) -> Problem | None:
    if not isinstance(node, Mapping):
        nodes = sorted({p.node_id for p in parameters}, key=node_order)
        return Problem(
            node_id, None, name, "unknown_node", "there is no such node in this workflow", {"nodes": nodes}, value
        )
    own = [p.input for p in parameters if p.node_id == node_id]
    inputs: Mapping[str, Any] = node["inputs"] if isinstance(node.get("inputs"), Mapping) else {}
    stored = inputs.get(name)
    if is_link(stored):
        if value == stored:
            return None
        return Problem(
            node_id,
            str(class_type),
            name,
            "link_overridden",
            f"is linked to node {stored[0] if stored else '?'}, not a value that can be changed",
            {"inputs": own},
            value,
        )
    return Problem(
        node_id,
        str(class_type),
        name,
        "unknown_input",
        f"is not a parameter of this node; it has: {', '.join(own) or 'none'}",
        {"inputs": own},
        value,
    )
