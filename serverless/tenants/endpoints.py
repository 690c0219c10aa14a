"""GET /api/usage?since=&key=: a key's usage (its own; any key's, or every key's with `key=*`, for
an admin key), and the same figures as metrics labelled by key label (never by key)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import auth
from ..errors import InvalidParams, NotFound
from ..state import AppState, app_state
from .usage import ANONYMOUS, FIELDS

ALL = "*"


def parse_since(raw: str | None) -> float:
    """`since`: Unix seconds or an ISO 8601 time (UTC unless it says); none: as far back as kept."""
    if not raw:
        return 0.0
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidParams("since must be Unix seconds or an ISO 8601 time", raw={"since": raw[:64]}) from None
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def known_labels(state: AppState) -> dict[str, str]:
    """Owner id -> label of every key the app accepts, and `anonymous` for jobs made without keys."""
    labels = state.keys.labels() if state.keys is not None else {}
    return {**labels, ANONYMOUS: "anonymous"}


async def usage(request: Request) -> Response:
    """GET /api/usage: `{"since", "keys": [{"key", "jobs": {...}, "gpu_seconds", "bytes_out",
    "models_downloaded"}]}`; the figures are kept by the hour (`since` counts from its hour)."""
    state = app_state(request)
    who = auth.caller(request)
    since = parse_since(request.query_params.get("since"))
    asked = request.query_params.get("key")
    labels = known_labels(state)
    own = who.owner or ANONYMOUS
    if asked is None or asked == labels.get(own):
        owners = [own]
    else:
        auth.require_admin(who, "read the usage of other keys")
        owners = [owner for owner, label in labels.items() if asked in (ALL, label)]
        if not owners:
            raise NotFound(f"no API key labelled {asked[:64]!r}", raw={"key": asked[:64]})
    found = await state.resources.tenants.usage.read(owners, since)
    body = {
        "since": datetime.fromtimestamp(since, UTC).isoformat().replace("+00:00", "Z"),
        "keys": [_shown(labels.get(owner, owner), found[owner]) for owner in owners],
    }
    return JSONResponse(body)


def _shown(label: str, totals: dict[str, float]) -> dict[str, Any]:
    jobs = {name.removeprefix("jobs_"): int(totals[name]) for name in FIELDS if name.startswith("jobs_")}
    return {
        "key": label,
        "jobs": jobs,
        "gpu_seconds": round(totals["gpu_seconds"], 3),
        "bytes_out": int(totals["bytes_out"]),
        "models_downloaded": int(totals["models_downloaded"]),
    }


class UsageGauges:
    """Each key's usage as metrics (`serverless_key_*`, label `key`: the key's label), read from
    the usage store at each scrape: every gateway of a fleet shows the fleet's figures."""

    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("key",)) -> Gauge:
            return Gauge(f"serverless_key_{name}", doc, labels, registry=registry)

        self.jobs = gauge("jobs", "Jobs of an API key (by its label), by state.", ("key", "state"))
        self.gpu = gauge("gpu_seconds", "ComfyUI execution seconds of an API key's jobs.")
        self.bytes_out = gauge("bytes_out", "Bytes of the results sent for an API key's jobs.")
        self.models = gauge("models_downloaded", "Models downloaded for an API key's jobs.")

    @classmethod
    async def measure_app(cls, state: AppState) -> None:
        """The gauges of the app (made on its first scrape), read now."""
        if state.usage_gauges is None:
            state.usage_gauges = cls(state.resources.metrics.registry)
        await state.usage_gauges.measure(state)

    async def measure(self, state: AppState) -> None:
        labels = known_labels(state)
        found = await state.resources.tenants.usage.read(labels, 0.0)
        for owner, totals in found.items():
            label = labels[owner]
            for name in FIELDS:
                if name.startswith("jobs_"):
                    self.jobs.labels(label, name.removeprefix("jobs_")).set(totals[name])
            self.gpu.labels(label).set(totals["gpu_seconds"])
            self.bytes_out.labels(label).set(totals["bytes_out"])
            self.models.labels(label).set(totals["models_downloaded"])
