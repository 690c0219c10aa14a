"""The parameter schema of a hosted workflow (pure): which inputs a caller may change, of what
type and within what range, read from the workflow and ComfyUI's `/object_info`.

`/object_info` describes each input as `[TYPE, {options}]`: `"INT"`, `"FLOAT"`, `"STRING"`,
`"BOOLEAN"`, a COMBO as `[[option, ...], {...}]` (the old form) or `["COMBO", {"options": [...]}]`
(the new form), or a link type (`"MODEL"`, `"IMAGE"`...), in `required`, `optional` and `hidden`
sections; a node's outputs are `output`, a list of types.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ..core.workflow import SEED_INPUTS

ObjectInfo = Mapping[str, Any]
Workflow = Mapping[str, Any]
Loaders = Collection[tuple[str, str]]

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SECTIONS = ("required", "optional")  # `hidden` inputs are filled by ComfyUI, never by a caller


@dataclass(frozen=True, slots=True)
class InputSpec:
    """One declared input of a node class. `type` is a widget type (`WIDGET_TYPES`) or a link
    type; `options` is set for a COMBO."""

    type: str
    required: bool
    options: tuple[Any, ...] | None = None
    minimum: int | float | None = None
    maximum: int | float | None = None
    step: int | float | None = None
    multiline: bool = False
    default: Any = None


def _number(value: Any) -> int | float | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def parse_input_spec(raw: Any, required: bool) -> InputSpec:
    """One `/object_info` input entry, either COMBO form, into an `InputSpec`."""
    items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
    first = items[0] if items else "*"
    extra: Mapping[str, Any] = items[1] if len(items) > 1 and isinstance(items[1], Mapping) else {}
    options: tuple[Any, ...] | None = None
    if isinstance(first, (list, tuple)):
        kind, options = "COMBO", tuple(first)
    elif first == "COMBO":
        listed = extra.get("options")
        kind, options = "COMBO", tuple(listed) if isinstance(listed, (list, tuple)) else ()
    else:
        kind = str(first)
    return InputSpec(
        type=kind,
        required=required,
        options=options,
        minimum=_number(extra.get("min")),
        maximum=_number(extra.get("max")),
        step=_number(extra.get("step")),
        multiline=extra.get("multiline") is True,
        default=extra.get("default"),
    )


def node_inputs(object_info: ObjectInfo, class_type: str) -> Mapping[str, InputSpec] | None:
    """The declared (required and optional) inputs of a class; None when ComfyUI does not know it.
    Parsed once per `/object_info` entry (`_DECLARED`): every prompt's check asks for each of its
    nodes, and a loader's COMBO lists every model. The mapping is shared: a read-only view."""
    entry = object_info.get(class_type)
    if not isinstance(entry, Mapping):
        return None
    known = _DECLARED.get(class_type)
    if known is not None and known[0] is entry:
        return known[1]
    sections: Mapping[str, Any] = entry["input"] if isinstance(entry.get("input"), Mapping) else {}
    declared: dict[str, InputSpec] = {}
    for section in SECTIONS:
        inputs = sections.get(section)
        if isinstance(inputs, Mapping):
            for name, raw in inputs.items():
                declared[str(name)] = parse_input_spec(raw, section == "required")
    if len(_DECLARED) >= DECLARED_KEPT:
        _DECLARED.clear()
    _DECLARED[class_type] = (entry, declared)
    return declared


# A class's parsed inputs, by class, with the `/object_info` entry they were parsed from: an entry
# is never changed in place (a new `/object_info` brings new ones), so the same entry object means
# the same inputs.
_DECLARED: dict[str, tuple[Mapping[str, Any], Mapping[str, InputSpec]]] = {}
DECLARED_KEPT = 8192  # classes kept (a ComfyUI with every custom node has a few thousand)


def node_outputs(object_info: ObjectInfo, class_type: str) -> list[str]:
    """The output types of a class, by slot."""
    entry = object_info.get(class_type)
    outputs = entry.get("output") if isinstance(entry, Mapping) else None
    return [str(kind) for kind in outputs] if isinstance(outputs, list) else []


def is_output_node(object_info: ObjectInfo, class_type: str) -> bool:
    entry = object_info.get(class_type)
    return isinstance(entry, Mapping) and entry.get("output_node") is True


def is_link(value: Any) -> bool:
    """In an API-format workflow a list is always a link `[node_id, slot]` (well formed or not)."""
    return isinstance(value, list)


def node_order(node_id: str) -> tuple[int, int, str]:
    """Numeric ids in numeric order, then the others."""
    return (0, int(node_id), node_id) if node_id.isdigit() else (1, 0, node_id)


@dataclass(frozen=True, slots=True)
class Parameter:
    """One changeable input: a literal (not a link) input of a node ComfyUI knows. `default` is
    the stored value; `loader` inputs also take a URL, base64, `oss://` or `s3://`; `seed` inputs take -1
    (a random seed)."""

    node_id: str
    input: str
    class_type: str
    title: str | None
    spec: InputSpec
    default: Any
    loader: bool = False
    seed: bool = False
    unique_title: bool = False  # no other node bears this title: `<title>.<input>` names it too

    @property
    def key(self) -> str:
        """The flat-form name, `<node_id>.<input>`."""
        return f"{self.node_id}.{self.input}"

    @property
    def title_key(self) -> str | None:
        """The flat-form name by title, `<title>.<input>`, when the title is unique."""
        return f"{self.title}.{self.input}" if self.unique_title and self.title else None

    @property
    def description(self) -> str:
        """For a person: the node's title, and what the special inputs also take."""
        text = f"{self.title or self.class_type} (node {self.node_id}, {self.class_type}): {self.input}"
        if self.seed:
            text += "; -1 means a random seed (reported in data.seeds)"
        if self.loader:
            text += "; also a URL, base64, oss:// or s3:// (fetched and uploaded to ComfyUI)"
        return text

    def to_payload(self) -> dict[str, Any]:
        spec: dict[str, Any] = {"default": self.default}
        for name, value in (("min", self.spec.minimum), ("max", self.spec.maximum), ("step", self.spec.step)):
            if value is not None:
                spec[name] = value
        if self.spec.options is not None:
            spec["options"] = list(self.spec.options)
        if self.spec.type == "STRING":
            spec["multiline"] = self.spec.multiline
        payload: dict[str, Any] = {
            "name": self.key,
            "title_name": self.title_key,
            "node_id": self.node_id,
            "input": self.input,
            "class_type": self.class_type,
            "title": self.title,
            "type": self.spec.type,
            "spec": spec,
            "loader": self.loader,
        }
        if self.seed:
            payload["note"] = "-1 means a random seed, reported in data.seeds"
        return payload


def title_of(node: Mapping[str, Any]) -> str | None:
    meta = node.get("_meta")
    title = meta.get("title") if isinstance(meta, Mapping) else None
    return title if isinstance(title, str) and title else None


def unique_titles(workflow: Workflow) -> dict[str, str]:
    """title -> node id, for each title one node alone bears (and that is no other node's id)."""
    seen: dict[str, list[str]] = {}
    for node_id, node in workflow.items():
        title = title_of(node) if isinstance(node, Mapping) else None
        if title is not None:
            seen.setdefault(title, []).append(node_id)
    return {
        title: ids[0] for title, ids in seen.items() if len(ids) == 1 and (title == ids[0] or title not in workflow)
    }


def build_schema(workflow: Workflow, object_info: ObjectInfo, loaders: Loaders) -> list[Parameter]:
    """Every literal input that its node's class declares, in node order then input order."""
    parameters = []
    titled = set(unique_titles(workflow).values())
    for node_id in sorted(workflow, key=node_order):
        node = workflow[node_id]
        class_type = node.get("class_type") if isinstance(node, Mapping) else None
        inputs = node.get("inputs") if isinstance(node, Mapping) else None
        declared = node_inputs(object_info, class_type) if isinstance(class_type, str) else None
        if declared is None or not isinstance(inputs, Mapping):
            continue
        for name, value in inputs.items():
            spec = declared.get(name)
            if spec is None or is_link(value):
                continue
            parameters.append(
                Parameter(
                    node_id=node_id,
                    input=name,
                    class_type=str(class_type),
                    title=title_of(node),
                    spec=spec,
                    default=value,
                    loader=(class_type, name) in loaders,
                    seed=name in SEED_INPUTS and spec.type == "INT",
                    unique_title=node_id in titled,
                )
            )
    return parameters
