# syntax=docker/dockerfile:1.7
# The FC GPU image: ComfyUI plus this adapter. /app/bootstrap serves the API on port 9000 and
# starts ComfyUI (127.0.0.1:8188) as its supervised child.
#   docker build -t <registry>/<namespace>/comfyui-serverless-api:<tag> .
# Models, outputs, inputs and status logs live on the NAS that FC mounts at /mnt/auto:
#   /mnt/auto/models/<kind>/...        read by ComfyUI (extra_model_paths.yaml below)
#   /mnt/auto/output, /mnt/auto/input  ComfyUI's output and input folders, shared by all instances
#   /mnt/auto/output/serverless_api    the adapter's status logs (STATUS_DIR)
# No GPU driver or CUDA toolkit here: the PyTorch wheels carry the CUDA runtime, FC's GPU hosts the driver.

ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG COMFYUI_VERSION=v0.3.64
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# git for ComfyUI; ffmpeg and the GL/GLib libraries that video and OpenCV-based nodes load.
RUN apt-get update \
 && apt-get install -y --no-install-recommends git ca-certificates ffmpeg libgl1 libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/* \
 && python -m venv /opt/venv

# ComfyUI, pinned. torch first, from the CUDA index, so ComfyUI's requirements find it installed.
RUN git clone --depth 1 --branch "${COMFYUI_VERSION}" https://github.com/comfyanonymous/ComfyUI.git /app/ComfyUI \
 && rm -rf /app/ComfyUI/.git \
 && pip install torch torchvision torchaudio --index-url "${TORCH_INDEX_URL}" \
 && pip install -r /app/ComfyUI/requirements.txt

# Models from the NAS. ComfyUI reads extra_model_paths.yaml next to its main.py at start-up;
# is_default puts these folders first (and makes them where model downloads go).
COPY <<'EOF' /app/ComfyUI/extra_model_paths.yaml
nas:
  base_path: /mnt/auto/models
  is_default: true
  checkpoints: checkpoints
  clip: clip
  clip_vision: clip_vision
  configs: configs
  controlnet: controlnet
  diffusion_models: |
    diffusion_models
    unet
  embeddings: embeddings
  gligen: gligen
  hypernetworks: hypernetworks
  loras: loras
  photomaker: photomaker
  style_models: style_models
  text_encoders: text_encoders
  upscale_models: upscale_models
  vae: vae
  vae_approx: vae_approx
EOF

# The adapter, in the same environment (its requirements are compatible with ComfyUI's): the
# production package and its entry points only; the ComfyUI emulator stays out (.dockerignore too).
COPY requirements.txt /app/requirements.txt
RUN pip install -r /app/requirements.txt
COPY --chmod=755 bootstrap /app/bootstrap
COPY handler.py /app/
COPY serverless /app/serverless

# COMFYUI_CMD: how the adapter starts ComfyUI. COMFYUI_DIR is its working directory (and what
# would be started, with default folders, if COMFYUI_CMD were unset). HOST: all addresses of the
# container (the default outside FC is loopback), so that `docker run -p 9000:9000` reaches it too.
ENV COMFYUI_DIR=/app/ComfyUI \
    COMFYUI_URL=http://127.0.0.1:8188 \
    COMFYUI_CMD="python /app/ComfyUI/main.py --listen 127.0.0.1 --port 8188 --disable-auto-launch --output-directory /mnt/auto/output --input-directory /mnt/auto/input" \
    MODEL_ASSET_DIR=/mnt/auto \
    FC_CUSTOM_LISTEN_PORT=9000 \
    HOST=0.0.0.0

WORKDIR /app
EXPOSE 9000
ENTRYPOINT ["/app/bootstrap"]
