"""The benchmarks. Each takes the run's `Context` and returns figures (see report.py).

Methods, in short (docs/PERFORMANCE_SECTION.md says more):
- overhead: the same small job, one at a time, through ComfyUI's native protocol and through the
  adapter, the kinds in turn in runs of 5 (`in_runs`); the difference of the latency percentiles is
  what the adapter adds. The floor (`floor.py`): the same clients against a bare Starlette app.
- throughput: N clients, each looping jobs, for a fixed window after a warm-up; jobs/s completed
  in the window, and the ratio to native clients at the same N.
- event latency: the emulator stamps each websocket text with `time.monotonic()` just before
  writing it (`GET /emulator/sent?times=1`); the SSE client stamps each `data:` line when read.
  Both are CLOCK_MONOTONIC, one clock for every process of the machine. The job's client id comes
  from its history entry (`extra_data.client_id`). The same measure for a
  native websocket client gives the floor the adapter adds to.
- memory: /proc/<pid>/status VmRSS; peak via VmHWM after resetting it (clear_refs 5).
- start-up: process spawn to the first 200 from /api/serverless/health, polled every 5 ms.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path
from typing import Any

import aiohttp

from . import peers, procs
from .clients import (
    DirectClient,
    JobFailed,
    Received,
    b64encode,
    big_workflow,
    invert_workflow,
    long_workflow,
    noise_png,
    noise_workflow,
    open_stream,
    percentile,
    run_sse,
    run_sync,
    run_url,
    run_ws,
    small_workflow,
    tiny_png,
)
from .report import Figure, goal, info

MiB = 1024 * 1024


@dataclass
class Context:
    """What every benchmark of one run shares."""

    session: aiohttp.ClientSession
    comfyui_url: str
    app: procs.Server
    workdir: Path
    emulated: bool  # the emulator's hooks are there (not a real ComfyUI)
    comfyui_pid: int | None = None  # ComfyUI's process, for its CPU per job (COMFYUI_PID for a real one)
    salad: procs.Server | None = None  # Salad's comfyui-api on the same ComfyUI (`--salad`), measured in W2
    notes: list[str] = field(default_factory=list)
    colors: count[int] = field(default_factory=lambda: count(1))

    def job(self, prefix: str) -> dict[str, Any]:
        return small_workflow(prefix, next(self.colors))

    async def configure(self, **knobs: float) -> None:
        async with self.session.post(self.comfyui_url + "/emulator/config", json=knobs) as resp:
            resp.raise_for_status()

    async def health(self, url: str | None = None) -> dict[str, Any]:
        async with self.session.get((url or self.app.url) + procs.HEALTH) as resp:
            return dict(await resp.json())

    async def until(self, condition: Callable[[dict[str, Any]], bool], timeout: float) -> None:
        """Poll the app's health until `condition` holds of it (or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        while True:
            if condition(await self.health()) or time.monotonic() > deadline:
                return
            await asyncio.sleep(0.05)


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def ms(seconds: list[float]) -> list[float]:
    return [s * 1000 for s in seconds]


async def timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    await call()
    return time.perf_counter() - started


# -- 1. overhead per job ----------------------------------------------------------------------------


RUN = 5  # jobs of one kind in a row (`in_runs`)


def in_runs(names: list[str], warmup: int, jobs: int) -> Iterator[tuple[str, bool]]:
    """The kinds of job to run one at a time, each with whether it is measured: `warmup` of each
    unmeasured, then runs of RUN jobs of one kind, the kinds in turn, until `jobs` of each are
    measured. A run's first job is not measured: it pays for what the job before it left behind
    (a websocket's close ends on both sides after its client has its answer; a job's status log is
    written after its answer), so each kind is measured after its own kind, as by a client that
    loops it. (Alternating kinds one job each, a fixed order charged the websocket's close to
    ComfyUI's API: 0.5-1 ms at load 7.)"""
    for _ in range(warmup):
        for name in names:
            yield name, False
    measured = 0
    while measured < jobs:
        runs = min(RUN - 1, jobs - measured)
        for name in names:
            yield name, False
            for _ in range(runs):
                yield name, True
        measured += runs


async def overhead(ctx: Context, jobs: int = 200, warmup: int = 20) -> list[Figure]:
    say(f"overhead: {jobs} jobs each, native / sync / SSE / websocket / ComfyUI's API through us, in runs of {RUN}")
    series: dict[str, list[float]] = {"native": [], "sync": [], "sse": [], "ws": [], "comfyapi": []}
    async with (
        DirectClient(ctx.session, ctx.comfyui_url) as direct,
        DirectClient(ctx.session, ctx.app.url) as through_us,  # the same client, pointed at our /prompt + /ws
    ):
        runs = {
            "native": lambda: direct.run(ctx.job("bench/overhead-native/img")),
            "sync": lambda: run_sync(ctx.session, ctx.app.url, ctx.job("bench/overhead-sync/img")),
            "sse": lambda: run_sse(ctx.session, ctx.app.url, ctx.job("bench/overhead-sse/img")),
            "ws": lambda: run_ws(ctx.session, ctx.app.url, ctx.job("bench/overhead-ws/img")),
            "comfyapi": lambda: through_us.run(ctx.job("bench/overhead-comfyapi/img")),
        }
        cpu = 0.0
        comfyui_cpu = dict.fromkeys(runs, 0.0)  # ComfyUI's CPU seconds spent on each kind of job
        app_cpu = dict.fromkeys(runs, 0.0)  # the app's, during each kind of job
        adapter_jobs = 0  # after the warm-up
        for index, (name, measured) in enumerate(in_runs(list(runs), warmup, jobs)):
            if index == warmup * len(runs):
                cpu = procs.cpu_seconds(ctx.app.pid)
            adapter_jobs += index >= warmup * len(runs) and name != "native"
            before = procs.cpu_seconds(ctx.comfyui_pid) if ctx.comfyui_pid else 0.0
            app_before = procs.cpu_seconds(ctx.app.pid)
            elapsed = await timed(runs[name])
            if measured:
                series[name].append(elapsed)
                # clock ticks: each reading is coarse, their sum is not biased
                app_cpu[name] += procs.cpu_seconds(ctx.app.pid) - app_before
                if ctx.comfyui_pid:
                    comfyui_cpu[name] += procs.cpu_seconds(ctx.comfyui_pid) - before
        cpu_per_job = (procs.cpu_seconds(ctx.app.pid) - cpu) * 1000 / adapter_jobs
    kind_cpu = {name: spent * 1000 / jobs for name, spent in app_cpu.items()}
    native, sync, sse, ws, comfyapi = (ms(series[k]) for k in ("native", "sync", "sse", "ws", "comfyapi"))
    p = percentile
    section = "1. overhead per job"
    return [
        info(section, "native client p50 / p99", p(native, 50), "ms", f"p99 {p(native, 99):.2f} ms"),
        info(section, "adapter sync p50 / p99", p(sync, 50), "ms", f"p99 {p(sync, 99):.2f} ms"),
        info(section, "adapter SSE p50 / p99", p(sse, 50), "ms", f"p99 {p(sse, 99):.2f} ms"),
        info(section, "adapter websocket p50 / p99", p(ws, 50), "ms", f"p99 {p(ws, 99):.2f} ms"),
        info(section, "ComfyUI's API through us p50 / p99", p(comfyapi, 50), "ms", f"p99 {p(comfyapi, 99):.2f} ms"),
        goal(
            section,
            "added by the adapter, sync p50",
            p(sync, 50) - p(native, 50),
            "ms",
            "<= 0.3 ms",
            lambda v: v <= 0.3,
            f"p99 {p(sync, 99) - p(native, 99):+.2f} ms (goal: not worse than native)",
        ),
        *(
            goal(
                section,
                f"{name} p50 over sync",
                p(values, 50) - p(sync, 50),
                "ms",
                "<= 0.3 ms",
                lambda v: v <= 0.3,
                f"over native {p(values, 50) - p(native, 50):+.2f} ms; p99 {p(values, 99) - p(native, 99):+.2f} ms",
            )
            for name, values in (("SSE", sse), ("websocket", ws))
        ),
        goal(
            section,
            "added, ComfyUI's API (/prompt + /ws) p50",
            p(comfyapi, 50) - p(native, 50),
            "ms",
            "<= 1 ms",
            lambda v: v <= 1.0,
            f"p99 {p(comfyapi, 99) - p(native, 99):+.2f} ms",
        ),
        goal(
            section,
            "p99 added, sync",
            p(sync, 99) - p(native, 99),
            "ms",
            "<= 0 (not worse than native)",
            lambda v: v <= 0,
        ),
        info(section, "app CPU per job", cpu_per_job, "ms", "every adapter job above, averaged"),
        info(
            section,
            "app CPU per job, sync",
            kind_cpu["sync"],
            "ms",
            f"SSE {kind_cpu['sse']:.2f} / websocket {kind_cpu['ws']:.2f} / ComfyUI's API {kind_cpu['comfyapi']:.2f} ms",
        ),
        *_comfyui_cpu(section, comfyui_cpu, jobs),
    ]


def _comfyui_cpu(section: str, spent: dict[str, float], jobs: int) -> list[Figure]:
    """ComfyUI's own CPU per job, native client against the adapter's jobs (none without its pid)."""
    if not any(spent.values()):
        return [info(section, "ComfyUI CPU per job", None, "", "set COMFYUI_PID to measure a real ComfyUI's")]
    native = spent["native"] * 1000 / jobs
    adapter = sum(v for k, v in spent.items() if k != "native") * 1000 / ((len(spent) - 1) * jobs)
    return [
        info(section, "ComfyUI CPU per job, native client", native, "ms"),
        goal(
            section,
            "ComfyUI CPU per job, through the adapter",
            adapter,
            "ms",
            "<= native",
            lambda v: v <= native,
            "every kind of adapter job above, averaged",
        ),
    ]


# -- 2. throughput ----------------------------------------------------------------------------------


async def _throughput(
    ctx: Context,
    mode: str,
    clients: int,
    seconds: float,
    warmup: float,
    job: Callable[[], dict[str, Any]] | None = None,
) -> tuple[float, float]:
    """Jobs/s completed by `clients` looping clients in a window of `seconds` after `warmup`, and
    the app's CPU time per job (ms) over the whole run."""
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + seconds
    done: list[float] = []
    errors: list[str] = []
    prefix = f"bench/tp-{mode}-{clients}/img"
    workflow = job or (lambda: ctx.job(prefix))

    async def loop_jobs(job: Callable[[], Awaitable[object]]) -> None:
        while loop.time() < end:
            try:
                await job()
            except (JobFailed, aiohttp.ClientError) as exc:
                errors.append(str(exc))
                continue
            done.append(loop.time())

    async def client() -> None:
        if mode == "native":
            async with DirectClient(ctx.session, ctx.comfyui_url) as direct:
                await loop_jobs(lambda: direct.run(workflow()))
        elif mode == "sync":
            await loop_jobs(lambda: run_sync(ctx.session, ctx.app.url, workflow()))
        else:
            await loop_jobs(lambda: run_sse(ctx.session, ctx.app.url, workflow()))

    cpu = procs.cpu_seconds(ctx.app.pid)
    await asyncio.gather(*(client() for _ in range(clients)))
    cpu_per_job = (procs.cpu_seconds(ctx.app.pid) - cpu) * 1000 / max(1, len(done))
    if errors:
        ctx.notes.append(f"throughput {mode} x{clients}: {len(errors)} failed jobs, e.g. {errors[0][:200]}")
    # Completions per second between the first and the last completion of the window: no
    # rounding to whole jobs, which matters when a window holds only a few dozen.
    window = sorted(t for t in done if start <= t < end)
    if len(window) < 2:
        return len(window) / seconds, cpu_per_job
    return (len(window) - 1) / (window[-1] - window[0]), cpu_per_job


async def throughput(
    ctx: Context, levels: tuple[int, ...] = (1, 10, 100), seconds: float = 4.0, warmup: float = 1.0
) -> list[Figure]:
    figures = []
    section = "2. throughput (jobs/s)"
    for clients in levels:
        say(f"throughput: {clients} concurrent clients, native / sync / SSE, {seconds:g}s each")
        rates, cpu = {}, {}
        for mode in ("native", "sync", "sse"):
            rates[mode], cpu[mode] = await _throughput(ctx, mode, clients, seconds, warmup)
            await _settle(ctx)
        who = f"{clients} client" + ("s" if clients > 1 else "")
        figures.append(info(section, f"native, {who}", rates["native"], "jobs/s"))
        for mode in ("sync", "sse"):
            ratio = rates[mode] / rates["native"] if rates["native"] else 0.0
            note = f"{rates[mode]:.1f} jobs/s; app CPU {cpu[mode]:.1f} ms/job"
            if clients == 1:  # ~3 ms jobs back to back: bounded by arithmetic on two shared cores
                figures.append(info(section, f"{mode}, {who} (ratio to native)", ratio, "x", note))
                continue
            figures.append(
                goal(
                    section,
                    f"{mode}, {who} (ratio to native)",
                    ratio,
                    "x",
                    ">= 0.95 x native",
                    lambda v: v >= 0.95,
                    note,
                )
            )
    return figures


async def throughput_long_jobs(ctx: Context, jobs: int = 40, step_delay: float = 0.01, steps: int = 10) -> list[Figure]:
    """One client, jobs of ~100 ms in ComfyUI (KSampler steps): what a fixed per-job overhead costs
    once ComfyUI does some work. One client's jobs/s is 1 / its mean job time: the kinds take turns
    in runs (`_alternate`), so a drift of the machine's speed weighs on each alike (a window of
    each kind in turn, ~35 jobs each, moved the ratio by 3 % from run to run)."""
    section = "2. throughput (jobs/s)"
    label = f"{steps * step_delay * 1000:g} ms jobs"
    if not ctx.emulated:
        return [info(section, f"1 client, {label}", None, "jobs/s", "needs the emulator (step_delay)")]
    say(f"throughput: 1 client, {label}, native / sync / SSE, {jobs} jobs each in runs of each kind")
    await ctx.configure(step_delay=step_delay)
    seeds = count(10_000)
    try:
        async with DirectClient(ctx.session, ctx.comfyui_url) as direct:
            series = await _alternate(
                {
                    "native": lambda: direct.run(long_workflow(steps, seed=next(seeds))),
                    "sync": lambda: run_sync(ctx.session, ctx.app.url, long_workflow(steps, seed=next(seeds))),
                    "sse": lambda: run_sse(ctx.session, ctx.app.url, long_workflow(steps, seed=next(seeds))),
                },
                jobs,
                warmup=2,
            )
    finally:
        await ctx.configure(step_delay=0)
    rates = {mode: 1000 / statistics.mean(times) for mode, times in series.items()}
    figures = [info(section, f"native, 1 client, {label}", rates["native"], "jobs/s")]
    for mode in ("sync", "sse"):
        figures.append(
            goal(
                section,
                f"{mode}, 1 client, {label} (ratio)",
                rates[mode] / rates["native"],
                "x",
                ">= 0.99 x native",
                lambda v: v >= 0.99,
                f"{rates[mode]:.1f} jobs/s; {jobs} jobs each, in runs of each kind",
            )
        )
    return figures


async def _settle(ctx: Context, timeout: float = 30.0) -> None:
    """Wait until the app runs no job (the last cell's stragglers are gone)."""
    await ctx.until(lambda health: not health.get("jobs"), timeout)


# -- 3. event latency -------------------------------------------------------------------------------


async def _sent_times(ctx: Context, client_id: str) -> list[tuple[float, str]]:
    params = {"client_id": client_id, "times": "1"}
    async with ctx.session.get(ctx.comfyui_url + "/emulator/sent", params=params) as resp:
        return [(float(t), str(text)) for t, text in await resp.json()]


def _latencies(sent: list[tuple[float, str]], received: list[tuple[float, str]]) -> list[float]:
    """Receive time minus send time of each received text, matched in order to what was sent."""
    latencies, cursor = [], 0
    for received_at, text in received:
        for index in range(cursor, len(sent)):
            if sent[index][1] == text:
                latencies.append(received_at - sent[index][0])
                cursor = index + 1
                break
    return latencies


def _without_greeting(events: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """The events after the first ComfyUI `status` (the greeting, sent before the job began)."""
    for index, (_, text) in enumerate(events):
        if json.loads(text).get("type") == "status":
            return events[index + 1 :]
    return events


async def _client_id(ctx: Context, received: Received) -> str:
    """The ComfyUI client id the adapter submitted the job with: its history entry's `extra_data`
    holds it (`prompt` is `[number, prompt_id, prompt, extra_data, outputs]`)."""
    prompt_id = received.terminal["data"]["prompt_id"]
    async with ctx.session.get(f"{ctx.comfyui_url}/history/{prompt_id}") as resp:
        entry = (await resp.json())[prompt_id]
    return str(entry["prompt"][3]["client_id"])


async def event_latency(ctx: Context, jobs: int = 3, steps: int = 100, step_delay: float = 0.01) -> list[Figure]:
    section = "3. event latency"
    if not ctx.emulated:
        return [
            info(
                section,
                "ComfyUI send -> SSE client",
                None,
                "ms",
                "needs the emulator's send-time hook (GET /emulator/sent?times=1)",
            )
        ]
    say(f"event latency: {jobs} jobs of {steps} progress steps, {step_delay * 1000:g} ms apart")
    await ctx.configure(step_delay=step_delay)
    sse: list[float] = []
    native: list[float] = []
    try:
        for index in range(jobs):
            received = Received()
            started = time.monotonic()
            await run_sse(ctx.session, ctx.app.url, long_workflow(steps, seed=1000 + index), received)
            # The shared socket's latest `status`, which a job forwards first, was sent before the
            # job began: only what ComfyUI sent during the job is matched.
            sent = [pair for pair in await _sent_times(ctx, await _client_id(ctx, received)) if pair[0] >= started]
            live = [event for event in received.events[:-1] if event[0] >= started]  # the last is ours
            sse += _latencies(sent, _without_greeting(live))
            async with DirectClient(ctx.session, ctx.comfyui_url) as direct:
                received = Received()
                await direct.run(long_workflow(steps, seed=2000 + index), received)
                native += _latencies(await _sent_times(ctx, direct.client_id), received.events)
    finally:
        await ctx.configure(step_delay=0)
    sse, native = ms(sse), ms(native)
    return [
        goal(
            section,
            "ComfyUI send -> SSE client, p99",
            percentile(sse, 99),
            "ms",
            "p99 < 5 ms",
            lambda v: v < 5,
            f"p50 {percentile(sse, 50):.2f} ms, max {max(sse):.2f} ms, {len(sse)} events",
        ),
        info(
            section,
            "ComfyUI send -> native ws client, p99",
            percentile(native, 99),
            "ms",
            f"p50 {percentile(native, 50):.2f} ms (the floor), {len(native)} events",
        ),
    ]


# -- 4. memory --------------------------------------------------------------------------------------


async def open_streams_memory(ctx: Context, streams: int = 100) -> list[Figure]:
    """A fresh app, warmed by a few jobs, then `streams` SSE jobs open at once (queued in ComfyUI
    behind a long one, each holding its caller's connection and its own ComfyUI websocket)."""
    section = "4. memory"
    if not ctx.emulated:
        return [
            info(
                section,
                f"RSS with {streams} open streams",
                None,
                "MiB",
                "needs the emulator (long jobs through step_delay)",
            )
        ]
    say(f"memory: {streams} open SSE streams (fresh app)")
    app = procs.start_app(ctx.workdir / "streams", ctx.comfyui_url)
    fresh = Context(ctx.session, ctx.comfyui_url, app, ctx.workdir, ctx.emulated, notes=ctx.notes, colors=ctx.colors)
    responses: list[aiohttp.ClientResponse] = []
    try:
        await app.wait_ready(ctx.session, procs.HEALTH)
        for _ in range(20):
            await run_sse(ctx.session, app.url, fresh.job("bench/streams-warm/img"))
        await asyncio.sleep(0.3)
        before = procs.rss_mib(app.pid)
        await ctx.configure(step_delay=0.05)
        responses = list(
            await asyncio.gather(
                *(open_stream(ctx.session, app.url, long_workflow(10_000, seed=5000 + i)) for i in range(streams))
            )
        )
        await fresh.until(lambda health: health.get("jobs", 0) >= streams, 30)
        await asyncio.sleep(0.5)
        during = procs.rss_mib(app.pid)
    finally:
        for resp in responses:
            resp.close()  # the caller leaves: the adapter cancels each job in ComfyUI
        await ctx.configure(step_delay=0)
        await _settle(fresh)
        app.stop()
    return [
        info(
            section,
            f"RSS with {streams} open streams",
            during,
            "MiB",
            f"+{during - before:.1f} MiB over {before:.1f} MiB idle, "
            f"{(during - before) * 1024 / streams:.0f} KiB per stream",
        ),
    ]


async def base64_peak(ctx: Context) -> list[Figure]:
    """A fresh app (so earlier work cannot hide the peak in freed memory) returns a ~20 MB PNG as base64."""
    section = "4. memory"
    say("memory: a ~20 MB output returned as base64 (fresh app)")
    app = procs.start_app(ctx.workdir / "b64", ctx.comfyui_url)
    try:
        await app.wait_ready(ctx.session, procs.HEALTH)
        for _ in range(3):
            await run_sync(ctx.session, app.url, ctx.job("bench/b64-warm/img"))
        await asyncio.sleep(0.2)
        idle = procs.rss_mib(app.pid)
        sampled = [idle]
        exact = procs.reset_peak_rss(app.pid)

        async def sample() -> None:  # only used where VmHWM cannot be reset
            while True:
                sampled.append(procs.rss_mib(app.pid))
                await asyncio.sleep(0.001)

        sampler = None if exact else asyncio.create_task(sample())
        started = time.perf_counter()
        (image,) = await run_sync(ctx.session, app.url, noise_workflow("bench/b64/noise"))
        elapsed = time.perf_counter() - started
        if sampler is not None:
            sampler.cancel()
        peak = procs.peak_rss_mib(app.pid) if exact else max(sampled)
        after = procs.rss_mib(app.pid)
    finally:
        app.stop()
    size = len(image) / MiB
    above = peak - idle
    return [
        info(section, "base64 output: PNG size", size, "MiB", f"job took {elapsed:.2f} s; RSS after {after:.1f} MiB"),
        goal(
            section,
            "base64 output: peak RSS above idle",
            above / size,
            "x output",
            "< 3 x output",
            lambda v: v < 3,
            f"{above:.1f} MiB above {idle:.1f} MiB idle" + ("" if exact else " (sampled)"),
        ),
    ]


# -- 5. start-up ------------------------------------------------------------------------------------


async def startup(ctx: Context, runs: int = 3) -> list[Figure]:
    say(f"start-up: {runs} fresh app processes (bootstrap) to the first 200 from health")
    times, idle = [], []
    for index in range(runs):
        app = procs.start_app(ctx.workdir / f"start-{index}", ctx.comfyui_url)
        try:
            times.append(await app.wait_ready(ctx.session, procs.HEALTH))
            await asyncio.sleep(0.3)
            idle.append(procs.rss_mib(app.pid))
        finally:
            app.stop()
    return [
        info(
            "5. start-up",
            "process start -> first 200 from health",
            statistics.median(times),
            "s",
            "runs: " + ", ".join(f"{t:.2f}" for t in times),
        ),
        goal(
            "4. memory",
            "RSS idle, just started",
            max(idle),
            "MiB",
            "< 80 MiB",
            lambda v: v < 80,
            "max of the start-up runs",
        ),
    ]


async def idle_rss(ctx: Context, after: str, target: bool = True) -> list[Figure]:
    """The app's RSS once it runs nothing, after `after`."""
    await _settle(ctx)
    await asyncio.sleep(0.3)
    rss = procs.rss_mib(ctx.app.pid)
    name = f"RSS idle, after {after}"
    if not target:
        return [info("4. memory", name, rss, "MiB", "allocator keeps what the peak of 100 clients took")]
    return [goal("4. memory", name, rss, "MiB", "< 80 MiB", lambda v: v < 80)]


# -- OSS upload overlap (a colleague's module) -----------------------------------------------------


async def oss_overlap(ctx: Context) -> list[Figure]:
    section = "6. OSS overlap"
    try:
        from . import oss_overlap as module  # type: ignore[attr-defined]
    except ImportError as exc:
        return [info(section, "bench/oss_overlap.py", None, "", f"not available ({exc}): skipped")]
    say("oss overlap: bench.oss_overlap.run()")
    try:
        # run() may drive its own event loop: give it a thread of its own.
        results = await asyncio.wait_for(asyncio.to_thread(module.run), timeout=120)
    except Exception as exc:  # a colleague's module failing must not lose this run's table
        return [info(section, "bench/oss_overlap.py", None, "", f"failed ({type(exc).__name__}: {exc}): skipped")]
    return [
        info(section, str(name), float(value), "s" if str(name).endswith("_s") else "")
        for name, value in dict(results).items()
    ]


# -- 7. inputs (W2) and 8. realistic sizes (W3) ----------------------------------------------------


async def _alternate(
    runs: dict[str, Callable[[], Awaitable[object]]],
    jobs: int,
    warmup: int,
    cpu_of: int | None = None,
    cpu: dict[str, list[float]] | None = None,
    client_cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """`jobs` latencies in ms of each kind, the kinds in turn in runs of RUN (`in_runs`: each
    measured after its own kind), `warmup` of each unmeasured first. With `cpu_of` (a pid), the CPU
    seconds that process spent during each measured job go to `cpu` by kind; with `client_cpu`,
    this process's own (the load generator's: its JSON, base64 and HTTP work) likewise."""
    series: dict[str, list[float]] = {name: [] for name in runs}
    for name, measured in in_runs(list(runs), warmup, jobs):
        before = procs.cpu_seconds(cpu_of) if cpu_of is not None else 0.0
        own = _own_cpu()
        elapsed = await timed(runs[name])
        if measured:
            series[name].append(elapsed * 1000)
            if cpu_of is not None and cpu is not None:
                cpu.setdefault(name, []).append(procs.cpu_seconds(cpu_of) - before)
            if client_cpu is not None:
                client_cpu.setdefault(name, []).append(_own_cpu() - own)
    return series


def _own_cpu() -> float:
    return time.process_time()  # every thread of this process, to the nanosecond


def _b64(data: bytes) -> str:
    return b64encode(data)


async def _rate(
    ctx: Context, in_flight: int, seconds: float, warmup: float, make: Callable[[], Callable[[], Awaitable[object]]]
) -> tuple[float, float]:
    """Jobs/s of `in_flight` looping clients (each made by `make`), and the app's CPU ms per job."""
    loop = asyncio.get_running_loop()
    start = loop.time() + warmup
    end = start + seconds
    done: list[float] = []
    errors: list[str] = []

    async def client() -> None:
        job = make()
        while loop.time() < end:
            try:
                await job()
            except (JobFailed, aiohttp.ClientError) as exc:
                errors.append(str(exc))
                continue
            done.append(loop.time())

    cpu = procs.cpu_seconds(ctx.app.pid)
    await asyncio.gather(*(client() for _ in range(in_flight)))
    cpu_per_job = (procs.cpu_seconds(ctx.app.pid) - cpu) * 1000 / max(1, len(done))
    if errors:
        ctx.notes.append(f"{len(errors)} failed jobs, e.g. {errors[0][:200]}")
    window = sorted(t for t in done if start <= t < end)
    if len(window) < 2:
        return len(window) / seconds, cpu_per_job
    return (len(window) - 1) / (window[-1] - window[0]), cpu_per_job


W2_SECTION = "7. inputs (W2: a fresh PNG per job)"


def w2_job() -> Callable[[str], dict[str, Any]]:
    """W2's workflow with a fresh PNG each call, given as base64 (the adapter's way): `job(prefix)`."""
    serial = count(1_000_000)
    return lambda prefix: invert_workflow(_b64(tiny_png(next(serial))), prefix)


async def inputs_w2(ctx: Context, jobs: int = 200, seconds: float = 4.0, rounds: int = 3) -> list[Figure]:
    """W2: a fresh small PNG per job through LoadImage -> ImageInvert -> SaveImage. Native: the
    client uploads it (`POST /upload/image`, as ComfyUI's frontend does) then queues the prompt;
    the adapter (and Salad's comfyui-api, with `--salad`) gets it as base64 in the workflow.
    Latency one job at a time, in runs of each kind; then 8 jobs in flight, each system's window in
    rotating order, `rounds` times (medians)."""
    section = W2_SECTION
    peer = ctx.salad
    say(
        f"W2 inputs: {jobs} jobs each, native / sync / SSE / websocket{' / Salad' if peer else ''}, alternately; "
        f"8 in flight x {rounds}"
    )
    serial = count(1)

    def adapter(run: Callable[..., Awaitable[list[bytes]]], name: str) -> Callable[[], Awaitable[object]]:
        return lambda: run(
            ctx.session, ctx.app.url, invert_workflow(_b64(tiny_png(next(serial))), f"bench/w2-{name}/img")
        )

    def salad() -> Callable[[], Awaitable[object]]:
        assert peer is not None  # its outputs' names carry no folder: it lists output/ by prefix
        return lambda: peers.run_salad(ctx.session, peer.url, invert_workflow(_b64(tiny_png(next(serial))), "w2_salad"))

    async with DirectClient(ctx.session, ctx.comfyui_url) as direct:

        async def native() -> None:
            name = await direct.upload(tiny_png(next(serial)), f"w2-{uuid.uuid4().hex}.png")
            await direct.run(invert_workflow(name, "bench/w2-native/img"))

        runs = {"native": native, "sync": adapter(run_sync, "sync"), "sse": adapter(run_sse, "sse")}
        runs["ws"] = adapter(run_ws, "ws")
        if peer is not None:
            runs["salad"] = salad()
        series = await _alternate(runs, jobs, warmup=10)
    rates: dict[str, list[float]] = {"native": [], "sync": [], **({"salad": []} if peer else {})}
    cpu: list[float] = []
    clients: list[DirectClient] = []

    def native_client() -> Callable[[], Awaitable[object]]:
        direct = DirectClient(ctx.session, ctx.comfyui_url)

        async def job() -> None:
            if direct.ws is None:
                await direct.__aenter__()
            name = await direct.upload(tiny_png(next(serial)), f"w2-{uuid.uuid4().hex}.png")
            await direct.run(invert_workflow(name, "bench/w2-tp-native/img"))

        clients.append(direct)
        return job

    makers = {"native": native_client, "sync": lambda: adapter(run_sync, "tp-sync"), "salad": salad}
    try:
        names = list(rates)
        for index in range(rounds):
            for name in names[index % len(names) :] + names[: index % len(names)]:
                rate, app_cpu = await _rate(ctx, 8, seconds, 0.5, makers[name])
                rates[name].append(rate)
                if name == "sync":
                    cpu.append(app_cpu)
                await _settle(ctx)
    finally:
        for direct in clients:
            await direct.__aexit__()
    median = {name: statistics.median(values) for name, values in rates.items()}
    sync_note = f"{median['sync']:.0f} jobs/s ({_runs(rates['sync'])}); app CPU {statistics.median(cpu):.1f} ms/job"
    figures = [
        *_latency_figures(section, series, sync_limit=0.3),
        info(section, "native, 8 in flight", median["native"], "jobs/s", _runs(rates["native"])),
    ]
    if peer is None:
        return [
            *figures,
            goal(
                section,
                "sync, 8 in flight (ratio to native)",
                median["sync"] / median["native"],
                "x",
                ">= 2 x native",
                lambda v: v >= 2.0,
                f"{sync_note}; 2 x: Salad's in the issue's run (`--salad` measures it here)",
            ),
        ]
    added = percentile(series["salad"], 50) - percentile(series["native"], 50)
    return [
        *figures,
        info(
            section,
            "Salad's comfyui-api p50 / p99",
            percentile(series["salad"], 50),
            "ms",
            f"over native {added:+.2f} ms; p99 {percentile(series['salad'], 99):.2f} ms",
        ),
        info(
            section,
            "Salad's comfyui-api, 8 in flight (ratio to native)",
            median["salad"] / median["native"],
            "x",
            f"{median['salad']:.0f} jobs/s ({_runs(rates['salad'])})",
        ),
        info(section, "sync, 8 in flight (ratio to native)", median["sync"] / median["native"], "x", sync_note),
        goal(
            section,
            "sync, 8 in flight (ratio to Salad's)",
            median["sync"] / median["salad"],
            "x",
            ">= 1 x Salad's",
            lambda v: v >= 1.0,
            "the same run, windows in rotating order",
        ),
    ]


def _runs(values: list[float]) -> str:
    return "median of " + ", ".join(f"{v:.0f}" for v in values)


def _latency_figures(section: str, series: dict[str, list[float]], sync_limit: float) -> list[Figure]:
    """p50 / p99 of each; the adapter's added p50 against goals (sync: `sync_limit` over native,
    SSE and websocket: 0.3 ms over sync), and p99 not worse than native's."""
    p = percentile
    native = series["native"]
    names = {"sync": "sync", "sse": "SSE", "ws": "websocket"}
    figures = [info(section, "native client p50", p(native, 50), "ms", f"p99 {p(native, 99):.2f} ms")]
    for key, name in names.items():
        figures.append(
            info(section, f"adapter {name} p50", p(series[key], 50), "ms", f"p99 {p(series[key], 99):.2f} ms")
        )
    sync50 = p(series["sync"], 50)
    figures.append(
        goal(
            section,
            "added, sync p50",
            sync50 - p(native, 50),
            "ms",
            f"<= {sync_limit:g} ms",
            lambda v: v <= sync_limit,
        )
    )
    for key in ("sse", "ws"):
        figures.append(
            goal(
                section,
                f"{names[key]} p50 over sync",
                p(series[key], 50) - sync50,
                "ms",
                "<= 0.3 ms",
                lambda v: v <= 0.3,
                f"over native {p(series[key], 50) - p(native, 50):+.2f} ms",
            )
        )
    figures.append(
        goal(
            section,
            "p99 added, sync",
            p(series["sync"], 99) - p(native, 99),
            "ms",
            "<= 0 (not worse than native)",
            lambda v: v <= 0,
        )
    )
    return figures


async def short_jobs(ctx: Context, jobs: int = 200, steps: int = 4, step_delay: float = 0.001) -> list[Figure]:
    """One client, jobs of ~4 ms in ComfyUI, one at a time, native and sync in runs of each kind:
    what the adapter adds to a job that short (its rate is bounded by arithmetic on two shared cores, so the
    goal is on latency, not on the one-client rate)."""
    section = "2. throughput (jobs/s)"
    label = f"{steps * step_delay * 1000:g} ms jobs"
    if not ctx.emulated:
        return [info(section, f"added p50, {label}", None, "ms", "needs the emulator (step_delay)")]
    say(f"short jobs: {jobs} {label} each, native / sync in runs of each kind")
    await ctx.configure(step_delay=step_delay)
    seeds = count(50_000)
    try:
        async with DirectClient(ctx.session, ctx.comfyui_url) as direct:
            series = await _alternate(
                {
                    "native": lambda: direct.run(long_workflow(steps, seed=next(seeds))),
                    "sync": lambda: run_sync(ctx.session, ctx.app.url, long_workflow(steps, seed=next(seeds))),
                },
                jobs,
                warmup=10,
            )
    finally:
        await ctx.configure(step_delay=0)
    added = percentile(series["sync"], 50) - percentile(series["native"], 50)
    return [
        goal(
            section,
            f"sync, 1 client, {label}: added p50",
            added,
            "ms",
            "<= 0.5 ms",
            lambda v: v <= 0.5,
            f"native p50 {percentile(series['native'], 50):.2f} ms",
        )
    ]


async def sizes_w3(
    ctx: Context, jobs: int = 15, seconds: float = 6.0, rounds: int = 2, side: int = 1024
) -> list[Figure]:
    """W3: a ~1 MB input PNG, a ~3 MB output PNG (noise, `big_workflow`). Native: upload, prompt,
    `/history`, `/view`. The adapter: base64 in; out as base64, as a link (`output_url`, then
    fetched) or as WebP (`output_format=webp&output_quality=90`; the native client then converts the
    PNG itself with Pillow at the same quality, so both end holding the same bytes). Latency in runs
    of each kind; jobs/s with 4 in flight; peak memory of a fresh app per mode (its first job; then
    per job, four at once), against the job's payload (input + output bytes)."""
    section = "8. realistic sizes (W3: 1 MB in, 3 MB out)"
    say(
        f"W3 sizes: {jobs} jobs each, native / base64 / output_url / webp, in runs of each kind; "
        "4 in flight; peak memory"
    )
    seeds = count(70_000)
    inputs = [noise_png(580) for _ in range(4)]
    picks = count()

    def next_input() -> bytes:
        return inputs[next(picks) % len(inputs)]

    async def native_job(direct: DirectClient, webp: bool = False) -> list[bytes]:
        name = await direct.upload(next_input(), "w3-input.png")
        images = await direct.run(big_workflow(name, "bench/w3-native/img", next(seeds), side))
        if webp:
            images = [await asyncio.to_thread(_to_webp, image) for image in images]
        return images

    def adapter_job(url: str, mode: str) -> Callable[[], Awaitable[list[bytes]]]:
        async def job() -> list[bytes]:
            workflow = big_workflow(_b64(next_input()), f"bench/w3-{mode}/img", next(seeds), side)
            if mode == "url":
                return await run_url(ctx.session, url, workflow)
            return await run_sync(ctx.session, url, workflow, params=_WEBP_PARAMS if mode == "webp" else None)

        return job

    app_cpu: dict[str, list[float]] = {}
    client_cpu: dict[str, list[float]] = {}
    async with DirectClient(ctx.session, ctx.comfyui_url) as direct:
        png_size = len((await native_job(direct))[0])
        series = await _alternate(
            {
                "native": lambda: native_job(direct),
                "base64": adapter_job(ctx.app.url, "base64"),
                "url": adapter_job(ctx.app.url, "url"),
                "native_webp": lambda: native_job(direct, webp=True),
                "webp": adapter_job(ctx.app.url, "webp"),
            },
            jobs,
            warmup=2,
            cpu_of=ctx.app.pid,
            cpu=app_cpu,
            client_cpu=client_cpu,
        )
    clients: list[DirectClient] = []

    def native_client() -> Callable[[], Awaitable[object]]:
        direct = DirectClient(ctx.session, ctx.comfyui_url)
        clients.append(direct)

        async def job() -> None:
            if direct.ws is None:
                await direct.__aenter__()
            await native_job(direct)

        return job

    rates: dict[str, list[float]] = {"native": [], "base64": []}
    try:
        for _ in range(rounds):
            rates["native"].append((await _rate(ctx, 4, seconds, 1.0, native_client))[0])
            await _settle(ctx)
            rates["base64"].append((await _rate(ctx, 4, seconds, 1.0, lambda: adapter_job(ctx.app.url, "base64")))[0])
            await _settle(ctx)
    finally:
        for direct in clients:
            await direct.__aexit__()
    payload = len(inputs[0]) + png_size
    memory = {mode: await _peak_per_job(ctx, mode, adapter_job) for mode in ("base64", "url", "webp")}
    p = percentile
    native50, webp50 = p(series["native"], 50), p(series["native_webp"], 50)
    figures = [
        info(
            section,
            "input / output PNG",
            len(inputs[0]) / MiB,
            "MiB",
            f"output {png_size / MiB:.2f} MiB ({side}x{side} noise)",
        ),
        info(
            section,
            "native client p50",
            native50,
            "ms",
            f"p99 {p(series['native'], 99):.1f} ms; client CPU {_ms(client_cpu['native'])} ms/job",
        ),
    ]
    for mode, label, base in (
        ("base64", "base64 out", native50),
        ("url", "output_url", native50),
        ("webp", "output_format=webp", webp50),
    ):
        figures.append(
            goal(
                section,
                f"sync, {label}: p50 (ratio to native)",
                p(series[mode], 50) / base,
                "x",
                "<= 1.05 x native",
                lambda v: v <= 1.05,
                f"{p(series[mode], 50):.1f} ms; app CPU {_ms(app_cpu[mode])}, client CPU {_ms(client_cpu[mode])} ms/job"
                + (f" (native + its own WebP: {webp50:.1f} ms)" if mode == "webp" else ""),
            )
        )
    native_rate, b64_rate = statistics.median(rates["native"]), statistics.median(rates["base64"])
    figures.append(info(section, "native, 4 in flight", native_rate, "jobs/s", _runs(rates["native"])))
    figures.append(
        goal(
            section,
            "sync base64, 4 in flight (ratio)",
            b64_rate / native_rate,
            "x",
            ">= 0.95 x native",
            lambda v: v >= 0.95,
            f"{b64_rate:.1f} jobs/s ({_runs(rates['base64'])})",
        )
    )
    for mode, (first, each, output) in memory.items():
        figures.append(
            goal(
                section,
                f"peak memory per job, {mode} (4 at once)",
                each / payload,
                "x payload",
                "<= 3 x payload",
                lambda v: v <= 3,
                f"{each / MiB:.1f} MiB above idle a job; a fresh process's first job {first / MiB:.1f} MiB "
                f"({first / payload:.1f} x); payload {payload / MiB:.2f} MiB; output {output / MiB:.2f} MiB",
            )
        )
    return figures


def _ms(seconds: list[float]) -> str:
    """The mean of CPU times in seconds, as milliseconds."""
    return f"{statistics.mean(seconds) * 1000:.1f}"


# The adapter's WebP and the native client's own, made alike: Pillow's default quality is 80, the
# adapter's (output_quality unset) 90, and the encoder at 90 takes ~10 % longer on W3's noise.
WEBP_QUALITY = 90
_WEBP_PARAMS = {"output_format": "webp", "output_quality": str(WEBP_QUALITY)}


def _to_webp(data: bytes) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        image.save(out, format="WEBP", quality=WEBP_QUALITY)
    return out.getvalue()


async def _peak_per_job(
    ctx: Context, mode: str, adapter_job: Callable[[str, str], Callable[[], Awaitable[list[bytes]]]], at_once: int = 4
) -> tuple[float, float, int]:
    """A fresh app's peak RSS above idle (bytes) for its first W3 job, and per job with `at_once`
    jobs at once after two warm-up jobs (once-only costs paid: imports, the allocator's growth to
    hold a job); and the output's size."""
    folders = {
        f"COMFYUI_{name.upper()}_DIR": str(Path(ctx.workdir) / "comfyui" / name) for name in ("input", "output", "temp")
    }
    env = {"FILE_LINK_SECRET": "bench-peak", **(folders if ctx.emulated else {})}
    app = procs.start_app(ctx.workdir / f"w3-{mode}", ctx.comfyui_url, **env)
    job = adapter_job(app.url, mode)
    try:
        await app.wait_ready(ctx.session, procs.HEALTH)
        for _ in range(3):
            await run_sync(ctx.session, app.url, ctx.job("bench/w3-warm/img"))
        await asyncio.sleep(0.2)
        idle = procs.rss_mib(app.pid)
        procs.reset_peak_rss(app.pid)
        (image,) = await job()
        first = procs.peak_rss_mib(app.pid) - idle
        await job()
        await asyncio.sleep(0.2)
        idle = procs.rss_mib(app.pid)
        procs.reset_peak_rss(app.pid)
        await asyncio.gather(*(job() for _ in range(at_once)))
        each = (procs.peak_rss_mib(app.pid) - idle) / at_once
    finally:
        app.stop()
    return first * MiB, each * MiB, len(image)
