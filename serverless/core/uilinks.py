"""Where each input of a UI-format workflow takes its value from (pure). The rules are those of
ComfyUI's frontend when it queues a graph (`graphToPrompt`, litegraph's
`ExecutableNodeDTO.resolveInput`/`resolveOutput`):

- subgraph instances (a node whose `type` is the id of one of `definitions.subgraphs`) are expanded
  into their inner nodes, whose ids are the instance path joined with `:` (`"12:3"`, `"12:7:3"`);
  a link from the subgraph's input node (`-10`) continues outside through the instance's input, a
  link into an instance's output continues inside from the subgraph's output node (`-20`);
- a `Reroute` (or rgthree's) passes its input through; a `PrimitiveNode` gives its value to what
  it feeds; notes and the other frontend-only nodes (`FRONTEND_ONLY`) give nothing;
- a bypassed node (mode 4) passes through the input of the output's slot when its type fits, else
  its first input of the wanted type (then the first whose type fits);
- a muted node (mode 2) is left out, and so is every input linked to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from ..errors import InvalidParams
from .uigraph import (
    BYPASSED,
    FRONTEND_ONLY,
    MUTED,
    PRIMITIVE,
    REROUTES,
    SUBGRAPH_INPUT,
    Dropped,
    Executable,
    Graph,
    Origin,
    Source,
    Value,
    execution_order,
    read_graph,
    subgraph_definitions,
)

MAX_NESTING = 16  # subgraphs within subgraphs
MAX_NODES = 100_000  # after expansion: far beyond any real workflow; bounds what a small body can make


class FlatGraph:
    """Every node of a UI-format workflow, subgraph instances expanded, by execution id and in
    execution order; resolves where each input comes from."""

    def __init__(self, document: Mapping[str, Any]) -> None:
        self.subgraphs = subgraph_definitions(document)
        self.nodes: dict[str, Executable] = {}
        self._add(read_graph(document), (), None)

    def _add(
        self, graph: Graph, path: tuple[str, ...], instance: Executable | None, within: tuple[str, ...] = ()
    ) -> None:
        if len(path) > MAX_NESTING:
            raise InvalidParams(f"subgraphs nest more than {MAX_NESTING} levels deep")
        for node in execution_order(graph):
            node_id = str(node.get("id"))
            executable = Executable(":".join((*path, node_id)), node, graph, path, instance)
            self.nodes[executable.exec_id] = executable
            if len(self.nodes) > MAX_NODES:
                raise InvalidParams(f"the UI-format workflow expands to more than {MAX_NODES} nodes")
            inner = self.subgraphs.get(executable.type)
            if inner is None or executable.mode in (MUTED, BYPASSED):
                continue
            if executable.type in within:
                raise InvalidParams(f"subgraph {executable.type} contains itself ({executable.describe()})")
            self._add(inner, (*path, node_id), executable, (*within, executable.type))

    def __iter__(self) -> Iterator[Executable]:
        return iter(self.nodes.values())

    def is_instance(self, executable: Executable) -> bool:
        return executable.type in self.subgraphs

    def resolve_input(self, node: Executable, slot: int, seen: set[tuple[str, str, int]] | None = None) -> Source:
        """Where input `slot` of `node` takes its value from."""
        seen = self._visit(seen, node, "I", slot)
        inputs = node.inputs
        link_id = inputs[slot].get("link") if 0 <= slot < len(inputs) else None
        if link_id is None:
            return None
        link = node.graph.links.get(str(link_id))
        if link is None:
            return Dropped(f"its link {link_id} is not in the workflow")
        if link.origin == SUBGRAPH_INPUT and node.instance is not None:
            return self._from_outside(node.instance, link.origin_slot, seen)
        origin = self.nodes.get(":".join((*node.path, link.origin)))
        if origin is None:
            return Dropped(f"it is linked to node {link.origin}, which is not in the workflow")
        return self.resolve_output(origin, link.origin_slot, str(inputs[slot].get("type", "*")), seen)

    def _from_outside(self, instance: Executable, slot: int, seen: set[tuple[str, str, int]]) -> Source:
        """A subgraph input: what feeds the instance's input, else the instance's own widget value."""
        inputs = instance.inputs
        if not 0 <= slot < len(inputs):
            return Dropped(f"subgraph input {slot} is not an input of {instance.describe()}")
        if inputs[slot].get("link") is not None:
            return self.resolve_input(instance, slot, seen)
        return self._promoted_value(instance, slot)

    @staticmethod
    def _promoted_value(instance: Executable, slot: int) -> Source:
        """The instance's widget for an unlinked subgraph input, when it saved one (else the inner
        node keeps its own value, which that widget copied)."""
        inputs = instance.inputs
        widget = inputs[slot].get("widget")
        if not isinstance(widget, dict):
            return None
        proxied = proxy_values(instance)
        if proxied is not None:  # today's editor: `["-1", name]` is a widget bound through an input
            names = (widget.get("name"), inputs[slot].get("name"))
            found = [value for (node_id, name), value in proxied if node_id == "-1" and name in names]
            return Value(found[0]) if found else None
        values = instance.node.get("widgets_values")
        index = sum(1 for i in inputs[:slot] if isinstance(i.get("widget"), dict))
        return Value(values[index]) if isinstance(values, list) and index < len(values) else None

    def promoted(self, node: Executable) -> dict[str, Any]:
        """The widget values the subgraph instance holding `node` saved for it (`proxyWidgets`):
        they are that instance's own, and win over the definition's."""
        proxied = proxy_values(node.instance) if node.instance is not None else None
        own_id = str(node.node.get("id"))
        return {str(name): value for (node_id, name), value in proxied or () if node_id == own_id}

    def resolve_output(self, node: Executable, slot: int, wanted: str, seen: set[tuple[str, str, int]]) -> Source:
        """What output `slot` of `node` really is, through bypasses, reroutes and subgraphs."""
        seen = self._visit(seen, node, "O", slot)
        if node.mode == MUTED:
            return Dropped(f"it comes from {node.describe()}, which is muted")
        if node.mode == BYPASSED:
            index = bypass_input(node, slot, wanted)
            if index is None:
                return Dropped(f"bypassed {node.describe()} has no input of type {wanted}")
            return self.resolve_input(node, index, seen)
        if self.is_instance(node):
            return self._from_inside(node, slot, wanted, seen)
        if node.type == PRIMITIVE:
            values = node.node.get("widgets_values")
            return Value(values[0]) if isinstance(values, list) and values else None
        if node.type in REROUTES:
            return self.resolve_input(node, slot, seen) if slot < len(node.inputs) else None
        if node.type in FRONTEND_ONLY:
            return None
        return Origin(node.exec_id, slot)

    def _from_inside(self, instance: Executable, slot: int, wanted: str, seen: set[tuple[str, str, int]]) -> Source:
        """An instance's output: the inner node linked to the subgraph's output node."""
        definition = self.subgraphs[instance.type]
        outputs = definition.definition.get("outputs")
        output = outputs[slot] if isinstance(outputs, list) and 0 <= slot < len(outputs) else None
        link_ids = output.get("linkIds") if isinstance(output, dict) else None
        link = definition.links.get(str(link_ids[0])) if isinstance(link_ids, list) and link_ids else None
        if link is None:
            return Dropped(f"output {slot} of subgraph {instance.describe()} is not linked inside it")
        if link.origin == SUBGRAPH_INPUT:
            return self._from_outside(instance, link.origin_slot, seen)
        inner = self.nodes.get(":".join((*instance.path, str(instance.node.get("id")), link.origin)))
        if inner is None:
            return Dropped(f"output {slot} of subgraph {instance.describe()} comes from a node it does not hold")
        return self.resolve_output(inner, link.origin_slot, wanted, seen)

    @staticmethod
    def _visit(
        seen: set[tuple[str, str, int]] | None, node: Executable, side: str, slot: int
    ) -> set[tuple[str, str, int]]:
        seen = set() if seen is None else seen
        key = (node.exec_id, side, slot)
        if key in seen:
            raise InvalidParams(f"the UI-format workflow loops through {node.describe()}")
        seen.add(key)
        return seen


def proxy_values(instance: Executable) -> list[tuple[tuple[str, str], Any]] | None:
    """`((inner node id, widget name), value)` for each widget a subgraph instance promotes
    (`properties.proxyWidgets`, `"-1"` for one bound through a subgraph input), in
    `widgets_values` order; empty when it saved no values for them (the inner nodes' own then
    stand); None when it promotes none this way (an older save)."""
    properties = instance.node.get("properties")
    proxies = properties.get("proxyWidgets") if isinstance(properties, dict) else None
    values = instance.node.get("widgets_values")
    if not isinstance(proxies, list) or not proxies:
        return None
    if not isinstance(values, list) or len(values) != len(proxies):
        return []
    return [
        ((str(proxy[0]), str(proxy[1])), value)
        for proxy, value in zip(proxies, values, strict=True)
        if isinstance(proxy, list) and len(proxy) == 2
    ]


def types_fit(given: str, wanted: str) -> bool:
    """litegraph's `isValidConnection`: `*` or empty fits all; else comma-separated unions meet."""
    given, wanted = str(given).lower(), str(wanted).lower()
    if given in ("*", "", "0") or wanted in ("*", "", "0") or given == wanted:
        return True
    return bool({t.strip() for t in given.split(",")} & {t.strip() for t in wanted.split(",")})


def bypass_input(node: Executable, slot: int, wanted: str) -> int | None:
    """The input a bypassed node's output `slot` is fed from: the same slot when its type fits,
    else the first input of exactly the wanted type, else the first whose type fits."""
    inputs = node.inputs
    if not inputs:
        return None
    if wanted in ("*", ""):
        return slot if slot < len(inputs) else 0
    outputs = node.node.get("outputs")
    output = outputs[slot] if isinstance(outputs, list) and 0 <= slot < len(outputs) else {}
    output_type = str(output.get("type", "*")) if isinstance(output, dict) else "*"
    if slot < len(inputs):
        own = str(inputs[slot].get("type", "*"))
        if types_fit(own, output_type) and types_fit(own, wanted):
            return slot
    for index, item in enumerate(inputs):
        if str(item.get("type")) == wanted:
            return index
    for index, item in enumerate(inputs):
        own = str(item.get("type", "*"))
        if types_fit(own, output_type) and types_fit(own, wanted):
            return index
    return None
