"""Serve ComfyUI as a serverless API: one call folds upload, prompt, websocket and history."""

__version__ = "0.1.0"
