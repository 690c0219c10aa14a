"""Loader inputs: URLs, `oss://` objects and base64 made into files in ComfyUI's input folder,
safely (SSRF guard, size and pixel limits, content checks, byte budgets)."""
