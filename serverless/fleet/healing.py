"""Self-healing GPUs: after each job, before it takes the next, a worker checks its ComfyUI's
memory against the watermarks (`SchedulingSettings`): a device whose free VRAM is below
VRAM_FREE_MIN is asked to free it (`POST /free`: unload models, empty caches); a ComfyUI whose
resident memory (RSS) passed COMFYUI_RSS_MAX is restarted when this instance supervises it
(COMFYUI_CMD / COMFYUI_DIR), else asked to free. Nothing runs meanwhile, so no job is lost: the
next is taken once ComfyUI answers again. Counted in `serverless_comfyui_frees_total` and
`serverless_comfyui_memory_restarts_total`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from ..comfyui.client import ComfyUI
from ..comfyui.supervisor import Supervisor
from ..errors import ServerlessError
from ..ops.metrics import Metrics
from ..settings import SchedulingSettings
from .heartbeat import Heartbeat

log = logging.getLogger(__name__)


@dataclass
class Healing:
    comfy: ComfyUI
    supervisor: Supervisor | None
    settings: SchedulingSettings
    metrics: Metrics
    heartbeat: Heartbeat | None
    startup_timeout: float = 60.0

    @property
    def watching(self) -> bool:
        return bool(self.settings.vram_free_min or self.settings.comfyui_rss_max)

    async def check(self) -> str | None:
        """Free or restart as the watermarks say; what was done ("free", "restart"), or None."""
        if not self.watching:
            return None
        try:
            rss = self.supervisor.rss() if self.supervisor is not None else None
            if self.settings.comfyui_rss_max and rss is not None and rss > self.settings.comfyui_rss_max:
                return await self._restart(rss)
            vram_free = _vram_free(await self.comfy.read_info("/system_stats"))
            if self.settings.vram_free_min and vram_free is not None and vram_free < self.settings.vram_free_min:
                log.warning(
                    "ComfyUI's device has %d bytes free (VRAM_FREE_MIN=%d): freeing its memory",
                    vram_free,
                    self.settings.vram_free_min,
                )
                return await self._free()
        except ServerlessError as exc:
            log.warning("memory check after a job skipped: %s", exc.message)
        return None

    async def _free(self) -> str:
        await self.comfy.free()
        self.metrics.comfyui_frees.inc()
        if self.heartbeat is not None:
            self.heartbeat.freed()
        return "free"

    async def _restart(self, rss: int) -> str:
        assert self.supervisor is not None
        log.warning(
            "ComfyUI holds %d bytes (COMFYUI_RSS_MAX=%d): restarting it between jobs",
            rss,
            self.settings.comfyui_rss_max,
        )
        await self.supervisor.restart()
        self.metrics.comfyui_memory_restarts.inc()
        if self.heartbeat is not None:
            self.heartbeat.freed()
        if not await self.supervisor.wait_ready(self.startup_timeout):
            log.error("ComfyUI did not answer within %.0fs of its restart", self.startup_timeout)
        return "restart"


def _vram_free(stats: Any) -> int | None:
    devices = stats.get("devices") if isinstance(stats, dict) else None
    first = devices[0] if isinstance(devices, list) and devices and isinstance(devices[0], dict) else {}
    free = first.get("vram_free")
    return free if isinstance(free, int) else None
