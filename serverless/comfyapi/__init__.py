"""ComfyUI's own API (`native`, `relay`) on ComfyUI's paths and again under `/api/`, as ComfyUI
serves both, and Comfy API v2 (`v2`) under `/api/v2`: every prompt is a durable job of ours, so
any gateway of a fleet answers for it."""

from __future__ import annotations

from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from . import editor, files, native, relay, v2, v2assets


def routes() -> list[BaseRoute]:
    """ComfyUI's API at its paths and under `/api/`, API v2, and the editor at `/comfyui/` (one
    mount: its own API calls are ComfyUI's again, under it)."""
    made = native_routes() + v2_routes()
    pages = editor.routes()
    if pages:
        made.append(Mount(editor.PREFIX, routes=[*native_routes(), *pages]))
    return made


def native_routes() -> list[BaseRoute]:
    """ComfyUI's own routes, each at its ComfyUI path and under `/api/`."""
    made: list[BaseRoute] = []
    for prefix in ("", "/api"):  # ComfyUI serves both
        made += [
            Route(f"{prefix}/prompt", native.queue_prompt, methods=["POST"]),
            Route(f"{prefix}/prompt", native.prompt_state, methods=["GET"]),
            Route(f"{prefix}/queue", native.get_queue, methods=["GET"]),
            Route(f"{prefix}/queue", native.post_queue, methods=["POST"]),
            Route(f"{prefix}/interrupt", native.interrupt, methods=["POST"]),
            Route(f"{prefix}/history", native.get_history, methods=["GET"]),
            Route(f"{prefix}/history", native.post_history, methods=["POST"]),
            Route(f"{prefix}/history/{{prompt_id}}", native.get_history_item, methods=["GET"]),
            Route(f"{prefix}/view", files.view, methods=["GET", "HEAD"]),
            Route(f"{prefix}/upload/image", files.upload, methods=["POST"]),
            Route(f"{prefix}/upload/mask", files.upload, methods=["POST"]),
            Route(f"{prefix}/object_info", files.object_info, methods=["GET"]),
            Route(f"{prefix}/object_info/{{node_class}}", files.object_info, methods=["GET"]),
            Route(f"{prefix}/system_stats", files.comfyui_info, methods=["GET"]),
            Route(f"{prefix}/embeddings", files.comfyui_info, methods=["GET"]),
            Route(f"{prefix}/models", files.comfyui_info, methods=["GET"]),
            Route(f"{prefix}/models/{{folder}}", files.comfyui_info, methods=["GET"]),
            WebSocketRoute(f"{prefix}/ws", relay.websocket),
        ]
    return made


def v2_routes() -> list[BaseRoute]:
    """Comfy API v2's."""
    return [
        Route("/api/v2/jobs", v2.post_jobs, methods=["POST"]),
        Route("/api/v2/jobs", v2.list_jobs, methods=["GET"]),
        Route("/api/v2/jobs/{id}", v2.get_job, methods=["GET"]),
        Route("/api/v2/jobs/{id}/events", v2.job_events, methods=["GET"]),
        Route("/api/v2/jobs/{id}/cancel", v2.cancel_job, methods=["POST"]),
        Route("/api/v2/jobs/{id}/workflow", v2.job_workflow, methods=["GET"]),
        Route("/api/v2/assets", v2assets.post_asset, methods=["POST"]),
        Route("/api/v2/assets/from-hash", v2assets.asset_from_hash, methods=["POST"]),
        Route("/api/v2/assets/by-hash/{hash}", v2assets.asset_by_hash, methods=["GET", "HEAD"]),
        Route("/api/v2/assets/{id}", v2assets.get_asset, methods=["GET"]),
        Route("/api/v2/assets/{id}", v2assets.delete_asset, methods=["DELETE"]),
        Route("/api/v2/assets/{id}/content", v2assets.asset_content, methods=["GET"]),
    ]
