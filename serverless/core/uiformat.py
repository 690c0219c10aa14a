"""The editor's saved workflow (the UI format) into the API format, with the instance's
`/object_info` (pure): what ComfyUI's frontend sends when it queues that graph.

A node's `widgets_values` are its widgets' values, in the order of its class's declared inputs
(`input_order`, required then optional) that are widgets (INT, FLOAT, STRING, BOOLEAN, COMBO not
`forceInput`), with the frontend's own widgets among them: `control_after_generate` after an INT
whose options say so or, when they do not say, that is named `seed`/`noise_seed` (and a COMBO's
control plus its filter when its options say so), and the `upload` button an image, video or
audio upload combo adds after the required inputs; none of these reach ComfyUI. A value
missing from `widgets_values` takes the input's default. Links then replace values (see `uilinks`
for how they are followed); list values are sent as `{"__value__": [...]}`. Titles go to
`_meta.title` (the class's display name when the node has none). `Note`, `MarkdownNote`,
`Reroute`, `PrimitiveNode` and groups make no node. Whatever could not be kept is told in `notes`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidParams
from .uigraph import BYPASSED, FRONTEND_ONLY, MUTED, Dropped, Executable, Origin, Value, is_ui_format
from .uilinks import FlatGraph

__all__ = ["Converted", "UIFormatWorkflow", "convert", "is_ui_format", "missing_classes"]

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")
UPLOAD_OPTIONS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
UPLOAD_WIDGET = "upload"


class UIFormatWorkflow(InvalidParams):
    """Raised by request parsing (which has no `/object_info`) for a UI-format document, so that
    its caller converts it; anyone who does not is refused with this message."""

    def __init__(self, document: dict[str, Any], extra_data: dict[str, Any] | None) -> None:
        super().__init__(
            "this is a UI-format workflow (it has 'nodes' and 'links'); it cannot be converted here: "
            "send the API format ('Export (API)' in ComfyUI), or convert it with POST /api/workflows/convert"
        )
        self.document = document
        self.extra_data = extra_data


@dataclass(frozen=True, slots=True)
class Converted:
    """The API-format prompt, and a sentence for each thing of the UI graph it could not keep."""

    prompt: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def to_payload(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "notes": self.notes}


@dataclass(frozen=True, slots=True)
class Widget:
    name: str
    default: Any
    sent: bool  # the frontend's own widgets (seed controls) are saved but never sent


def _declared(entry: Mapping[str, Any]) -> list[tuple[str, str, Mapping[str, Any], bool]]:
    """(name, type, options, required) of each declared input, in the class's order."""
    sections: Mapping[str, Any] = entry["input"] if isinstance(entry.get("input"), Mapping) else {}
    order: Mapping[str, Any] = entry["input_order"] if isinstance(entry.get("input_order"), Mapping) else {}
    declared = []
    for section in ("required", "optional"):
        inputs = sections.get(section)
        if not isinstance(inputs, Mapping):
            continue
        listed = order.get(section)
        names = [n for n in listed if n in inputs] if isinstance(listed, list) else []
        names = names or list(inputs)
        for name in names:
            raw = inputs[name]
            items = list(raw) if isinstance(raw, (list, tuple)) else [raw]
            first = items[0] if items else "*"
            options = items[1] if len(items) > 1 and isinstance(items[1], Mapping) else {}
            if isinstance(first, (list, tuple)):
                options = {**options, "options": list(first)}
                first = "COMBO"
            declared.append((str(name), str(first), options, section == "required"))
    return declared


def _default(kind: str, options: Mapping[str, Any]) -> Any:
    if options.get("default") is not None:
        return options["default"]
    if kind in ("INT", "FLOAT"):
        return options.get("min", 0)
    if kind == "COMBO":
        listed = options.get("options")
        return listed[0] if isinstance(listed, list) and listed else None
    return {"STRING": "", "BOOLEAN": False}.get(kind)


def widgets(entry: Mapping[str, Any]) -> list[Widget]:
    """The widgets the frontend gives a node of this class, in `widgets_values` order."""
    found: list[Widget] = []
    upload = False
    declared = _declared(entry)
    for index, (name, kind, options, required) in enumerate(declared):
        if kind in WIDGET_TYPES and not options.get("forceInput"):
            found.append(Widget(name, _default(kind, options), True))
            control = options.get("control_after_generate")
            if kind == "INT" and (control if control is not None else name in SEED_NAMES):
                found.append(Widget("control_after_generate", "fixed", False))
            elif kind == "COMBO" and control:
                found += [Widget("control_after_generate", "fixed", False), Widget("control_filter_list", "", False)]
            upload = upload or any(options.get(key) for key in UPLOAD_OPTIONS)
        last_required = required and (index + 1 == len(declared) or not declared[index + 1][3])
        if upload and last_required:
            found.append(Widget(UPLOAD_WIDGET, None, False))
            upload = False
    return found


def _wrap(value: Any) -> Any:
    """A list would read as a link: the frontend boxes it, ComfyUI unboxes it."""
    return {"__value__": value} if isinstance(value, list) else value


def widget_inputs(node: Executable, entry: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    """The node's widget values by input name."""
    values = node.node.get("widgets_values")
    expected = widgets(entry)
    inputs: dict[str, Any] = {}
    if isinstance(values, dict):  # some custom nodes save their values by name
        for widget in expected:
            if widget.sent and widget.name in values:
                inputs[widget.name] = _wrap(values[widget.name])
        return inputs
    values = values if isinstance(values, list) else []
    defaulted = []
    for index, widget in enumerate(expected):
        if not widget.sent:
            continue
        if index < len(values):
            inputs[widget.name] = _wrap(values[index])
        elif widget.default is not None:
            inputs[widget.name] = _wrap(widget.default)
            defaulted.append(widget.name)
    if defaulted:
        notes.append(f"{node.describe()}: no saved value for {', '.join(defaulted)}: the default is used")
    if len(values) > len(expected):
        notes.append(
            f"{node.describe()}: {len(values) - len(expected)} saved widget value(s) match no input of "
            f"{node.type} in this instance's /object_info and are left out"
        )
    return inputs


def missing_classes(graph: FlatGraph, object_info: Mapping[str, Any]) -> list[str]:
    """Classes of nodes that would run but that this ComfyUI does not know."""
    return sorted(
        {
            node.type
            for node in graph
            if node.mode not in (MUTED, BYPASSED)
            and node.type not in FRONTEND_ONLY
            and not graph.is_instance(node)
            and not isinstance(object_info.get(node.type), Mapping)
        }
    )


def _title(node: Executable, entry: Mapping[str, Any]) -> str:
    title = node.node.get("title")
    if isinstance(title, str) and title:
        return title
    shown = entry.get("display_name")
    return shown if isinstance(shown, str) and shown else node.type


def _api_node(graph: FlatGraph, node: Executable, entry: Mapping[str, Any], notes: list[str]) -> dict[str, Any]:
    inputs = widget_inputs(node, entry, notes)
    for widget, value in graph.promoted(node).items():
        if widget in inputs:  # the editor's own widgets (seed controls) are promoted too, never sent
            inputs[widget] = _wrap(value)
    for slot, item in enumerate(node.inputs):
        name = item.get("name")
        if not isinstance(name, str):
            continue
        source = graph.resolve_input(node, slot)
        if isinstance(source, Origin):
            inputs[name] = [source.exec_id, source.slot]
        elif isinstance(source, Value):
            inputs[name] = _wrap(source.value)
        elif isinstance(source, Dropped):
            inputs.pop(name, None)
            notes.append(f"{node.describe()} input {name!r} is left out: {source.reason}")
    return {"inputs": inputs, "class_type": node.type, "_meta": {"title": _title(node, entry)}}


def convert(document: Mapping[str, Any], object_info: Mapping[str, Any]) -> Converted:
    """The API-format prompt of a UI-format workflow; InvalidParams naming the node classes this
    instance lacks (`raw.missing.nodes`), or what is malformed."""
    if not is_ui_format(document):
        raise InvalidParams("not a UI-format workflow: it needs a list of 'nodes' and a list of 'links'")
    try:
        return _convert(FlatGraph(document), object_info)
    except RecursionError:  # a chain of reroutes or bypasses thousands long
        raise InvalidParams("the UI-format workflow's links are chained too deeply to follow") from None


def _convert(graph: FlatGraph, object_info: Mapping[str, Any]) -> Converted:
    untyped = [node.describe() for node in graph if not node.type]
    if untyped:
        raise InvalidParams(f"the UI-format workflow has nodes without a type: {', '.join(untyped[:10])}")
    missing = missing_classes(graph, object_info)
    if missing:
        grouped = any(name.startswith(("workflow>", "workflow/")) for name in missing)
        hint = "; group nodes (the editor's older grouping) are not converted: make them subgraphs" if grouped else ""
        raise InvalidParams(
            f"the workflow uses node class(es) this ComfyUI does not have: {', '.join(missing)} "
            f"(custom nodes not installed?){hint}",
            raw={"missing": {"nodes": missing, "models": []}},
        )
    notes: list[str] = []
    prompt: dict[str, Any] = {}
    for node in graph:
        if node.mode == MUTED:
            notes.append(f"{node.describe()} is muted: left out")
        elif node.mode == BYPASSED:
            notes.append(f"{node.describe()} is bypassed: what it feeds takes its inputs instead")
        elif node.type not in FRONTEND_ONLY and not graph.is_instance(node):
            prompt[node.exec_id] = _api_node(graph, node, object_info[node.type], notes)
    _drop_dangling(prompt, notes)
    if not prompt:
        raise InvalidParams("the UI-format workflow has no node that ComfyUI would run")
    return Converted(prompt, notes)


def _drop_dangling(prompt: dict[str, Any], notes: list[str]) -> None:
    """As the frontend does: an input linked to a node that is not sent is not sent either."""
    for node_id, node in prompt.items():
        for name, value in list(node["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and str(value[0]) not in prompt:
                del node["inputs"][name]
                notes.append(f"node {node_id} input {name!r} is left out: node {value[0]} is not sent")
