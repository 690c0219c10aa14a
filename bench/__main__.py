"""`python -m bench [--quick] [--markdown PATH] [--salad PATH]`: benchmark the adapter, print figures
beside goals. (`python -m bench soak`: the Redis tier's soak, `bench/soak.py`.)

Against the ComfyUI emulator it starts itself (free ports, step_delay 0), or against the ComfyUI at
COMFYUI_URL when that is set (then the parts that need the emulator's hooks are skipped, named).
The adapter runs as deployed (`bootstrap`: uvicorn, no access log, LOG_LEVEL INFO), with its status
logs in a temporary folder. A full run takes about five minutes on two cores. With `--salad`,
Salad's comfyui-api (built from its repository: `bench/peers.py`) runs beside it on the same
ComfyUI, and W2 measures it too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from . import fleet_cost, floor, models, peers, procs, scheduling, suite
from .report import Figure, markdown_table, text_table

COMMAND = "python -m bench"


SECTIONS = (
    "startup",
    "overhead",
    "latency",
    "throughput",
    "memory",
    "oss",
    "w2",
    "w3",
    "fleet",
    "models",
    "scheduling",
)


async def run(
    quick: bool, only: frozenset[str] = frozenset(SECTIONS), salad: Path | None = None
) -> tuple[list[Figure], list[str], float]:
    started = time.monotonic()
    figures: list[Figure] = []
    external = os.environ.get("COMFYUI_URL", "").rstrip("/")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        emulator = None if external else procs.start_emulator(workdir / "comfyui", step_delay=0)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            app = None
            peer = None
            try:
                if emulator is not None:
                    await emulator.wait_ready(session, "/system_stats")
                comfyui_url = external or (emulator.url if emulator else "")
                if "startup" in only:
                    figures += await suite.startup(_bare(session, comfyui_url, workdir), runs=2 if quick else 3)
                # Co-located, as on FC: the adapter reads outputs from (and writes inputs to) the
                # emulator's folders. Against COMFYUI_URL, set COMFYUI_OUTPUT_DIR to do the same.
                folders = {} if emulator is None else colocated(workdir / "comfyui")
                app = procs.start_app(
                    workdir / "app", comfyui_url, FILE_LINK_SECRET="bench-" + os.urandom(8).hex(), **folders
                )
                await app.wait_ready(session, procs.HEALTH)
                pid = emulator.pid if emulator is not None else int(os.environ.get("COMFYUI_PID") or 0) or None
                ctx = suite.Context(session, comfyui_url, app, workdir, emulated=emulator is not None, comfyui_pid=pid)
                if salad is not None and "w2" in only:
                    peer = peers.start_salad(salad, comfyui_url, comfyui_root(workdir, emulator), workdir / "salad")
                    await peer.wait_ready(session, peers.SALAD_READY, timeout=60)
                    ctx.salad = peer
                # The bare adapters of the floors read ComfyUI's outputs where the adapter does.
                output_dir = folders.get("COMFYUI_OUTPUT_DIR") or os.environ.get("COMFYUI_OUTPUT_DIR", "")
                for _ in range(20):  # warm both paths (imports, connection pools, caches)
                    await suite.run_sync(session, app.url, ctx.job("bench/warm/img"))
                if "overhead" in only:
                    figures += await suite.overhead(ctx, jobs=50 if quick else 200)
                    figures += await floor.floors(session, workdir / "floor", jobs=50 if quick else 200)
                    figures += await floor.proxy_floors(
                        session, comfyui_url, output_dir, ctx.job, workdir / "floor", jobs=50 if quick else 200
                    )
                if "latency" in only:
                    figures += await suite.event_latency(ctx, jobs=1 if quick else 3)
                if "memory" in only:
                    figures += await suite.idle_rss(ctx, "the jobs above")
                if "throughput" in only:
                    figures += await suite.throughput(ctx, seconds=2.0 if quick else 4.0)
                    figures += await suite.throughput_long_jobs(ctx, jobs=12 if quick else 40)
                    figures += await suite.short_jobs(ctx, jobs=50 if quick else 200)
                if "w2" in only:
                    # The floor first: ComfyUI lists its input folder's top level at every LoadImage,
                    # which the native client's uploads below fill with thousands of files.
                    w2_floor = await floor.stream_floors(
                        session,
                        comfyui_url,
                        output_dir,
                        suite.w2_job(),
                        workdir / "floor",
                        suite.W2_SECTION,
                        jobs=50 if quick else 200,
                    )
                    figures += await suite.inputs_w2(ctx, jobs=50 if quick else 200, seconds=2.0 if quick else 4.0)
                    figures += w2_floor
                if "w3" in only:
                    figures += await suite.sizes_w3(ctx, jobs=5 if quick else 15, seconds=3.0 if quick else 6.0)
                if "memory" in only:
                    figures += await suite.idle_rss(ctx, "100 concurrent clients", target=False)
                    figures += await suite.open_streams_memory(ctx)
                    figures += await suite.base64_peak(ctx)
                if "oss" in only:
                    figures += await suite.oss_overlap(ctx)
                if "fleet" in only:
                    figures += await fleet_cost.fleet_cost(workdir / "fleet", quick)
                if "models" in only and emulator is not None:  # its own emulator (a models folder), app and file server
                    figures += await models.models(session, workdir / "models", quick)
                if "scheduling" in only and emulator is not None:  # the emulator's checkpoint loads matter
                    figures += await scheduling.affinity(quick)
                notes = ctx.notes
            finally:
                if peer is not None:
                    peer.stop()
                if app is not None:
                    app.stop()
                if emulator is not None:
                    emulator.stop()
    order = {name: index for index, name in enumerate(sorted({f.section for f in figures}))}
    figures.sort(key=lambda f: order[f.section])  # stable: keeps each section's own order
    return figures, notes, time.monotonic() - started


def colocated(root: Path) -> dict[str, str]:
    """The settings of an adapter sharing ComfyUI's disk (root: ComfyUI's folder): its output
    folder named, its `input` and `temp` folders found beside it."""
    return {"COMFYUI_OUTPUT_DIR": str(root / "output")}


def comfyui_root(workdir: Path, emulator: procs.Server | None) -> Path:
    """The folder holding ComfyUI's `input/` and `output/`: the emulator's, or, against
    COMFYUI_URL, the parent of COMFYUI_OUTPUT_DIR (a peer shares ComfyUI's disk)."""
    if emulator is not None:
        return workdir / "comfyui"
    output = os.environ.get("COMFYUI_OUTPUT_DIR")
    if not output:
        raise SystemExit("--salad against COMFYUI_URL needs COMFYUI_OUTPUT_DIR (ComfyUI's output folder)")
    return Path(output).parent


def _bare(session: aiohttp.ClientSession, comfyui_url: str, workdir: Path) -> suite.Context:
    """A context without an app of its own, for benchmarks that start their own."""
    return suite.Context(session, comfyui_url, None, workdir, emulated=False)  # type: ignore[arg-type]


def markdown(figures: list[Figure], notes: list[str], elapsed: float, load: str) -> str:
    target = os.environ.get("COMFYUI_URL") or "the ComfyUI emulator (`python -m comfyui_emulator`, step_delay 0)"
    lines = [
        "## Performance",
        "",
        f"Measured with `{COMMAND}` ({elapsed:.0f} s; `--quick` for a one-minute run) on {procs.machine()}.",
        f"The adapter, ComfyUI and the load generator share the machine (load average at start: {load}).",
        f"ComfyUI: {target}. The adapter runs as deployed (`bootstrap`: uvicorn with uvloop and httptools,",
        "no access log, `LOG_LEVEL=INFO`), its status logs on the local ext4 disk (fsync per append).",
        "Figures move by 10-30 % from run to run when other work shares the two cores.",
        "",
        markdown_table(figures),
        "",
        "How each figure is measured:",
        "- **Overhead**: the job is `EmptyImage 64x64 -> SaveImage` (a new colour each time, so ComfyUI",
        "  runs it rather than answering from its cache), one at a time, through ComfyUI's",
        "  own protocol (as `script_examples/websockets_api_example.py`: one websocket per client, then",
        "  `POST /prompt`, wait for `executing` with `node: null`, `GET /history/{id}`, `GET /view`) and",
        "  through `POST /api/serverless/run?output_base64=true` (sync), `&stream=true` (SSE) or",
        "  `/api/serverless/ws` (one websocket per job, as the documented clients do); all end holding",
        "  the PNG bytes. The kinds take turns in runs of 5 jobs, the first of each run unmeasured (it",
        "  pays what the job before it left behind: a websocket's close ends after its client has its",
        "  answer, a job's status log is written after its answer), so each kind is measured after its",
        "  own kind; the app's CPU per job by kind from /proc. The floor under the stream goals: the same",
        "  clients against a bare Starlette app under uvicorn (`bench/floor_app.py`, canned bytes: a JSON",
        "  answer, the 20 events of a job as SSE, or a websocket per job with 20 messages). The floors",
        "  under the sync and ComfyUI's API goals: the same jobs through a bare adapter on the same stack",
        "  (`bench/floor_proxy.py`, no job, log or check): a sync `POST` that queues the prompt, waits on",
        "  one shared websocket and reads the outputs from ComfyUI's folder; ComfyUI's example client",
        "  through a pass-through proxy of `/prompt`, `/ws`, `/history` and `/view`; each against the",
        "  example client talking to ComfyUI directly, in runs as above. The adapter",
        "  runs co-located, as on FC: `COMFYUI_OUTPUT_DIR` names ComfyUI's",
        "  output folder, its `input` and `temp` beside it (against `COMFYUI_URL`, set it to do the same).",
        "- **Throughput**: N clients each looping that job for a fixed window after a warm-up; jobs/s",
        "  between the first and the last completion in the window, and the ratio to N native clients;",
        "  the app's CPU time per job from /proc. ComfyUI runs one prompt at a time, so more clients",
        "  mostly add queueing.",
        "- **Event latency**: the emulator stamps every websocket text with `time.monotonic()` just before",
        "  writing it (`GET /emulator/sent?client_id=&times=1`); the SSE client stamps each `data:` line",
        "  as it reads it (the same system-wide CLOCK_MONOTONIC). KSampler steps 10 ms apart, so events",
        "  do not queue behind each other. The native-client row is the floor (ComfyUI to a Python",
        "  client directly).",
        "- **Memory**: VmRSS of the app process. Open streams: SSE jobs queued behind a long one, all",
        "  holding a connection. Base64: a fresh app, warmed by 3 small jobs, then one job whose PNG is",
        "  ~20 MB of noise; peak is VmHWM after resetting it (`clear_refs`).",
        "- **Inputs (W2)**: a fresh 16x16 PNG per job through `LoadImage -> ImageInvert -> SaveImage`.",
        "  The native client uploads it (`POST /upload/image`, as ComfyUI's frontend does), then runs the",
        "  prompt as above; the adapter gets it as base64 in the workflow (`LoadImage`'s `image`). Latency",
        "  one job at a time, the four in rotating order; then 8 jobs in flight, native and sync windows",
        "  alternating three times (medians). Inputs land in ComfyUI's `input/serverless/`: ComfyUI",
        "  lists its input folder's top level at every `LoadImage` it validates or runs.",
        "- **Sizes (W3)**: a ~1 MB PNG of noise in, `LoadImage -> ImageScale 1024x1024 -> ImageAddNoise",
        "  -> SaveImage`, a ~3 MB PNG out. Native: upload, prompt, `/history`, `/view`. The adapter: base64",
        "  in; out as base64, as a link (`output_url=true`, then fetched) or as WebP (`output_format=webp`;",
        "  the native client then converts the PNG with Pillow itself, so both end holding WebP bytes).",
        "  The adapter's client sends and reads JSON with Python's `json` and codes base64 with pybase64,",
        "  as the project's client does (`serverless.client`); each client's own CPU per job is beside",
        "  the app's.",
        "  Peak memory: a fresh adapter per mode, its first job alone (what a new process pays once too:",
        "  imports, the allocator's first growth), and per job with four at once after two warm-up jobs",
        "  of the mode (VmHWM reset; peak above idle / 4): each over the job's payload (input + output",
        "  PNG bytes).",
        "- **Fleet cost** (`bench/fleet_cost.py`, alone: `python -m bench.fleet_cost`): a `redis-server`,",
        "  two emulators, one box and a fleet (a gateway, one then two workers) on loopback; sync JSON",
        "  jobs. Added latency: the 64x64 job alternately through the box and gateway + worker, one at",
        "  a time. One worker: 4 ms jobs, 10 clients looping, against the box, with each path's CPU",
        "  and the Redis commands a fleet job costs (`INFO commandstats`, a script's own counted). N",
        "  workers: 0.5 s jobs, 2N clients, against N times the box's rate with 2 clients.",
        "- **Models**: a cached model reference (a URL the store holds) against the file name, jobs",
        "  alternating (difference of medians); an import's own `download_s` against `curl -o` of the",
        "  same loopback file (`python -m http.server`). Details: `bench/models.py`.",
        "- **Start-up**: from spawning `bootstrap` to the first 200 from `/api/serverless/health`, polled",
        "  every 5 ms, ComfyUI already up. (A real ComfyUI itself takes ~6 s to start on a 2-core CPU",
        "  machine: `tests/fixtures/traces/timings.json`.)",
        "- **Fleet scheduling**: a gateway and two workers (`bench/scheduling.py`), each emulator paying a",
        "  1 s checkpoint load when a job's checkpoint is not the one it holds; two clients post a seeded",
        "  random mix of two workflows with different checkpoints, first-free (`AFFINITY_WAIT=0`), then",
        "  with affinity (`AFFINITY_WAIT=3`).",
        "",
        "What the adapter does per job (so what the figures cost): the HTTP hop; `POST /prompt` on the",
        "instance's one websocket client id (no socket per job); ComfyUI's messages routed by prompt id;",
        "outputs named by its `executed` messages (`/history` is read only after a broken socket) and",
        "read from its output folder (`/view` when the folder is not ours); a sync job's status log",
        "claimed, written and published with its first append (one trip to a worker thread), a stream's",
        "claimed beside the run (awaited before answering only when the caller named the task; then it",
        "is claimed first). ComfyUI's `status` broadcasts (one per queue change, to every client) go to",
        "the jobs someone may watch, not to a sync job nobody named; every job asks its place in the",
        "queue every 0.25 s while it waits.",
    ]
    if notes:
        lines += ["", "Notes from this run:", *(f"- {note}" for note in notes)]
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["soak"]:  # `python -m bench soak`: the Redis tier under load and faults
        from . import soak

        raise SystemExit(soak.main(sys.argv[2:]))
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer jobs and shorter windows (~1 min)")
    parser.add_argument("--markdown", type=Path, help="also write the results as a README section here")
    parser.add_argument(
        "--only", action="append", choices=SECTIONS, help="run only this part (repeatable; default: all)"
    )
    parser.add_argument(
        "--salad",
        type=Path,
        metavar="PATH",
        help="Salad's comfyui-api, built (its dist/src/index.js): measured beside the adapter in W2",
    )
    args = parser.parse_args()
    if args.salad is not None and not args.salad.is_file():
        parser.error(f"--salad: no file {args.salad} (see bench/peers.py for how to build it)")
    try:
        import uvloop
    except ImportError:
        uvloop = None
    load = procs.load_average()
    runner = uvloop.run if uvloop is not None else asyncio.run
    figures, notes, elapsed = runner(run(args.quick, frozenset(args.only or SECTIONS), args.salad))
    print(f"{COMMAND}: {procs.machine()}; load average at start {load}; {elapsed:.0f} s")
    print(text_table(figures))
    for note in notes:
        print(f"note: {note}")
    if args.markdown:
        args.markdown.write_text(markdown(figures, notes, elapsed, load))
        print(f"wrote {args.markdown}", file=sys.stderr)


if __name__ == "__main__":
    main()
