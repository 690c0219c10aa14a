"""A ComfyUI 0.3.64 emulator for development and tests: a real aiohttp server speaking ComfyUI's
HTTP and websocket protocol as recorded in tests/fixtures/traces, executing a few nodes for real
with Pillow. It imports nothing from `serverless` (the production package knows nothing of it).

Run it with `python -m comfyui_emulator [--host 127.0.0.1] [--port 8188] [--root DIR]
[--step-delay SECONDS]`, or embed `create_app(root, step_delay)`. `root` (default
`./emulator-data`) holds `input/`, `output/` and `temp/`; temp is emptied at start.

ComfyUI endpoints (each also under `/api`; GET ones answer HEAD too): `GET /ws?clientId=`,
`POST|GET /prompt`, `GET|POST /queue`, `POST /interrupt`, `POST /free` (a no-op),
`GET /history`, `GET /history/{id}`, `POST /history`, `GET /view`, `POST /upload/image`,
`GET /object_info[/{class}]`, `GET /system_stats`, `GET /features`.

Nodes: EmptyImage, LoadImage, LoadImageMask, ImageInvert, ImageScale, ImageAddNoise, ImageBlur,
SaveImage, PreviewImage, and the model-free text-to-image chain CheckpointLoaderSimple,
CLIPTextEncode, EmptyLatentImage, KSampler (sleeps the step delay and reports progress per step, with a
preview frame), LatentUpscale,
VAEDecode (a picture determined by checkpoint, prompts, seed, sampler settings and size); and
for audio and video inputs LoadAudio, SaveAudio (writes a real FLAC), LoadVideo, SaveVideo and
VHS_LoadVideo; PreviewAny (any value as text). Pixels are float32 as in ComfyUI (nodes/pixels.py):
loaded as v / 255, saved as clip(255 * x) truncated, so 200 inverted saves as 54, as in ComfyUI.

Test and fault hooks (not ComfyUI's, no `/api` twin):
  `POST /emulator/drop_websockets`  abort every websocket's connection (no close frame); answers
                                    `{"dropped": n}`.
  `POST /emulator/config`           `{"step_delay": s, "node_delay": s}` (any key) changes the
                                    delays at run time; `node_delay` is slept inside every node
                                    after its interrupt check, like a long non-interruptible
                                    computation. Fault knobs: `history_delay` (s), `history_garbage`,
                                    `view_status` and `view_delay` (s) (see hooks.py). A GPU's costs (memory.py):
                                    `model_load_delay`, `vram_total`, `model_bytes`, `oom_next`,
                                    `leak_bytes`. Answers the resulting settings.
  `POST /emulator/release_node`     end the `node_delay` of the node sleeping it (or of the next
                                    one): a long node_delay plus releases step a prompt node by node.
  `GET /emulator/sent?client_id=X`  the texts sent to that client, in order.

Known differences from ComfyUI: sampler previews are sent (a JPEG per KSampler step, framed as ComfyUI
frames them; `--preview-method none` for none, ComfyUI's own default) but no binary progress text; no other
nodes, models or frontend; blur/noise/scaling use Pillow's algorithms, not torch's; PreviewAny
shows an IMAGE as `<IMAGE float32 [h, w, 3]>`, not torch's tensor repr; tracebacks and
the image values in `execution_error.current_inputs` are the emulator's own; EmptyImage fails
(like a failed allocation) above 2**26 pixels per batch; LoadImage refuses paths leaving the root;
what ComfyUI keeps in sets (`executed`, `current_outputs`, outputs to run) comes in the order the
traces show; a socket replaced by a reconnect with the same clientId does not unregister its
successor when it closes later; there is no FFmpeg: WAV audio is decoded for real, other audio and
non-GIF/WebP video are stand-ins derived from the file's hash, and SaveVideo copies the file.
"""

from __future__ import annotations

from .app import create_app

__all__ = ["create_app"]
