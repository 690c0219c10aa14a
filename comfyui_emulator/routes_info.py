"""Read-only server information: `/object_info`, `/system_stats`, `/features`, `/models`,
`/models/{folder}`, `/embeddings`, and `/` (ComfyUI serves its frontend's `index.html` there; the
emulator has no frontend, so a stand-in page with the header ComfyUI sends: health checks that
ping `/`, as Salad's comfyui-api does, see 200)."""

from __future__ import annotations

import os
import sys

from aiohttp import web

from .state import EMULATOR, SERVER_FEATURES

COMFYUI_VERSION = "0.3.64"
# The recorded server's frontend/template/torch versions, reported unchanged.
FRONTEND_VERSION = "1.27.10"
TEMPLATES_VERSION = "0.1.95"
PYTORCH_VERSION = "2.13.0+cpu"


async def object_info(request: web.Request) -> web.Response:
    specs = request.app[EMULATOR].specs
    return web.json_response({name: specs.entry(name) for name in specs.class_types()})


async def object_info_node(request: web.Request) -> web.Response:
    """One node's entry, or `{}` for an unknown class."""
    specs = request.app[EMULATOR].specs
    name = request.match_info["node_class"]
    return web.json_response({name: specs.entry(name)} if specs.has(name) else {})


async def system_stats(request: web.Request) -> web.Response:
    """ComfyUI's shape for a CPU-only machine (the CPU reported as the one device)."""
    total, free = _memory()
    system = {
        "os": os.name,
        "ram_total": total,
        "ram_free": free,
        "comfyui_version": COMFYUI_VERSION,
        "required_frontend_version": FRONTEND_VERSION,
        "installed_templates_version": TEMPLATES_VERSION,
        "required_templates_version": TEMPLATES_VERSION,
        "python_version": sys.version,
        "pytorch_version": PYTORCH_VERSION,
        "embedded_python": False,
        "argv": sys.argv,
    }
    emu = request.app[EMULATOR]
    device = {
        "name": "cpu",
        "type": "cpu",
        "index": None,
        "vram_total": total,
        "vram_free": free,
        "torch_vram_total": total,
        "torch_vram_free": free,
    }
    vram = int(emu.config.vram_total)
    if vram:  # an emulated GPU, as ComfyUI reports a CUDA device: its models take its VRAM
        used = emu.memory.used()
        device = {
            "name": "cuda:0 Emulated GPU : cudaMallocAsync",
            "type": "cuda",
            "index": 0,
            "vram_total": vram,
            "vram_free": max(vram - used, 0),
            "torch_vram_total": used,
            "torch_vram_free": 0,
        }
    return web.json_response({"system": system, "devices": [device]})


async def features(request: web.Request) -> web.Response:
    return web.json_response(SERVER_FEATURES)


def _memory() -> tuple[int, int]:
    """(total, available) RAM in bytes, from /proc/meminfo where there is one."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.count(":") == 1}
        return info["MemTotal"], info.get("MemAvailable", info["MemFree"])
    except (OSError, KeyError, ValueError, IndexError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return pages, pages


# ComfyUI 0.3.64's model folder names (`folder_paths.folder_names_and_paths`), in its order.
MODEL_FOLDERS = (
    "checkpoints",
    "configs",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "style_models",
    "embeddings",
    "diffusers",
    "vae_approx",
    "controlnet",
    "gligen",
    "upscale_models",
    "custom_nodes",
    "hypernetworks",
    "photomaker",
    "classifiers",
    "model_patches",
    "audio_encoders",
)
INDEX = b"<!DOCTYPE html><html><head><title>ComfyUI</title></head><body>ComfyUI emulator</body></html>\n"


async def index(request: web.Request) -> web.Response:
    return web.Response(body=INDEX, content_type="text/html", headers={"Cache-Control": "no-cache"})


async def models(request: web.Request) -> web.Response:
    return web.json_response(list(MODEL_FOLDERS))


async def model_folder(request: web.Request) -> web.Response:
    """A folder's files (`folder_paths.get_filename_list`); 404 with no body for a folder ComfyUI
    does not know. Without a models folder: the checkpoint loader's recorded names, else none."""
    folder = request.match_info["folder"]
    if folder not in MODEL_FOLDERS:
        return web.Response(status=404)
    return web.json_response(_model_files(request, folder))


async def embeddings(request: web.Request) -> web.Response:
    """The embeddings' names without their extensions, as ComfyUI lists them."""
    return web.json_response([os.path.splitext(name)[0] for name in _model_files(request, "embeddings")])


def _model_files(request: web.Request, folder: str) -> list[str]:
    emu = request.app[EMULATOR]
    found = emu.folders.model_files(folder)
    if found is not None:
        return found
    if folder == "checkpoints" and emu.specs.has("CheckpointLoaderSimple"):
        return list(emu.specs.entry("CheckpointLoaderSimple")["input"]["required"]["ckpt_name"][0])
    return []


ROUTES = [
    ("GET", "/", index),
    ("GET", "/models", models),
    ("GET", "/models/{folder}", model_folder),
    ("GET", "/embeddings", embeddings),
    ("GET", "/object_info", object_info),
    ("GET", "/object_info/{node_class}", object_info_node),
    ("GET", "/system_stats", system_stats),
    ("GET", "/features", features),
]
