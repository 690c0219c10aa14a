"""Peers measured beside the adapter on the same ComfyUI, when asked (`python -m bench --salad PATH`).

Salad's comfyui-api (https://github.com/SaladTechnologies/comfyui-api, MIT; TypeScript on Node):
built from its repository, not shipped here:

    git clone https://github.com/SaladTechnologies/comfyui-api && cd comfyui-api
    npm ci && npx tsc            # -> dist/src/index.js, the PATH to give --salad

It runs as its documentation deploys it, beside the ComfyUI it serves and sharing its disk: it
writes a job's inputs into ComfyUI's `input/` and reads its outputs from `output/` (the emulator's
folders here), and answers `POST /prompt` with the outputs as base64 once the prompt has run.
It would start ComfyUI itself (`CMD`); here ComfyUI is up already, so its `CMD` is a process that
only waits, and its models folder an empty one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from . import procs
from .clients import NO_LIMIT, JobFailed

SALAD_READY = "/ready"


def start_salad(entry: Path, comfyui_url: str, comfyui_root: Path, workdir: Path) -> procs.Server:
    """Salad's comfyui-api (its built `dist/src/index.js`) for the ComfyUI at `comfyui_url`, whose
    folders are under `comfyui_root`; its own files under `workdir`."""
    host, _, port = comfyui_url.removeprefix("http://").partition(":")
    home = workdir / "comfy-home"
    (home / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
    (workdir / "workflows").mkdir(parents=True, exist_ok=True)
    own = procs.free_port()
    env = {
        "DIRECT_ADDRESS": host,
        "COMFYUI_PORT_HOST": port or "80",
        "COMFY_HOME": str(home),
        "INPUT_DIR": str(comfyui_root / "input"),
        "OUTPUT_DIR": str(comfyui_root / "output"),
        "WORKFLOW_DIR": str(workdir / "workflows"),
        "CMD": "sleep 2147483647",  # ComfyUI runs already: its launcher only has to stay up
        "HOST": "127.0.0.1",
        "PORT": str(own),
        "LOG_LEVEL": "warn",
        "HOME": str(workdir),
    }
    return procs.Server(["node", str(entry)], own, workdir / "salad.log", env)


async def run_salad(session: aiohttp.ClientSession, url: str, workflow: dict[str, Any]) -> list[str]:
    """One job through Salad's `POST /prompt` (its LoadImage inputs as base64, as its docs show):
    the outputs, base64."""
    async with session.post(url + "/prompt", json={"prompt": workflow}, timeout=NO_LIMIT) as resp:
        answer = await resp.json()
    images = answer.get("images") if isinstance(answer, dict) else None
    if resp.status != 200 or not images:
        raise JobFailed(f"Salad's /prompt answered {resp.status}: {str(answer)[:300]}")
    return list(images)
