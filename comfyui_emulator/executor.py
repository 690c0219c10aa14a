"""Running one prompt: node order, caching, node calls and the websocket messages they produce.

Per node, as ComfyUI 0.3.64 does: `progress_state` (running) and `executing`, the node's own
`progress` steps, `executed` when it has a UI result, then `progress_state` (finished). A node
whose output is cached sends only `executed` (its cached UI) and `progress_state`. Messages go to
the prompt's client; `progress_state`/`progress` go to everyone when the prompt has no client.
"""

from __future__ import annotations

import io
import logging
import time
import traceback
from dataclasses import dataclass
from functools import partial
from typing import Any

from PIL import Image, ImageOps

from .cache import CacheSet
from .graph import ExecutionList, is_link
from .hub import PREVIEW, Preview
from .memory import OOM_TIPS, OutOfMemoryError
from .nodes import NODE_CLASSES, Interrupted, NodeContext, NodeOutput
from .nodes.pixels import Frame
from .nodes.txt2img import Model
from .progress import ProgressRegistry
from .state import Emulator

log = logging.getLogger(__name__)


@dataclass
class Failure:
    """Why a prompt stopped: an interrupt, or an exception's details for `execution_error`."""

    node_id: str
    error: dict[str, Any] | None = None

    @property
    def interrupted(self) -> bool:
        return self.error is None


class PromptExecutor:
    """Executes prompts one after another; its caches outlive each prompt."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.caches = CacheSet()
        self.status_messages: list[list[Any]] = []
        self.success = True
        self.history_result: dict[str, Any] = {}

    def reset(self) -> None:
        """Forget every cached node output (ComfyUI's `PromptExecutor.reset`, on `/free`)."""
        self.caches = CacheSet()

    def execute(self, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any], outputs: list[str]) -> None:
        """Run `outputs` of `prompt`; afterwards `success`, `status_messages`, `history_result` tell how."""
        runtime = self.emu.runtime
        runtime.interrupt.clear()  # an interrupt sent while idle does not hit the next prompt
        runtime.client_id = extra_data.get("client_id")
        self.status_messages = []
        self.success = True
        self.add_message("execution_start", {"prompt_id": prompt_id}, broadcast=False)
        _Run(self, prompt, prompt_id, extra_data).run_all(outputs)
        self.history_result = self._history_result(prompt)
        runtime.last_node_id = None

    def add_message(self, event: str, data: dict[str, Any], broadcast: bool) -> None:
        """A status message: kept for the history and sent to the client (or all, if `broadcast`)."""
        data = {**data, "timestamp": int(time.time() * 1000)}
        self.status_messages.append([event, data])
        client_id = self.emu.runtime.client_id
        if client_id is not None or broadcast:
            self.emu.hub.send_sync(event, data, client_id)

    def _history_result(self, prompt: dict[str, Any]) -> dict[str, Any]:
        outputs: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for node_id in prompt:
            ui = self.caches.ui.get(node_id)
            if ui is not None:
                outputs[node_id] = ui["output"]
                meta[node_id] = ui["meta"]
        return {"outputs": outputs, "meta": meta}


class _Run:
    """One prompt's execution state."""

    def __init__(
        self, executor: PromptExecutor, prompt: dict[str, Any], prompt_id: str, extra_data: dict[str, Any]
    ) -> None:
        self.executor = executor
        self.emu = executor.emu
        self.caches = executor.caches
        self.prompt = prompt
        self.prompt_id = prompt_id
        self.extra_data = extra_data
        self.client_id: str | None = extra_data.get("client_id")
        self.progress = ProgressRegistry(prompt_id, self.client_id, self.emu.hub.send_sync)
        self.executed: list[str] = []
        self._fingerprints: dict[str, Any] = {}

    def run_all(self, outputs: list[str]) -> None:
        self.caches.set_prompt(self.prompt, self._fingerprint)
        # A checkpoint whose loader output left the cache is freed with it (as ComfyUI's models are).
        held = (self.caches.outputs.get(node_id) or () for node_id in self.prompt)
        self.emu.memory.retain({value.ckpt_name for values in held for value in values if isinstance(value, Model)})
        cached = [n for n in self.prompt if self.caches.outputs.get(n) is not None]
        self.executor.add_message("execution_cached", {"nodes": cached, "prompt_id": self.prompt_id}, broadcast=False)
        # ComfyUI reports all node ids of the prompt here (a set; this order matches the traces).
        current_outputs = list(reversed(self.prompt))
        order = ExecutionList(self.prompt, self.emu.specs.is_output, lambda n: self.caches.outputs.get(n) is not None)
        for output in outputs:
            order.add_node(output)
        while not order.is_empty():
            node_id = order.next_node()
            failure = self._cycle_failure(order) if node_id is None else self.run_node(node_id)
            if failure is not None:
                self.executor.success = False
                self._report(failure, current_outputs)
                return
            order.complete(str(node_id))
        self.executor.add_message("execution_success", {"prompt_id": self.prompt_id}, broadcast=False)

    def run_node(self, node_id: str) -> Failure | None:
        """Execute (or replay from cache) one node; a Failure stops the prompt."""
        if self.caches.outputs.get(node_id) is not None:
            self._send_cached_ui(node_id)
            self.progress.finish(node_id)
            return None
        values: dict[str, Any] | None = None
        try:
            self.progress.start(node_id)
            values = self._gather_inputs(node_id)
            if self.client_id is not None:
                self.emu.runtime.last_node_id = node_id
                self._send("executing", {"node": node_id, "display_node": node_id, "prompt_id": self.prompt_id})
            self._store(node_id, self._call(node_id, values))
        except Interrupted:
            return Failure(node_id)
        except Exception as err:
            log.exception("!!! Exception during processing !!!")
            error = _describe(err, values)
            if isinstance(err, OutOfMemoryError):  # as ComfyUI's execution.py answers an OOM
                log.error("Got an OOM, unloading all loaded models.")
                self.emu.memory.unload_all()
                error["exception_message"] = f"{err}\n{OOM_TIPS}"
            return Failure(node_id, error)
        self.progress.finish(node_id)
        self.executed.append(node_id)
        return None

    def _call(self, node_id: str, values: dict[str, Any]) -> NodeOutput:
        class_type = self.prompt[node_id]["class_type"]
        node = self.caches.objects.get(node_id)
        if node is None:
            node = NODE_CLASSES[class_type](self.emu.folders)
            self.caches.objects.set(node_id, node)
        config = self.emu.config
        ctx = NodeContext(
            node_id=node_id,
            prompt_id=self.prompt_id,
            folders=self.emu.folders,
            step_delay=lambda: config.step_delay,
            interrupt=self.emu.runtime.interrupt,
            on_progress=partial(self._on_progress, node_id),
            load_model=self._load_model,
        )
        ctx.check_interrupt()  # ComfyUI checks before every node function call
        self.emu.runtime.gate.hold(config.node_delay)
        if class_type == "KSampler" and config.oom_next > 0:
            config.oom_next -= 1
            raise OutOfMemoryError(
                "Allocation on device 0 would exceed allowed memory. (out of memory)\n"
                "Currently allocated     : 22.41 GiB\nRequested               : 2.00 GiB"
            )
        output: NodeOutput = node.run(ctx, **values)
        return output

    def _load_model(self, ckpt_name: str) -> None:
        config = self.emu.config
        self.emu.memory.load(ckpt_name, config.model_load_delay, int(config.model_bytes), int(config.vram_total))

    def _gather_inputs(self, node_id: str) -> dict[str, Any]:
        """Constants and upstream outputs for the declared inputs, then hidden ones (prompt, ...)."""
        class_type = self.prompt[node_id]["class_type"]
        specs = self.emu.specs
        values: dict[str, Any] = {}
        for name, value in self.prompt[node_id]["inputs"].items():
            if is_link(value):
                upstream = self.caches.outputs.get(value[0]) or ()
                index = int(value[1])
                values[name] = upstream[index] if index < len(upstream) else None
            elif specs.input_info(class_type, name)[1] is not None:
                values[name] = value
        hidden = {"PROMPT": self.prompt, "EXTRA_PNGINFO": self.extra_data.get("extra_pnginfo"), "UNIQUE_ID": node_id}
        for name, kind in specs.hidden_inputs(class_type).items():
            values[name] = hidden.get(kind)
        return values

    def _store(self, node_id: str, output: NodeOutput) -> None:
        if output.ui:
            self.caches.ui.set(
                node_id,
                {
                    "meta": {"node_id": node_id, "display_node": node_id, "parent_node": None, "real_node_id": node_id},
                    "output": output.ui,
                },
            )
            if self.client_id is not None:
                self._send(
                    "executed",
                    {"node": node_id, "display_node": node_id, "output": output.ui, "prompt_id": self.prompt_id},
                )
        self.caches.outputs.set(node_id, output.values)

    def _send_cached_ui(self, node_id: str) -> None:
        if self.client_id is None:
            return
        cached = self.caches.ui.get(node_id) or {}
        self._send(
            "executed",
            {"node": node_id, "display_node": node_id, "output": cached.get("output"), "prompt_id": self.prompt_id},
        )

    def _on_progress(self, node_id: str, value: int, total: int, preview: Image.Image | None = None) -> None:
        """As ComfyUI's progress hook: `progress_state`, the preview for clients that read its
        metadata, `progress`, then the legacy preview for the others (the order of the traces)."""
        self.progress.update(node_id, value, total)
        jpeg = self._preview_jpeg(preview)
        if jpeg is not None:
            self.emu.hub.send_sync(PREVIEW, Preview(jpeg, self.prompt_id, node_id, True), self.client_id)
        self._send(
            "progress", {"value": value, "max": total, "prompt_id": self.prompt_id, "node": node_id}, always=True
        )
        if jpeg is not None:
            self.emu.hub.send_sync(PREVIEW, Preview(jpeg, self.prompt_id, node_id, False), self.client_id)

    def _preview_jpeg(self, preview: Image.Image | None) -> bytes | None:
        """The preview as ComfyUI sends it: scaled (up or down) to fit `--preview-size`, JPEG q95."""
        config = self.emu.config
        if preview is None or not config.previews:
            return None
        size = max(1, int(config.preview_size))
        image = ImageOps.contain(preview.convert("RGB"), (size, size), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        return buffer.getvalue()

    def _send(self, event: str, data: dict[str, Any], always: bool = False) -> None:
        if self.client_id is not None or always:
            self.emu.hub.send_sync(event, data, self.client_id)

    def _fingerprint(self, node_id: str) -> Any:
        """IS_CHANGED of a node, once per prompt; NaN when it fails (the node is then never cached)."""
        if node_id not in self._fingerprints:
            node = self.prompt[node_id]
            try:
                value = NODE_CLASSES[node["class_type"]].is_changed(self.emu.folders, node["inputs"])
            except Exception as err:
                log.warning("WARNING: %s", err)
                value = float("nan")
            self._fingerprints[node_id] = value
        return self._fingerprints[node_id]

    def _cycle_failure(self, order: ExecutionList) -> Failure:
        return Failure(
            order.cycle()[0],
            {
                "exception_message": "Dependency cycle detected",
                "exception_type": "graph.DependencyCycleError",
                "traceback": [],
                "current_inputs": [],
            },
        )

    def _report(self, failure: Failure, current_outputs: list[str]) -> None:
        message = {
            "prompt_id": self.prompt_id,
            "node_id": failure.node_id,
            "node_type": self.prompt[failure.node_id]["class_type"],
            "executed": list(reversed(self.executed)),
        }  # a set in ComfyUI; traces show newest first
        if failure.error is None:
            self.executor.add_message("execution_interrupted", message, broadcast=True)
        else:
            self.executor.add_message(
                "execution_error", {**message, **failure.error, "current_outputs": current_outputs}, broadcast=False
            )


def _describe(err: Exception, values: dict[str, Any] | None) -> dict[str, Any]:
    """The `execution_error` details of an exception raised by a node."""
    cls = type(err)
    type_name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    inputs = {name: [_format_value(v)] for name, v in (values or {}).items()}
    return {
        "exception_message": f"{err}\n",
        "exception_type": type_name,
        "traceback": traceback.format_tb(err.__traceback__),
        "current_inputs": inputs,
    }


def _format_value(value: Any) -> Any:
    if value is None or isinstance(value, (int, float, bool, str)):
        return value
    if isinstance(value, list) and value and all(isinstance(v, Frame) for v in value):
        width, height = value[0].size
        return f"IMAGE batch of shape [{len(value)}, {height}, {width}, 3]"
    return str(value)
