"""`POST /prompt` validation, producing ComfyUI 0.3.64's error bodies.

Each output node is checked with everything upstream of it; outputs that fail are dropped and
reported in `node_errors`. Only when no output survives is the whole prompt refused (HTTP 400).
Like ComfyUI, constant inputs are converted in place (`"64"` becomes `64` in the queued prompt).
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from typing import Any

from .folders import Folders
from .nodes import NODE_CLASSES
from .specs import NodeSpecs

Error = dict[str, Any]
Checked = tuple[bool, list[Error], str]
CONVERTERS = {"INT": int, "FLOAT": float, "STRING": str, "BOOLEAN": bool}
MAX_LISTED_OPTIONS = 20


@dataclass
class Validation:
    """Outcome: `ok` with the outputs to run, or the `error` body; `node_errors` in both cases."""

    ok: bool
    error: Error | None
    outputs: list[str]
    node_errors: dict[str, Any]


def validate_prompt(
    specs: NodeSpecs, folders: Folders, prompt: dict[str, Any], targets: list[str] | None
) -> Validation:
    """Validate a whole prompt; `targets` restricts the outputs (`partial_execution_targets`)."""
    outputs = []
    for node_id, node in prompt.items():
        if "class_type" not in node:
            return _refused(
                "invalid_prompt",
                "Cannot execute because a node is missing the class_type property.",
                f"Node ID '#{node_id}'",
            )
        class_type = node["class_type"]
        if not specs.has(class_type):
            return _refused(
                "invalid_prompt", f"Cannot execute because node {class_type} does not exist.", f"Node ID '#{node_id}'"
            )
        if specs.is_output(class_type) and (targets is None or node_id in targets):
            outputs.append(node_id)
    if not outputs:
        return _refused("prompt_no_outputs", "Prompt has no outputs", "")
    return _Validator(specs, folders, prompt).check_outputs(outputs)


def error_body(kind: str, message: str, details: str) -> Error:
    return {"type": kind, "message": message, "details": details, "extra_info": {}}


def _refused(kind: str, message: str, details: str) -> Validation:
    return Validation(False, error_body(kind, message, details), [], {})


def _type_name(ex: BaseException) -> str:
    cls = type(ex)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _types_match(received: Any, expected: Any) -> bool:
    """Link compatibility: equal, either side "*" (IO.ANY), or overlapping comma-separated unions."""
    if received == expected or "*" in (received, expected):
        return True
    if not isinstance(received, str) or not isinstance(expected, str):
        return False
    return bool({t.strip() for t in received.split(",")} & {t.strip() for t in expected.split(",")})


class _Validator:
    """One validation run; `validated` memoises nodes shared by several outputs."""

    def __init__(self, specs: NodeSpecs, folders: Folders, prompt: dict[str, Any]) -> None:
        self.specs = specs
        self.folders = folders
        self.prompt = prompt
        self.validated: dict[str, Checked] = {}

    def check_outputs(self, outputs: list[str]) -> Validation:
        good: list[str] = []
        failed: list[Error] = []
        node_errors: dict[str, Any] = {}
        for output in outputs:
            valid, reasons = self._check_output(output)
            if valid:
                good.append(output)
                continue
            failed += reasons
            self._collect_node_errors(output, node_errors)
        if not good:
            details = "\n".join(f"{e['message']}: {e['details']}" for e in failed)
            error = error_body("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
            return Validation(False, error, [], node_errors)
        return Validation(True, None, good, node_errors)

    def _check_output(self, output: str) -> tuple[bool, list[Error]]:
        try:
            valid, reasons, _ = self.validate(output)
        except Exception as ex:
            reasons = [
                {
                    "type": "exception_during_validation",
                    "message": "Exception when validating node",
                    "details": str(ex),
                    "extra_info": {
                        "exception_type": _type_name(ex),
                        "traceback": traceback.format_tb(ex.__traceback__),
                    },
                }
            ]
            self.validated[output] = (False, reasons, output)
            return False, reasons
        return valid, reasons

    def _collect_node_errors(self, output: str, node_errors: dict[str, Any]) -> None:
        # As in ComfyUI, every failed node seen so far is charged to this output too.
        for node_id, (valid, reasons, _) in self.validated.items():
            if valid or not reasons:
                continue
            if node_id not in node_errors:
                node_errors[node_id] = {
                    "errors": reasons,
                    "dependent_outputs": [],
                    "class_type": self.prompt[node_id]["class_type"],
                }
            node_errors[node_id]["dependent_outputs"].append(output)

    def validate(self, node_id: str) -> Checked:
        """Check one node and, through its links, everything upstream (memoised)."""
        if node_id in self.validated:
            return self.validated[node_id]
        node = self.prompt[node_id]
        class_type, inputs = node["class_type"], node["inputs"]
        types = self.specs.input_types(class_type)
        custom = NODE_CLASSES[class_type].VALIDATE_ARGS
        errors: list[Error] = []
        valid = True
        for name in self.specs.declared_inputs(class_type):
            input_type, category, extra = self.specs.input_info(class_type, name, types)
            if name not in inputs:
                if category == "required":
                    errors.append(
                        {
                            "type": "required_input_missing",
                            "message": "Required input is missing",
                            "details": name,
                            "extra_info": {"input_name": name},
                        }
                    )
                continue
            info = [input_type, extra]
            if isinstance(inputs[name], list):
                error, upstream_ok = self._check_link(name, inputs[name], input_type, info)
                valid = valid and upstream_ok
            else:
                error = self._check_constant(inputs, name, info, name in custom)
            if error is not None:
                errors.append(error)
        errors += self._custom_checks(class_type, inputs, custom)
        checked: Checked = (False, errors, node_id) if errors or not valid else (True, [], node_id)
        self.validated[node_id] = checked
        return checked

    def _check_link(self, name: str, link: list[Any], input_type: Any, info: list[Any]) -> tuple[Error | None, bool]:
        """(error, upstream valid) for an input linked to another node's output."""
        if len(link) != 2:
            return {
                "type": "bad_linked_input",
                "message": "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                "details": name,
                "extra_info": {"input_name": name, "input_config": info, "received_value": link},
            }, True
        source_id = link[0]
        received = self.specs.return_types(self.prompt[source_id]["class_type"])[link[1]]
        if not _types_match(received, input_type):
            return {
                "type": "return_type_mismatch",
                "message": "Return type mismatch between linked nodes",
                "details": f"{name}, received_type({received}) mismatch input_type({input_type})",
                "extra_info": {
                    "input_name": name,
                    "input_config": info,
                    "received_type": received,
                    "linked_node": link,
                },
            }, True
        try:
            return None, self.validate(source_id)[0]
        except Exception as ex:
            self.validated[source_id] = (
                False,
                [
                    {
                        "type": "exception_during_inner_validation",
                        "message": "Exception when validating inner node",
                        "details": str(ex),
                        "extra_info": {
                            "input_name": name,
                            "input_config": info,
                            "exception_message": str(ex),
                            "exception_type": _type_name(ex),
                            "traceback": traceback.format_tb(ex.__traceback__),
                            "linked_node": link,
                        },
                    }
                ],
                source_id,
            )
            return None, False

    def _check_constant(self, inputs: dict[str, Any], name: str, info: list[Any], custom: bool) -> Error | None:
        """Convert a constant to its declared type, then check min, max and list membership."""
        input_type = info[0]
        value = inputs[name]
        if isinstance(value, dict) and "__value__" in value:
            value = inputs[name] = value["__value__"]
        try:
            if isinstance(input_type, str) and input_type in CONVERTERS:
                value = inputs[name] = CONVERTERS[input_type](value)
        except Exception as ex:
            return {
                "type": "invalid_input_type",
                "message": f"Failed to convert an input value to a {input_type} value",
                "details": f"{name}, {value}, {ex}",
                "extra_info": {
                    "input_name": name,
                    "input_config": info,
                    "received_value": value,
                    "exception_message": str(ex),
                },
            }
        if custom:
            return None
        return _range_error(name, value, info) or _list_error(name, value, info)

    def _custom_checks(self, class_type: str, inputs: dict[str, Any], names: tuple[str, ...]) -> list[Error]:
        """The node's own check (ComfyUI's VALIDATE_INPUTS), e.g. LoadImage's file must exist."""
        values = {n: (None if isinstance(inputs[n], list) else inputs[n]) for n in names if n in inputs}
        if not values or len(values) < len(names):
            return []
        result = NODE_CLASSES[class_type].validate(self.folders, **values)
        if result is True:
            return []
        suffix = "" if result is False else f" - {result}"
        return [
            {
                "type": "custom_validation_failed",
                "message": "Custom validation failed for node",
                "details": f"{n}{suffix}",
                "extra_info": {"input_name": n},
            }
            for n in values
        ]


def _range_error(name: str, value: Any, info: list[Any]) -> Error | None:
    extra = info[1]
    if "min" in extra and value < extra["min"]:
        kind, message = "value_smaller_than_min", f"Value {value} smaller than min of {extra['min']}"
    elif "max" in extra and value > extra["max"]:
        kind, message = "value_bigger_than_max", f"Value {value} bigger than max of {extra['max']}"
    else:
        return None
    return {
        "type": kind,
        "message": message,
        "details": name,
        "extra_info": {"input_name": name, "input_config": info, "received_value": value},
    }


def _list_error(name: str, value: Any, info: list[Any]) -> Error | None:
    options = info[0]
    if not isinstance(options, list) or value in options:
        return None
    # Long lists (e.g. scanned model files) are not echoed back, as in ComfyUI.
    short = len(options) <= MAX_LISTED_OPTIONS
    listed = str(options) if short else f"(list of length {len(options)})"
    return {
        "type": "value_not_in_list",
        "message": "Value not in list",
        "details": f"{name}: '{value}' not in {listed}",
        "extra_info": {"input_name": name, "input_config": info if short else None, "received_value": value},
    }
