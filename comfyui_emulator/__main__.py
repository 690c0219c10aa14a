"""`python -m comfyui_emulator [--host H] [--port P] [--root DIR] [--step-delay S] [--preview-size N]
[--preview-method auto|none] [--models-dir DIR]`."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from aiohttp import web

from .app import create_app
from .state import EMULATOR


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m comfyui_emulator", description="Serve a ComfyUI 0.3.64 emulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("emulator-data"),
        help="folder holding input/, output/ and temp/ (default ./emulator-data)",
    )
    parser.add_argument("--step-delay", type=float, default=0.02, help="seconds slept per KSampler step (default 0.02)")
    parser.add_argument(
        "--preview-size", type=int, default=512, help="largest side of sampler previews (default 512, as ComfyUI)"
    )
    parser.add_argument(
        "--preview-method",
        choices=("auto", "latent2rgb", "none"),
        default="auto",
        help="KSampler previews: a JPEG frame per step (auto, latent2rgb) or none (default auto)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=Path(os.environ["MODELS_DIR"]) if os.environ.get("MODELS_DIR") else None,
        help="ComfyUI's models folder: files under <dir>/checkpoints are the checkpoint loader's options "
        "(default $MODELS_DIR; unset: the recorded names)",
    )
    parser.add_argument(
        "--disable-all-custom-nodes",
        action="store_true",
        help="load no custom node (as ComfyUI's flag): Video Helper Suite's VHS_LoadVideo is absent",
    )
    parser.add_argument("--model-load-delay", type=float, default=0.0, help="seconds a checkpoint takes to load")
    parser.add_argument("--vram-total", type=float, default=0.0, help="bytes of an emulated GPU (0: a CPU)")
    parser.add_argument("--model-bytes", type=float, default=0.0, help="VRAM bytes a loaded checkpoint takes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(
        args.root,
        args.step_delay,
        args.preview_size,
        args.preview_method != "none",
        args.models_dir,
        not args.disable_all_custom_nodes,
    )
    config = app[EMULATOR].config
    config.model_load_delay, config.vram_total, config.model_bytes = (
        args.model_load_delay,
        args.vram_total,
        args.model_bytes,
    )
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        shutdown_timeout=2.0,
        access_log=None,
        print=None,
    )


if __name__ == "__main__":
    main()
