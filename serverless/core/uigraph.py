"""The editor's saved workflow (the UI format) read as plain data (pure): its nodes, its links in
either form (`[id, origin, origin_slot, target, target_slot, type]` in version 0.4, objects in
version 1 and in every subgraph), its subgraph definitions (`definitions.subgraphs`), and the
values an input's source can be. `uilinks` follows the links; `uiformat` makes the prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidParams

MUTED, BYPASSED = 2, 4
SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = "-10", "-20"
PRIMITIVE = "PrimitiveNode"
REROUTES = frozenset({"Reroute", "Reroute (rgthree)"})
# Nodes of the editor (and of rgthree's widely used frontend extension) that ComfyUI never sees.
FRONTEND_ONLY = frozenset(
    {PRIMITIVE, "Note", "MarkdownNote", *REROUTES}
    | {
        f"{name} (rgthree)"
        for name in (
            "Fast Muter",
            "Fast Bypasser",
            "Fast Groups Muter",
            "Fast Groups Bypasser",
            "Fast Actions Button",
            "Label",
            "Bookmark",
            "Node Collector",
            "Mute / Bypass Relay",
            "Mute / Bypass Repeater",
            "Random Unmuter",
        )
    }
)

Node = dict[str, Any]


def is_ui_format(document: Any) -> bool:
    """The editor's own save: a list of nodes and a list of links."""
    return (
        isinstance(document, dict)
        and isinstance(document.get("nodes"), list)
        and isinstance(document.get("links"), list)
    )


@dataclass(frozen=True, slots=True)
class Link:
    origin: str
    origin_slot: int
    target: str
    target_slot: int


@dataclass(frozen=True, slots=True)
class Graph:
    """The root graph, or one subgraph definition."""

    nodes: dict[str, Node]
    links: dict[str, Link]
    definition: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Executable:
    """One node where it stands: its id in the prompt, its graph, and the subgraph instance holding it."""

    exec_id: str
    node: Node
    graph: Graph
    path: tuple[str, ...]
    instance: Executable | None

    @property
    def type(self) -> str:
        return str(self.node.get("type", ""))

    @property
    def mode(self) -> int:
        mode = self.node.get("mode", 0)
        return mode if isinstance(mode, int) else 0

    @property
    def inputs(self) -> list[dict[str, Any]]:
        inputs = self.node.get("inputs")
        return [i if isinstance(i, dict) else {} for i in inputs] if isinstance(inputs, list) else []

    def describe(self) -> str:
        title = self.node.get("title")
        return f"node {self.exec_id} ({self.type}{', ' + repr(title) if title else ''})"


@dataclass(frozen=True, slots=True)
class Origin:
    """An input linked to output `slot` of node `exec_id`."""

    exec_id: str
    slot: int


@dataclass(frozen=True, slots=True)
class Value:
    """An input given a value (a primitive's, or a subgraph instance's widget)."""

    value: Any


@dataclass(frozen=True, slots=True)
class Dropped:
    """An input whose source is left out (a muted node, a bypass with no fitting input)."""

    reason: str


Source = Origin | Value | Dropped | None  # None: nothing linked, the widget's own value stands


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise InvalidParams(f"the UI-format workflow has a malformed link or slot: {value!r}")
    try:
        return int(value)
    except (ValueError, OverflowError):
        raise InvalidParams(f"the UI-format workflow has a malformed link or slot: {value!r}") from None


def read_link(raw: Any) -> tuple[str, Link]:
    """One link, either form."""
    if isinstance(raw, list) and len(raw) >= 5:
        link_id, origin, origin_slot, target, target_slot = raw[:5]
    elif isinstance(raw, dict):
        link_id, origin, origin_slot = raw.get("id"), raw.get("origin_id"), raw.get("origin_slot")
        target, target_slot = raw.get("target_id"), raw.get("target_slot")
    else:
        raise InvalidParams(f"the UI-format workflow has a malformed link: {str(raw)[:100]}")
    return str(link_id), Link(str(origin), _int(origin_slot), str(target), _int(target_slot))


def read_graph(document: Mapping[str, Any]) -> Graph:
    nodes = {str(n.get("id")): n for n in document.get("nodes") or [] if isinstance(n, dict)}
    links = dict(read_link(raw) for raw in document.get("links") or [] if raw is not None)
    return Graph(nodes, links, document)


def subgraph_definitions(document: Mapping[str, Any]) -> dict[str, Graph]:
    definitions = document.get("definitions")
    listed = definitions.get("subgraphs") if isinstance(definitions, dict) else None
    graphs = {}
    for definition in listed if isinstance(listed, list) else []:
        if isinstance(definition, dict) and isinstance(definition.get("nodes"), list):
            graphs[str(definition.get("id"))] = read_graph(definition)
    return graphs


def execution_order(graph: Graph) -> list[Node]:
    """Nodes in the editor's own execution order (`order`), as it saved them."""
    indexed = list(enumerate(graph.nodes.values()))
    indexed.sort(key=lambda item: (item[1].get("order") if isinstance(item[1].get("order"), int) else 1 << 30, item[0]))
    return [node for _, node in indexed]
