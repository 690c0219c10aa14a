"""GET /metrics (Prometheus text format) and GET /api/serverless/ready (for load balancers).

Ready and health answer different questions: health says the instance is alive (ComfyUI answers,
the status folder can be written), ready says it should be sent work now: ComfyUI answers, the
instance is not draining, and a new job would be admitted (fewer than 1 + MAX_PENDING_JOBS jobs).
"""

from __future__ import annotations

import hmac
import logging

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..auth import sole_authorization
from ..errors import Unauthorized
from ..jobs.runner import JobRunner
from ..resources import Resources
from ..state import app_state
from ..tenants.endpoints import UsageGauges

log = logging.getLogger(__name__)


def check_metrics_token(request: Request, token: str) -> None:
    """With METRICS_TOKEN set, only `Authorization: Bearer <token>` may read the metrics."""
    if not token:
        return
    given = sole_authorization(request.headers.getlist("authorization"))
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise Unauthorized("GET /metrics needs Authorization: Bearer <METRICS_TOKEN>")


async def metrics(request: Request) -> Response:
    """GET /metrics: every metric of this app, in Prometheus' text format."""
    state = app_state(request)
    resources = state.resources
    check_metrics_token(request, resources.settings.security.metrics_token)
    await state.jobs.measure()
    await UsageGauges.measure_app(state)
    if resources.supervisor is not None:  # it watches its child: its word is the freshest
        resources.metrics.comfyui_up.set(1 if resources.supervisor.ready else 0)
    return Response(generate_latest(resources.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def ready(request: Request) -> Response:
    """GET /api/serverless/ready: 200 when this instance should be sent work, else 503 and why."""
    state = app_state(request)
    reason = await _not_ready_because(state.resources, state.jobs)
    body = state.jobs.limits()
    if reason is not None:
        return JSONResponse({"status": "unavailable", "reason": reason, **body}, 503)
    return JSONResponse({"status": "ready", **body})


async def _not_ready_because(resources: Resources, jobs: JobRunner) -> str | None:
    refusal = await jobs.refusal()
    if refusal is not None:
        return refusal
    if resources.settings.fleet.role == "gateway":  # no ComfyUI of its own; what it shares is not its readiness
        return None
    if resources.supervisor is not None and not resources.supervisor.ready:
        resources.metrics.comfyui_up.set(0)
        return resources.supervisor.problem
    up = await resources.comfy.answers()
    resources.metrics.comfyui_up.set(1 if up else 0)
    return None if up else "ComfyUI does not answer"
