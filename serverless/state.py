"""The application's state, typed: what the lifespan opens and every endpoint reads through
`app_state(request)` (never `request.app.state.<name>`, which is `Any` to the type checker)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection
from starlette.types import ASGIApp

if TYPE_CHECKING:
    from .batches.feeder import Feeders
    from .comfyapi.index import PromptIndex
    from .fleet.worker import Consumer
    from .jobs.runner import JobRunner
    from .lifecycle import Prewarm, QueueWatch
    from .resources import Resources
    from .tenants.endpoints import UsageGauges
    from .tenants.keys import ApiKeys


@dataclass(slots=True)
class AppState:
    """One app's long-lived parts: its resources, the job runner its transports start jobs with
    (this instance's `Jobs`, or a gateway's `RemoteJobs`), and this instance's queue consumer
    when it takes jobs from a Redis queue."""

    resources: Resources
    jobs: JobRunner
    prewarm: Prewarm
    queue_watch: QueueWatch
    consumer: Consumer | None = None
    genstudio_token_secret: bytes | None = field(default=None, repr=False)  # made once when unset
    prompts: PromptIndex | None = None  # ComfyUI's API: its prompts, made on first use (`comfyapi.index`)
    batches: Feeders | None = None  # batches: their store, and the feeders of this instance (`batches`)
    keys: ApiKeys | None = None  # the API keys the app accepts (their labels name usage and metrics)
    usage_gauges: UsageGauges | None = None  # usage per key as metrics, made on the first scrape


def app_state(connection: HTTPConnection) -> AppState:
    """The state of the app serving `connection` (a request or a websocket)."""
    return of_app(connection.app)


def of_app(app: ASGIApp) -> AppState:
    state: AppState = app.state.serverless  # type: ignore[attr-defined]
    return state


def started(app: ASGIApp) -> AppState | None:
    """The app's state once its lifespan has started it, else None."""
    state: AppState | None = getattr(app.state, "serverless", None)  # type: ignore[attr-defined]
    return state
