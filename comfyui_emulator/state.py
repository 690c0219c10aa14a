"""The emulator's shared state: settings, what the worker is doing, and the parts every route needs."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from .folders import Folders
from .hub import Hub
from .memory import Memory
from .prompt_queue import PromptQueue
from .specs import CUSTOM_NODES, NodeSpecs

# Advertised on `GET /features` and in the websocket `feature_flags` reply (100 MB, ComfyUI's default).
MAX_UPLOAD_SIZE = 100 * 1024 * 1024
SERVER_FEATURES: dict[str, Any] = {"supports_preview_metadata": True, "max_upload_size": MAX_UPLOAD_SIZE}


@dataclass
class Config:
    """Run-time knobs (changeable through `POST /emulator/config`).

    `step_delay` is slept per KSampler step (interruptible between steps); `node_delay` is slept inside
    every node after its interrupt check, like a long non-interruptible computation (or until
    `POST /emulator/release_node`).
    """

    step_delay: float = 0.02
    node_delay: float = 0.0
    # Faults, for the adapter's fault tests (0 / False: behave like ComfyUI).
    history_delay: float = 0.0  # seconds before GET /history/{id} answers
    history_garbage: float = 0.0  # non-zero: GET /history/{id} answers a body that is not JSON
    view_status: float = 0.0  # non-zero: GET/HEAD /view answers this HTTP status
    view_delay: float = 0.0  # seconds before GET/HEAD /view answers
    # Sampler previews (ComfyUI's `--preview-method`, `--preview-size`): 0 sends none, as ComfyUI's
    # own default `none` does; non-zero sends a JPEG per KSampler step, scaled to fit `preview_size`.
    previews: float = 1.0
    preview_size: float = 512.0
    # Memory (`memory.Memory`): what a GPU costs. 0 everywhere: no cost, a CPU-only machine.
    model_load_delay: float = 0.0  # seconds a checkpoint loader takes when it runs (not cached)
    model_bytes: float = 0.0  # VRAM a loaded checkpoint takes
    vram_total: float = 0.0  # non-zero: an emulated CUDA device of this many bytes in /system_stats
    oom_next: float = 0.0  # the next N samplers raise torch.OutOfMemoryError
    leak_bytes: float = 0.0  # RAM each prompt keeps (really allocated: the RSS grows)


class NodeGate:
    """Where nodes sleep their `node_delay`; `POST /emulator/release_node` ends one such sleep.

    A test holds every node with a long `node_delay` and releases them one at a time, so a prompt
    is provably still in a given node when the test acts, with no timing window. A release given
    while no node sleeps is kept for the next node that does.
    """

    def __init__(self) -> None:
        self._releases = 0
        self._changed = threading.Condition()

    def hold(self, seconds: float) -> None:
        """Sleep up to `seconds`, or until a release is available (then use it up)."""
        if seconds <= 0:
            return
        with self._changed:
            if self._changed.wait_for(lambda: self._releases > 0, timeout=seconds):
                self._releases -= 1

    def release(self) -> None:
        with self._changed:
            self._releases += 1
            self._changed.notify_all()


@dataclass
class Runtime:
    """What the worker runs right now; read by the websocket handler and `/interrupt`."""

    client_id: str | None = None
    last_node_id: str | None = None
    interrupt: threading.Event = field(default_factory=threading.Event)
    gate: NodeGate = field(default_factory=NodeGate)


@dataclass
class Emulator:
    """Everything the routes, the websocket handler and the worker share."""

    folders: Folders
    config: Config
    specs: NodeSpecs
    hub: Hub
    runtime: Runtime
    memory: Memory = field(default_factory=Memory)
    queue: PromptQueue = field(init=False)
    number: int = 0

    def __post_init__(self) -> None:
        self.queue = PromptQueue(on_change=self.queue_updated)

    def queue_info(self) -> dict[str, Any]:
        """The `status` payload: how many prompts are queued or running."""
        return {"exec_info": {"queue_remaining": self.queue.remaining()}}

    def queue_updated(self) -> None:
        """Broadcast the queue size; ComfyUI does this on every queue change."""
        self.hub.send_sync("status", {"status": self.queue_info()})

    def next_number(self, body: dict[str, Any]) -> float | int:
        """The queue position of a new prompt: client-given, or a counter (negated for `front`)."""
        if "number" in body:
            return float(body["number"])
        number = -self.number if body.get("front") else self.number
        self.number += 1
        return number


EMULATOR = web.AppKey("emulator", Emulator)


def build_emulator(
    root: Path,
    step_delay: float,
    preview_size: int = 512,
    previews: bool = True,
    models_dir: Path | None = None,
    custom_nodes: bool = True,
) -> Emulator:
    """Create the state for one emulator rooted at `root` (folders are created by the app on start);
    `models_dir` is ComfyUI's models folder, listed by the loaders; without `custom_nodes`
    (ComfyUI's `--disable-all-custom-nodes`) the custom nodes' classes are absent."""
    folders = Folders(Path(root), Path(models_dir) if models_dir is not None else None)
    specs = NodeSpecs.load(folders)
    return Emulator(
        folders=folders,
        config=Config(step_delay=step_delay, previews=float(previews), preview_size=float(preview_size)),
        specs=specs if custom_nodes else specs.without(CUSTOM_NODES),
        hub=Hub(),
        runtime=Runtime(),
    )
