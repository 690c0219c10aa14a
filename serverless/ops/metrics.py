"""Prometheus metrics of one app: what an operator alerts on, recorded where it happens.

One `Metrics` per app, created by the lifespan with its own `CollectorRegistry` (never the
process-global one: several apps may share a process, as in the tests) and handed to what
records: the jobs registry, the transports, the status log, the input fetchers, the OSS uploads,
the webhook sender and the ComfyUI supervisor, each through a method or a small callable. Every
label has a bounded set of values (transports, error codes, a fixed list of refusal reasons): no
task ids, no URLs, so the number of series does not grow with the number of jobs.

Recording is a few dictionary look-ups and a lock per call; a job makes about ten of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ..errors import DownloadError, InputError, ServerlessError

PREFIX = "serverless"
Transport = Literal["sync", "sse", "ws", "async"]
Reader = Literal["sse", "ws"]
InputSource = Literal["url", "oss", "s3"]
TRANSPORTS: tuple[Transport, ...] = ("sync", "sse", "ws", "async")
READERS: tuple[Reader, ...] = ("sse", "ws")
PHASES = ("queued", "execution", "outputs", "total")
# From a few ms (the emulator) to JOB_TIMEOUT's default of 30 min.
JOB_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, float("inf"))
APPEND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10, float("inf"))

# Why an input fetch was refused, from the words of `DownloadError.reason` (see
# `serverless.inputs.download`) or of a bucket's `read` (OSS or S3) InputError; first match wins, else "other".
DOWNLOAD_REASONS: tuple[tuple[str, str], ...] = (
    ("unsupported URL scheme", "scheme"),
    ("blocked address", "blocked_address"),  # an IP literal, or a host resolving to one
    ("unsupported Content-Encoding", "encoding"),
    ("larger than", "too_large"),
    ("timed out", "timeout"),
    ("too many redirects", "redirects"),
    ("cannot resolve host", "dns"),
    ("TLS", "tls"),
    ("HTTP ", "http_status"),
    ("invalid", "invalid_url"),
    ("URL has no host", "invalid_url"),
    ("cannot connect", "connection"),
    ("server disconnected", "connection"),
    ("response body broken off", "connection"),
    ("request failed", "connection"),
)
OSS_READ_REASONS: tuple[tuple[str, str], ...] = (
    ("too large", "too_large"),
    ("not found", "not_found"),
    ("access denied", "denied"),
    ("invalid OSS URL", "invalid_url"),
    ("invalid S3 URL", "invalid_url"),
    ("is not readable by this instance", "denied"),
    ("not an Alibaba Cloud OSS endpoint", "invalid_url"),
    ("could not be read", "oss_error"),
)
REASONS = ("other", *sorted({reason for _, reason in DOWNLOAD_REASONS + OSS_READ_REASONS}))


def transport_of(mode: str) -> Transport:
    """A job's `JobSpec.mode` as the transport label (`stream` is SSE)."""
    return "sse" if mode == "stream" else mode  # type: ignore[return-value]


def refusal_reason(exc: ServerlessError, source: InputSource) -> str:
    """One of `REASONS` for a failed input fetch: a bounded label, never the message itself."""
    text = exc.reason if isinstance(exc, DownloadError) else exc.message
    table = DOWNLOAD_REASONS if source == "url" else OSS_READ_REASONS
    return next((reason for marker, reason in table if marker in text), "other")


class Metrics:
    """Every metric of one app, in its own registry (`registry`, rendered by `GET /metrics`)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, labels, registry=registry)

        self.jobs_started = counter("jobs_started", "Jobs started, by transport.", ("transport",))
        self.jobs_ended = counter(
            "jobs_ended", "Jobs ended, by transport and outcome (ok or the error code).", ("transport", "outcome")
        )
        self.jobs_refused_busy = counter("jobs_refused_busy", "Jobs refused with BUSY (MAX_PENDING_JOBS reached).")
        self.prompt_refusals = counter("prompt_refusals", "Prompts ComfyUI refused (/prompt 400, PROMPT_ERROR).")
        self.phases = {
            phase: Histogram(
                f"{PREFIX}_job_{phase}_seconds",
                f"{phase}_s of successful jobs (data.timings).",
                buckets=JOB_BUCKETS,
                registry=registry,
            )
            for phase in PHASES
        }
        self.jobs_in_flight = Gauge(
            f"{PREFIX}_jobs_in_flight", "Jobs admitted and not ended (running or waiting).", registry=registry
        )
        self.comfyui_up = Gauge(
            f"{PREFIX}_comfyui_up", "1 when ComfyUI answered the last check, else 0.", registry=registry
        )
        self.input_downloads = counter("input_downloads", "Loader inputs fetched, by source.", ("source",))
        self.input_bytes = counter("input_download_bytes", "Bytes of loader inputs fetched, by source.", ("source",))
        self.input_refusals = counter(
            "input_refusals", "Loader inputs refused or failed, by source and reason.", ("source", "reason")
        )
        self.oss_uploads = counter("oss_uploads", "Outputs uploaded to OSS.")
        self.oss_upload_bytes = counter("oss_upload_bytes", "Bytes of outputs uploaded to OSS.")
        self.oss_upload_failures = counter("oss_upload_failures", "OSS uploads that failed after their retries.")
        self.oss_retries = counter("oss_retries", "OSS calls (uploads and reads) retried after a transient error.")
        self.readers = Gauge(
            f"{PREFIX}_stream_readers", "Open SSE and websocket readers.", ("transport",), registry=registry
        )
        self.readers_dropped = counter(
            "stream_readers_dropped", "SSE and websocket readers dropped for being slow.", ("transport",)
        )
        self.status_append = Histogram(
            f"{PREFIX}_status_append_seconds",
            "Durable appends to the status log.",
            buckets=APPEND_BUCKETS,
            registry=registry,
        )
        self.webhook_deliveries = counter("webhook_deliveries", "Webhook deliveries, by outcome.", ("outcome",))
        self.queue_waiting = Gauge(
            f"{PREFIX}_queue_waiting",
            "A fleet's jobs waiting for a worker, by priority (read from Redis at each scrape of a gateway).",
            ("priority",),
            registry=registry,
        )
        self.queue_taken = Gauge(
            f"{PREFIX}_queue_taken",
            "A fleet's jobs taken by a worker and not finished, by priority (a dead worker's stay until claimed).",
            ("priority",),
            registry=registry,
        )
        self.queue_consumers = Gauge(
            f"{PREFIX}_queue_consumers",
            "Workers known to the queue's consumer group (dead ones too).",
            registry=registry,
        )
        self.queue_dead_letters = counter(
            "queue_dead_letters", "Queue entries no worker could read, moved to the dead-letter stream dead:jobs."
        )
        # Fleet scheduling (`serverless.fleet.heartbeat`, `serverless.fleet.healing`): a worker's own.
        self.model_switches = counter(
            "model_switches", "Jobs whose models this worker's ComfyUI did not hold (it loaded them)."
        )
        self.model_residency_hits = counter(
            "model_residency_hits", "Jobs whose models this worker's ComfyUI held already (no load)."
        )
        self.comfyui_frees = counter("comfyui_frees", "Times this worker asked its ComfyUI to free memory (/free).")
        self.comfyui_memory_restarts = counter(
            "comfyui_memory_restarts",
            "Times this worker restarted its ComfyUI between jobs, its memory past COMFYUI_RSS_MAX.",
        )
        self.comfyui_ooms = counter("comfyui_ooms", "Jobs that ran out of GPU memory (OUT_OF_MEMORY).")
        for transport in TRANSPORTS:  # every series that alerts read exists from the start, at 0
            self.jobs_started.labels(transport)
        for reader in READERS:
            self.readers.labels(reader)
            self.readers_dropped.labels(reader)
        self.comfyui_up.set(0)

    # -- jobs ----------------------------------------------------------------------------------

    def job_started(self, mode: str) -> None:
        self.jobs_started.labels(transport_of(mode)).inc()

    def job_ended(self, mode: str, error: ServerlessError | None, timings: dict[str, float]) -> None:
        """A job's terminal outcome; the phase histograms take successful jobs only (a failed
        job's phases say how far it got, not how long work takes)."""
        self.jobs_ended.labels(transport_of(mode), error.code if error is not None else "ok").inc()
        if error is None:
            for phase, histogram in self.phases.items():
                histogram.observe(timings.get(f"{phase}_s", 0.0))
        elif error.code == "PROMPT_ERROR":
            self.prompt_refusals.inc()

    def queue_read(self, priority: str, waiting: int, taken: int) -> None:
        """One reading of a fleet queue's stream (a gateway's scrape)."""
        self.queue_waiting.labels(priority).set(waiting)
        self.queue_taken.labels(priority).set(taken)

    def count_jobs(self, admitted: Callable[[], int]) -> None:
        """Read the jobs in flight from `admitted` at each scrape."""
        self.jobs_in_flight.set_function(lambda: float(admitted()))

    def watch_comfyui_restarts(self, generation: Callable[[], int]) -> None:
        """Count ComfyUI restarts from the supervisor's generation, read at each scrape."""
        self.registry.register(_Restarts(generation))

    # -- inputs and outputs --------------------------------------------------------------------

    def metered_fetch(
        self, fetch: Callable[[str], Awaitable[bytes]], source: InputSource
    ) -> Callable[[str], Awaitable[bytes]]:
        """`fetch` (a URL or oss:// reader), counting what it brings and why it refuses."""

        async def fetched(url: str) -> bytes:
            try:
                body = await fetch(url)
            except InputError as exc:
                self.input_refusals.labels(source, refusal_reason(exc, source)).inc()
                raise
            self.input_downloads.labels(source).inc()
            self.input_bytes.labels(source).inc(len(body))
            return body

        return fetched

    def oss_uploaded(self, size: int) -> None:
        self.oss_uploads.inc()
        self.oss_upload_bytes.inc(size)

    def oss_retried(self) -> None:
        self.oss_retries.inc()

    def status_appended(self, seconds: float) -> None:
        self.status_append.observe(seconds)

    def webhook_delivered(self, ok: bool) -> None:
        """One webhook delivery's outcome (`Webhooks` reports each, after its last attempt)."""
        self.webhook_deliveries.labels("ok" if ok else "failed").inc()

    # -- readers -------------------------------------------------------------------------------

    def reader(self, transport: Reader) -> ReaderMeter:
        return ReaderMeter(self, transport)


class ReaderMeter:
    """One SSE or websocket reader: open while in `with`, `dropped()` when it was too slow.
    Without `metrics` it counts nothing (a renderer built outside the app)."""

    __slots__ = ("metrics", "transport")

    def __init__(self, metrics: Metrics | None, transport: Reader) -> None:
        self.metrics = metrics
        self.transport = transport

    def __enter__(self) -> ReaderMeter:
        if self.metrics is not None:
            self.metrics.readers.labels(self.transport).inc()
        return self

    def __exit__(self, *_: object) -> None:
        if self.metrics is not None:
            self.metrics.readers.labels(self.transport).dec()

    def dropped(self) -> None:
        if self.metrics is not None:
            self.metrics.readers_dropped.labels(self.transport).inc()


class _Restarts(Collector):
    """ComfyUI restarts: the supervisor's generation (bumped each time its child dies)."""

    def __init__(self, generation: Callable[[], int]) -> None:
        self.generation = generation

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            f"{PREFIX}_comfyui_restarts", "ComfyUI processes that died and were restarted.", value=self.generation()
        )
