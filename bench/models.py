"""Models on demand: what a cached model reference adds to a job, and how fast the store downloads
beside `curl`. `python -m bench.models` prints the figures; `python -m bench` includes them.

A file server (`python -m http.server`, a process of its own) serves a model file on loopback. The
emulator lists a models folder (`--models-dir`); the adapter (`bootstrap`) has `MODELS_DIR` there.

- **Cached reference**: jobs alternate between naming the checkpoint by its file name and by its
  URL (already in the store, so `cached: true`); the figure is the difference of the medians.
- **Download throughput**: an import (`POST /api/models`) of the file under a new URL each time,
  its `download_s` from the task's result (streamed to disk, hashed, through the SSRF guard), beside
  `curl -o` of the same file into the same folder; the best of a few runs of each.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from . import procs
from .report import Figure, goal

SECTION = "models"
MiB = 1024 * 1024


def _model_file(path: Path, size: int) -> None:
    """A valid safetensors file of `size` bytes of noise (written in blocks)."""
    header = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        block = os.urandom(4 * MiB)
        left = size
        while left:
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))


def _workflow(ckpt: str, seed: int) -> dict[str, Any]:
    from tests.helpers import txt2img

    workflow = txt2img(seed=seed, steps=1, prefix="bench/models", size=32)
    workflow["4"]["inputs"]["ckpt_name"] = ckpt
    return workflow


async def _job(session: aiohttp.ClientSession, url: str, workflow: dict[str, Any]) -> float:
    started = time.perf_counter()
    async with session.post(url + "/api/serverless/run", json=workflow) as resp:
        body = await resp.json()
        assert resp.status == 200, body
    return time.perf_counter() - started


async def _import(session: aiohttp.ClientSession, url: str, source: str) -> dict[str, Any]:
    async with session.post(url + "/api/models", json={"source": source, "folder": "checkpoints"}) as resp:
        task_id = (await resp.json())["task_id"]
    while True:
        async with session.get(url + "/api/serverless/task", params={"task_id": task_id}) as resp:
            summary = await resp.json()
        if summary.get("state") in ("succeeded", "failed"):
            assert summary["state"] == "succeeded", summary
            data: dict[str, Any] = summary["result"]["data"]
            return data
        await asyncio.sleep(0.02)


def _file_server(folder: Path, port: int) -> subprocess.Popen[bytes]:
    """`python -m http.server` serving `folder` on loopback (a process: its own core)."""
    args = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(folder)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _curl(url: str, dest: Path) -> float:
    started = time.perf_counter()
    subprocess.run(["curl", "-sS", "-o", str(dest), url], check=True)
    return time.perf_counter() - started


async def models(session: aiohttp.ClientSession, workdir: Path, quick: bool) -> list[Figure]:
    size = (64 if quick else 256) * MiB
    served = workdir / "served"
    served.mkdir(parents=True)
    _model_file(served / "base.safetensors", size)
    runs = 2 if quick else 3
    for i in range(runs):
        os.link(served / "base.safetensors", served / f"copy{i}.safetensors")
    port = procs.free_port()
    files = _file_server(served, port)
    models_dir = workdir / "models"
    emulator = procs.start_emulator(workdir / "comfyui", 0.0, "--models-dir", str(models_dir))
    app = None
    try:
        await emulator.wait_ready(session, "/system_stats")
        app = procs.start_app(
            workdir / "app", emulator.url, MODELS_DIR=str(models_dir), MODEL_ALLOWED_HOSTS="127.0.0.1"
        )
        await app.wait_ready(session, procs.HEALTH)
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):  # the file server answers
            try:
                async with session.head(base + "/base.safetensors") as resp:
                    if resp.status == 200:
                        break
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)

        ours, curls = [], []
        for i in range(runs):
            data = await _import(session, app.url, f"{base}/copy{i}.safetensors")
            ours.append(data["download_s"])
            (models_dir / "curl.bin").unlink(missing_ok=True)  # a new file each time, as the store's
            curls.append(await asyncio.to_thread(_curl, f"{base}/copy{i}.safetensors", models_dir / "curl.bin"))
        (models_dir / "curl.bin").unlink(missing_ok=True)
        ours_rate, curl_rate = size / MiB / min(ours), size / MiB / min(curls)

        reference = f"{base}/base.safetensors"
        await _job(session, app.url, _workflow(reference, 1))  # into the store; its name is listed
        named, by_url = [], []
        jobs = 20 if quick else 60
        for i in range(jobs):
            named.append(await _job(session, app.url, _workflow("base.safetensors", 1000 + i)))
            by_url.append(await _job(session, app.url, _workflow(reference, 5000 + i)))
        added = (statistics.median(by_url) - statistics.median(named)) * 1000
    finally:
        if app is not None:
            app.stop()
        emulator.stop()
        files.terminate()
        files.wait(10)
    return [
        goal(
            SECTION,
            "cached reference: added per job (median)",
            added,
            "ms",
            "< 1 ms",
            lambda v: v < 1.0,
            f"{jobs} jobs each way, alternating",
        ),
        goal(
            SECTION,
            f"download {size // MiB} MiB: store",
            ours_rate,
            "MiB/s",
            "within 10 % of curl",
            lambda v: v >= 0.9 * curl_rate,
            f"best of {runs}",
        ),
        Figure(SECTION, f"download {size // MiB} MiB: curl -o", curl_rate, "MiB/s", note=f"best of {runs}"),
        Figure(
            SECTION,
            "SHA-256 alone, one core",
            _sha256_rate(served / "base.safetensors"),
            "MiB/s",
            note="the store hashes what it writes (content addressing); curl does not",
        ),
    ]


def _sha256_rate(path: Path) -> float:
    """MiB/s of hashlib's SHA-256 over a file already in the page cache (4 MiB reads)."""
    digest, done = hashlib.sha256(), 0
    started = time.perf_counter()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            digest.update(block)
            done += len(block)
    return done / MiB / (time.perf_counter() - started)


async def _main(quick: bool) -> list[Figure]:
    with tempfile.TemporaryDirectory(prefix="bench-models-") as tmp:
        async with aiohttp.ClientSession() as session:
            return await models(session, Path(tmp), quick)


if __name__ == "__main__":
    from .report import text_table

    if shutil.which("curl") is None:
        sys.exit("bench.models needs curl")
    print(text_table(asyncio.run(_main("--quick" in sys.argv))))
