"""Do a job's OSS uploads overlap? `python -m bench.oss_overlap` prints the figures.

The emulator, the app (under uvicorn) and a local OSS server (tests/oss_server.py) whose every PUT
is held `PUT_DELAY` seconds, as over a slow link to OSS. A job saves N images (EmptyImage batch N
-> SaveImage) with `?output_oss=true`; the figure is the app's own `data.timings.outputs_s` (from
ComfyUI's end of the job to the response ready), beside N x one upload (what uploads one after
the other would take, for contrast). Uploads that overlap (8 at a time, `delivery.outputs.CONCURRENCY`)
keep it near one upload whatever N.

A last job saves an image early, then samples for longer than an upload takes: its early upload
is done before ComfyUI ends, so outputs_s is one upload (the late image's), not two.

Figures depend on the machine and on what else runs on it; never part of the test suite.
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import requests

from tests.helpers import txt2img
from tests.oss_server import LocalOss
from tests.servers import App, Emulator

PUT_DELAY = 0.4
COUNTS = (1, 2, 4, 8)
REPEATS = 3
KEY_ID, SECRET = "LTAI-bench", "bench-secret"
RUN = "/api/serverless/run"
_variants = itertools.count(1)


class SlowOss(LocalOss):
    """LocalOss whose PUTs each take `put_delay` seconds more (its server runs a thread per request,
    so concurrent PUTs wait side by side)."""

    def __init__(self, bucket: str, put_delay: float) -> None:
        self.put_delay = put_delay
        super().__init__({KEY_ID: (SECRET, None)}, [bucket])

    def _handle(self, request: Any, body: bytes) -> Any:
        if request.method == "PUT":
            time.sleep(self.put_delay)
        return super()._handle(request, body)


def batch_workflow(count: int, prefix: str, variant: int = 0) -> dict[str, Any]:
    """N images; a new `variant` makes a new job (ComfyUI would answer the same one from its cache)."""
    return {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": count, "color": variant}},
        "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": prefix}},
    }


def early_and_late_workflow(steps: int, variant: int = 0) -> dict[str, Any]:
    """An image saved at once (nodes 1, 2), then the FC doc's text-to-image job (its image: node 9)."""
    return {**txt2img(seed=variant, steps=steps, prefix="late", size=32), **batch_workflow(1, "early", variant)}


def timed_run(app: App, workflow: dict[str, Any], outputs: int) -> tuple[float, float]:
    """(outputs_s, wall seconds) of one job with output_oss; raises unless every output was uploaded."""
    started = time.monotonic()
    response = requests.post(app.url + RUN, params={"output_oss": "true"}, data=json.dumps(workflow), timeout=120)
    wall = time.monotonic() - started
    if response.status_code != 200:
        raise RuntimeError(f"run failed: {response.status_code} {response.text[:500]}")
    data = response.json()["data"]
    uploaded = [r for r in data["results"] if r["output"]["oss"]["object"]]
    if len(uploaded) != outputs:
        raise RuntimeError(f"expected {outputs} uploaded outputs, got {len(uploaded)}")
    return float(data["timings"]["outputs_s"]), wall


def median_run(app: App, workflow: Callable[[int], dict[str, Any]], outputs: int) -> tuple[float, float]:
    """Median (outputs_s, wall seconds) of REPEATS jobs, `workflow(variant)` each a new one."""
    runs = [timed_run(app, workflow(next(_variants)), outputs) for _ in range(REPEATS)]
    return statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)


def run() -> dict[str, float]:
    """Every figure, by name: `put_delay_s`; per N, `n{N}_outputs_s`, `n{N}_wall_s` and `n{N}_sum_s`
    (N x the one-output outputs_s); `early_output_outputs_s` and `early_output_sum_s`."""
    figures: dict[str, float] = {"put_delay_s": PUT_DELAY}
    bucket = f"bench-{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory(prefix="oss-overlap-") as tmp, SlowOss(bucket, PUT_DELAY) as oss:
        root = Path(tmp)
        emulator = Emulator(root / "emulator")
        apps: list[App] = []
        try:
            env = {
                "COMFYUI_URL": emulator.url,
                "STATUS_DIR": str(root / "status"),
                "FC_INSTANCE_ID": "bench",
                "OSS_BUCKET_DOMAIN": f"{bucket}.oss-cn-hangzhou.aliyuncs.com",
                "OSS_ENDPOINT": oss.endpoint,
                "OSS_SIGN_ENDPOINT": oss.endpoint,
                "OSS_EXPIRES_IN_SECOND": "3600",
                "ALIBABA_CLOUD_ACCESS_KEY_ID": KEY_ID,
                "ALIBABA_CLOUD_ACCESS_KEY_SECRET": SECRET,
                "ALIBABA_CLOUD_SECURITY_TOKEN": "",
                "LOG_LEVEL": "WARNING",
            }
            concurrent = App(root, env)
            apps.append(concurrent)
            timed_run(concurrent, batch_workflow(1, "warm", next(_variants)), 1)  # connections, imports
            single = 0.0
            for count in COUNTS:
                outputs_s, wall = median_run(concurrent, partial(batch_workflow, count, f"n{count}"), count)
                single = single or outputs_s
                figures[f"n{count}_outputs_s"] = outputs_s
                figures[f"n{count}_wall_s"] = wall
                figures[f"n{count}_sum_s"] = count * single
            steps = 10  # 10 x 0.1 s of sampling: longer than one upload
            requests.post(emulator.url + "/emulator/config", json={"step_delay": 2.5 * PUT_DELAY / steps}, timeout=10)
            figures["early_output_outputs_s"] = median_run(concurrent, partial(early_and_late_workflow, steps), 2)[0]
            figures["early_output_sum_s"] = 2 * single
        finally:
            for app in apps:
                app.stop()
            emulator.stop()
    return figures


def table(figures: dict[str, float]) -> str:
    lines = [
        f"OSS uploads of one job, each PUT held {figures['put_delay_s']:.2f} s by the local OSS "
        f"(median of {REPEATS} jobs)",
        "",
        f"{'outputs':>7}  {'outputs_s':>9}  {'wall_s':>7}  {'N x one upload':>14}",
    ]
    for count in COUNTS:
        lines.append(
            f"{count:>7}  {figures[f'n{count}_outputs_s']:>9.3f}  {figures[f'n{count}_wall_s']:>7.3f}  "
            f"{figures[f'n{count}_sum_s']:>14.3f}"
        )
    lines += [
        "",
        "An early output uploaded while the job still runs (2 outputs):",
        f"  outputs_s {figures['early_output_outputs_s']:.3f}  (2 x one upload: {figures['early_output_sum_s']:.3f})",
    ]
    return "\n".join(lines)


def main() -> None:
    print(table(run()))


if __name__ == "__main__":
    main()
