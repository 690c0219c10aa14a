"""Result delivery: outputs read from ComfyUI as soon as they exist, base64, OSS uploads."""
