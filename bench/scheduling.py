"""Fleet scheduling (issue #33): a gateway and two workers, each ComfyUI (the emulator) paying a
checkpoint load of LOAD_S whenever a job's checkpoint is not the one it holds. A mixed stream of
two workflows with different checkpoints (two clients, each posting sync jobs back to back, the
workflow drawn at random with a fixed seed) runs twice: first-free (AFFINITY_WAIT=0) and with
affinity (AFFINITY_WAIT=AFFINITY_WAIT_S). Goals: affinity cuts the mean latency by >= 40 %, and no
job waits more than AFFINITY_WAIT beyond an idle worker (its latency never passes one job's run,
a load and AFFINITY_WAIT)."""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from pathlib import Path

import aiohttp

from . import procs
from .clients import NO_LIMIT, RUN, long_workflow
from .report import Figure, goal, info

SECTION = "7. fleet scheduling"
LOAD_S = 1.0  # the emulated checkpoint load
STEP_S = 0.05  # one sampler step: a job of STEPS steps
STEPS = 4
AFFINITY_WAIT_S = 3.0
CHECKPOINTS = ("v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors")
GiB = 1 << 30


def workflow(ckpt: str, seed: int) -> dict[str, object]:
    prompt = long_workflow(STEPS, seed)
    prompt["4"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}
    return prompt


async def one_job(session: aiohttp.ClientSession, url: str, ckpt: str, seed: int) -> float:
    began = time.monotonic()
    async with session.post(url + RUN, data=json.dumps(workflow(ckpt, seed)), timeout=NO_LIMIT) as resp:
        payload = json.loads(await resp.read())
    if payload.get("type") != "serverless_api":
        raise RuntimeError(f"job failed: {payload}")
    return time.monotonic() - began


async def stream(session: aiohttp.ClientSession, url: str, jobs: int) -> list[float]:
    """Two clients, `jobs` jobs in all, each of a checkpoint drawn at random (seeded)."""
    draw = random.Random(33)
    plan = [draw.choice(CHECKPOINTS) for _ in range(jobs)]
    latencies: list[float] = []

    async def client() -> None:
        while plan:
            ckpt = plan.pop()
            latencies.append(await one_job(session, url, ckpt, len(plan) + 1000 * len(latencies)))

    await asyncio.gather(client(), client())
    return latencies


async def held(session: aiohttp.ClientSession, url: str) -> set[str]:
    """The checkpoints the workers hold, as their heartbeats tell (GET /api/fleet/workers)."""
    async with session.get(url + "/api/fleet/workers") as resp:
        workers = (await resp.json())["workers"]
    return {ckpt for worker in workers for ckpt in worker["resident_models"]}


async def mode(work: Path, redis_url: str, emulators: list[procs.Server], wait: float, jobs: int) -> list[float]:
    """The stream through a fresh gateway and two workers with AFFINITY_WAIT=`wait`."""
    tier = {"STATUS_BACKEND": "redis", "QUEUE_BACKEND": "redis", "REDIS_URL": redis_url, "AFFINITY_WAIT": str(wait)}
    started: list[procs.Server] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        try:
            started.append(procs.start_app(work / f"gw-{wait}", "http://127.0.0.1:9", ROLE="gateway", **tier))
            for n, emulator in enumerate(emulators):
                name = f"w{n}-{wait}"
                started.append(procs.start_app(work / name, emulator.url, ROLE="worker", FC_INSTANCE_ID=name, **tier))
            for server in started:
                await server.wait_ready(session, procs.HEALTH)
            await asyncio.sleep(1.5)  # the workers' first heartbeats
            for attempt in range(5):  # each worker starts holding one checkpoint (in both modes)
                await asyncio.gather(*(one_job(session, started[0].url, ckpt, attempt) for ckpt in CHECKPOINTS))
                await asyncio.sleep(0.5)
                if len(await held(session, started[0].url)) == 2:
                    break
            return await stream(session, started[0].url, jobs)
        finally:
            for server in reversed(started):
                server.stop()


async def affinity(quick: bool) -> list[Figure]:
    from .redis_tier import Redis

    jobs = 30 if quick else 60
    print(f"fleet scheduling: {jobs} jobs of two checkpoints, first-free then affinity", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-sched-") as tmp:
        work = Path(tmp)
        redis = Redis(work)
        emulators: list[procs.Server] = []
        try:
            async with aiohttp.ClientSession() as session:
                for n in range(2):
                    emulators.append(procs.start_emulator(work / f"comfyui{n}", step_delay=STEP_S))
                    await emulators[-1].wait_ready(session, "/system_stats")
                    knobs = {"model_load_delay": LOAD_S, "vram_total": 24 * GiB, "model_bytes": 12 * GiB}
                    async with session.post(emulators[-1].url + "/emulator/config", json=knobs) as resp:
                        resp.raise_for_status()
            first_free = await mode(work, redis.url, emulators, 0.0, jobs)
            with_affinity = await mode(work, redis.url, emulators, AFFINITY_WAIT_S, jobs)
        finally:
            for emulator in emulators:
                emulator.stop()
            redis.stop()
    mean_free = sum(first_free) / len(first_free)
    mean_affinity = sum(with_affinity) / len(with_affinity)
    cut = (1 - mean_affinity / mean_free) * 100
    bound = STEPS * STEP_S + LOAD_S + AFFINITY_WAIT_S + 1.0  # + 1 s for the tier's own round trips
    return [
        info(SECTION, "mean latency, first-free", mean_free * 1000, "ms", f"{jobs} jobs, load {LOAD_S:g} s"),
        info(SECTION, "mean latency, affinity", mean_affinity * 1000, "ms", f"AFFINITY_WAIT={AFFINITY_WAIT_S:g}"),
        goal(SECTION, "mean latency cut by affinity", cut, "%", ">= 40 %", lambda v: v >= 40),
        goal(
            SECTION,
            "longest latency, affinity",
            max(with_affinity) * 1000,
            "ms",
            f"<= {bound * 1000:.0f} ms",
            lambda v: v <= bound * 1000,
            "a job, a load and AFFINITY_WAIT (+1 s)",
        ),
    ]


if __name__ == "__main__":
    for figure in asyncio.run(affinity(quick=True)):
        print(figure.section, figure.name, figure.shown, figure.goal, figure.verdict)
