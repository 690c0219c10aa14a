# syntax=docker/dockerfile:1.7
# The slim image: the adapter and its requirements, no ComfyUI, no torch, no CUDA (about 150 MB
# against the GPU image's several GB). What Redis-tier gateways run (ROLE=gateway), and what
# deploy/compose.yaml runs for everything of ours (its workers talk to the ComfyUI emulator).
#   docker build -f deploy/gateway.Dockerfile -t <registry>/comfyui-serverless-gateway:<tag> .
# Built once: nothing is installed when a container starts.

ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# The requirements first, so that a change of code reuses this layer.
COPY requirements.txt /app/requirements.txt
RUN python -m venv /opt/venv && pip install -r /app/requirements.txt
COPY --chmod=755 bootstrap /app/bootstrap
COPY handler.py /app/
COPY serverless /app/serverless

# Not root. Hosted workflows (WORKFLOWS_DIR) are the one thing a gateway writes to disk: a shared
# volume mounted at /mnt/auto/workflows (Kubernetes: fsGroup 10001 makes it writable).
RUN useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin app \
 && mkdir -p /mnt/auto/workflows \
 && chown -R app:app /mnt/auto
USER 10001

# A gateway of the Redis tier unless told otherwise; HOST: every address of the container.
ENV ROLE=gateway \
    STATUS_BACKEND=redis \
    QUEUE_BACKEND=redis \
    MODEL_ASSET_DIR=/mnt/auto \
    FC_CUSTOM_LISTEN_PORT=9000 \
    HOST=0.0.0.0

WORKDIR /app
EXPOSE 9000
ENTRYPOINT ["/app/bootstrap"]
