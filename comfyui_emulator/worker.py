"""The single prompt worker: a thread taking prompts off the queue in order, as ComfyUI's is.

After each prompt the history entry is written first, then `executing` with `node: null` is sent
to the prompt's client, so that message always finds the history ready.
"""

from __future__ import annotations

import logging
import threading
import time

from .executor import PromptExecutor
from .prompt_queue import QueueItem
from .state import Emulator

log = logging.getLogger(__name__)


class Worker:
    """Owns the executor and the thread running it."""

    def __init__(self, emu: Emulator) -> None:
        self.emu = emu
        self.executor = PromptExecutor(emu)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="prompt-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the thread to finish after the current prompt (an interrupt makes that quick)."""
        self._stop.set()
        self.emu.runtime.interrupt.set()
        self.emu.queue.wake()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            taken = self.emu.queue.get(timeout=0.5)
            self._free()
            if taken is not None and not self._stop.is_set():
                self._run(*taken)
                self.emu.memory.leak(int(self.emu.config.leak_bytes))

    def _free(self) -> None:
        """`POST /free`'s flags, applied between prompts as ComfyUI's prompt worker applies them:
        `free_memory` empties the node cache (`e.reset()`), `unload_models` unloads every model."""
        unload_models, free_memory = self.emu.memory.take_requests()
        if free_memory:
            self.executor.reset()
        if unload_models or free_memory:
            self.emu.memory.unload_all()

    def _run(self, item: QueueItem, task_id: int) -> None:
        started = time.perf_counter()
        _number, prompt_id, prompt, extra_data, outputs = item
        executor = self.executor
        try:
            executor.execute(prompt, prompt_id, extra_data, outputs)
        except Exception:  # an emulator bug must not kill the queue
            log.exception("prompt %s crashed the executor", prompt_id)
            executor.success = False
            executor.history_result = {"outputs": {}, "meta": {}}
            self.emu.runtime.last_node_id = None
        status = {
            "status_str": "success" if executor.success else "error",
            "completed": executor.success,
            "messages": executor.status_messages,
        }
        self.emu.queue.task_done(task_id, executor.history_result, status)
        client_id = self.emu.runtime.client_id
        if client_id is not None:
            self.emu.hub.send_sync("executing", {"node": None, "prompt_id": prompt_id}, client_id)
        log.info("Prompt executed in %.2f seconds", time.perf_counter() - started)
