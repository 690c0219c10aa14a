"""What the emulator holds in memory, for the costs a real ComfyUI pays: a checkpoint loader
that runs (its output not in the node cache) takes `model_load_delay` seconds and puts the
checkpoint in VRAM (`model_bytes` each, the least recently used evicted past `vram_total`);
`POST /free` unloads them (`unload_models`) or empties the node cache (`free_memory`) between
prompts, as ComfyUI 0.3.64's prompt worker does; `oom_next` makes the next samplers run out of
memory as torch does on a GPU (ComfyUI then unloads every model); `leak_bytes` is RAM each prompt
keeps for ever (a real allocation: the process's RSS grows, as ComfyUI's does in the leaks its
tracker reports)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

# ComfyUI's hint after an out-of-memory error (execution.py), kept as it words it.
OOM_TIPS = (
    "This error means you ran out of memory on your GPU.\n\n"
    "TIPS: If the workflow worked before you might have accidentally set the batch_size to a large number."
)


class OutOfMemoryError(RuntimeError):
    """Raised as torch raises it (its type is reported as `torch.OutOfMemoryError`)."""


OutOfMemoryError.__module__ = "torch"


class Memory:
    """Models in (emulated) VRAM, leaked RAM, and the `/free` flags the worker applies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.loaded: OrderedDict[str, int] = OrderedDict()  # checkpoint -> bytes, least recent first
        self.loads = 0
        self._leaked: list[bytearray] = []
        self.unload_requested = False
        self.free_requested = False

    def load(self, ckpt_name: str, delay: float, size: int, capacity: int) -> None:
        """A checkpoint loader runs: read from disk (`delay`), then held, evicting the least
        recently used past `capacity` bytes (0: no limit)."""
        if delay > 0:
            time.sleep(delay)
        with self._lock:
            self.loads += 1
            self.loaded.pop(ckpt_name, None)
            self.loaded[ckpt_name] = size
            while capacity and len(self.loaded) > 1 and sum(self.loaded.values()) > capacity:
                self.loaded.popitem(last=False)

    def retain(self, names: set[str]) -> None:
        """Only `names` stay loaded (the others' loader outputs left the node cache)."""
        with self._lock:
            for name in [name for name in self.loaded if name not in names]:
                del self.loaded[name]

    def unload_all(self) -> None:
        with self._lock:
            self.loaded.clear()

    def used(self) -> int:
        with self._lock:
            return sum(self.loaded.values())

    def resident(self) -> list[str]:
        with self._lock:
            return list(self.loaded)

    def leak(self, size: int) -> None:
        if size > 0:
            block = bytearray(size)
            block[::4096] = b"\x01" * len(block[::4096])  # touched: resident, not just reserved
            self._leaked.append(block)

    def request_free(self, unload_models: bool, free_memory: bool) -> None:
        with self._lock:
            self.unload_requested |= unload_models
            self.free_requested |= free_memory

    def take_requests(self) -> tuple[bool, bool]:
        """The `/free` flags set since the last prompt (and cleared), as ComfyUI's queue flags."""
        with self._lock:
            asked = (self.unload_requested, self.free_requested)
            self.unload_requested = self.free_requested = False
            return asked
