"""The aiohttp application: routes (each also under `/api`, as ComfyUI has them) and lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler

from . import hooks, routes_files, routes_info, routes_prompt, ws
from .state import EMULATOR, MAX_UPLOAD_SIZE, build_emulator
from .worker import Worker

COMFYUI_ROUTES = [*ws.ROUTES, *routes_prompt.ROUTES, *routes_files.ROUTES, *routes_info.ROUTES]
WORKER = web.AppKey("worker", Worker)


def create_app(
    root: Path,
    step_delay: float = 0.02,
    preview_size: int = 512,
    previews: bool = True,
    models_dir: Path | None = None,
    custom_nodes: bool = True,
) -> web.Application:
    """A ComfyUI 0.3.64 look-alike keeping its input/output/temp folders under `root`; its model
    loaders list `models_dir` (ComfyUI's `models/`) when given, else the recorded names."""
    app = web.Application(client_max_size=MAX_UPLOAD_SIZE)
    emu = build_emulator(root, step_delay, preview_size, previews, models_dir, custom_nodes)
    app[EMULATOR] = emu
    app[WORKER] = Worker(emu)
    for method, path, handler in COMFYUI_ROUTES:
        _add(app, method, "/api" + path, handler)
        _add(app, method, path, handler)
    for method, path, handler in hooks.ROUTES:
        _add(app, method, path, handler)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_close_sockets)
    return app


def _add(app: web.Application, method: str, path: str, handler: Handler) -> None:
    if method == "GET":
        app.router.add_get(path, handler)  # answers HEAD too, as ComfyUI's `routes.get` does
    else:
        app.router.add_route(method, path, handler)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """Prepare folders, start message delivery and the worker; stop both on cleanup."""
    emu = app[EMULATOR]
    emu.folders.prepare()
    emu.hub.attach(asyncio.get_running_loop())
    publisher = asyncio.create_task(emu.hub.publish_loop())
    app[WORKER].start()
    yield
    await asyncio.to_thread(app[WORKER].stop)
    publisher.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await publisher


async def _close_sockets(app: web.Application) -> None:
    await app[EMULATOR].hub.close_all()
