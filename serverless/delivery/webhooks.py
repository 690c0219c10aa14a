"""Webhooks: a job's terminal payload POSTed to the caller's `callback_url` once the job ended.

    POST <callback_url>
    Content-Type: application/json
    X-Serverless-Task-Id: <task id>
    X-Serverless-Timestamp: <Unix seconds>
    X-Serverless-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" with WEBHOOK_SECRET>

The URL is chosen by the caller, so it goes through the input downloads' SSRF guard (a guarded
resolver and connector, `serverless.inputs.download`) with its own allow-list
(WEBHOOK_ALLOWED_HOSTS): checked when the request arrives (`check`, INVALID_PARAMS) and again on
every attempt. Up to ATTEMPTS attempts, with backoff, on connection errors and 5xx; none after a
4xx or a refused address; all of it bounded by TIMEOUT. Redirects are not followed. The
URL is never logged: only its host. Each delivery is a task `Webhooks` owns and drains on stop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from yarl import URL

from ..errors import DownloadError, InvalidParams
from ..inputs.download import DownloadPolicy, check_url

log = logging.getLogger(__name__)

ATTEMPTS = 3
TIMEOUT = 30.0  # seconds one delivery may take, all attempts included
BACKOFF = 0.5  # seconds before the second attempt, doubled before each next one
RESOLVE_TIMEOUT = 5.0
# What a refusal of a private address says, as input refusals name the setting that lifts them.
ALLOW_HINT = " (a private host may be allowed with WEBHOOK_ALLOWED_HOSTS)"
# Writes a task's delivery record (JSON bytes) beside its status log.
Recorder = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Delivery:
    """How a delivery went: the receiver's last HTTP status (None: no answer), attempts made."""

    url_host: str
    status: int | None
    attempts: int
    delivered: bool
    error: str | None = None
    at: float = 0.0

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)


def signature(secret: str, timestamp: str, body: bytes) -> str:
    """The `X-Serverless-Signature` value: `sha256=` and the hex HMAC of `timestamp.body`."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


Poster = Callable[[URL, bytes, Mapping[str, str]], Awaitable[int]]
"""POSTs a body, answers the status (`serverless.inputs.download.post` on the guarded session)."""


class Webhooks:
    """Delivers terminal payloads; owns each delivery's task until it ends or the app stops."""

    def __init__(
        self,
        post: Poster,
        policy: DownloadPolicy,
        secret: str,
        timeout: float,
        record: Recorder,
        counted: Callable[[bool], None] = lambda delivered: None,
    ) -> None:
        self._post_through = post  # through the guarded session: every address checked again
        self._policy = policy
        self._secret = secret
        self._timeout = timeout
        self._record = record
        self._counted = counted  # a delivery's outcome, for the metrics
        self._tasks: dict[object, asyncio.Task[Delivery | None]] = {}

    async def check(self, url: str) -> str:
        """`url` if a webhook may be sent there, else InvalidParams (never quoting the URL)."""
        try:
            target = URL(url)
            check_url(target, self._policy)
        except (ValueError, TypeError):
            raise InvalidParams("callback_url is not a valid URL") from None
        except DownloadError as exc:  # a bad scheme, no host, or a private IP literal (which the setting lifts)
            hint = ALLOW_HINT if target.scheme in ("http", "https") and target.raw_host else ""
            raise InvalidParams(f"callback_url is refused: {exc.reason}{hint}") from None
        host = target.raw_host or ""
        if self._policy.host_allowed(host):
            return url
        try:
            async with asyncio.timeout(RESOLVE_TIMEOUT):
                infos = await asyncio.get_running_loop().getaddrinfo(host, target.port, type=0)
        except (OSError, TimeoutError):
            raise InvalidParams(f"callback_url host {host} cannot be resolved") from None
        for info in infos:
            address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # no IPv6 zone
            if not self._policy.address_allowed(address):
                raise InvalidParams(f"callback_url host {host} resolves to a refused address ({address}){ALLOW_HINT}")
        return url

    def start(self, key: object, task_id: str, url: str, ended: Awaitable[bytes | None]) -> None:
        """Deliver the terminal payload `ended` gives, in a task owned here (`key`: the job); none
        when it gives None (a fleet job handed to another worker, which delivers it)."""
        task = asyncio.create_task(self._run(task_id, url, ended), name=f"webhook {task_id}")
        self._tasks[key] = task
        task.add_done_callback(lambda _: self._tasks.pop(key, None))

    async def settled(self, key: object) -> None:
        """Wait until the delivery for `key` (if any) is over: made, or given up (bounded)."""
        task = self._tasks.get(key)
        if task is not None:
            await asyncio.wait({task})

    async def drain(self, timeout: float) -> None:
        """Wait up to `timeout` for deliveries under way, then cancel the rest."""
        if not self._tasks:
            return
        log.info("waiting for %d webhook delivery(ies), up to %.0fs", len(self._tasks), timeout)
        tasks = set(self._tasks.values())
        _, pending = await asyncio.wait(tasks, timeout=timeout) if timeout > 0 else (set(), tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)

    async def _run(self, task_id: str, url: str, ended: Awaitable[bytes | None]) -> Delivery | None:
        body = await ended
        if body is None:
            return None
        delivery = await self.deliver(task_id, url, body)
        self._counted(delivery.delivered)
        fields = {"url_host": delivery.url_host, "status": delivery.status, "attempts": delivery.attempts}
        level = logging.INFO if delivery.delivered else logging.WARNING
        log.log(
            level,
            "webhook task_id=%s %s%s",
            task_id,
            json.dumps(fields),
            f" ({delivery.error})" if delivery.error else "",
        )
        try:
            await self._record(task_id, json.dumps(delivery.to_payload()).encode())
        except Exception as exc:  # the delivery happened: a record that cannot be written is only logged
            log.error("webhook record of task_id=%s could not be written: %s", task_id, exc)
        return delivery

    async def deliver(self, task_id: str, url: str, body: bytes) -> Delivery:
        """POST `body` to `url`: at most ATTEMPTS attempts within the timeout."""
        target = URL(url)
        status: int | None = None
        error: str | None = None
        attempts = 0
        try:
            async with asyncio.timeout(self._timeout):
                while attempts < ATTEMPTS:
                    if attempts:
                        await asyncio.sleep(BACKOFF * 2 ** (attempts - 1))
                    attempts += 1
                    status, error, retry = await self._attempt(target, task_id, body)
                    if not retry:
                        break
        except TimeoutError:
            error = f"gave up after {self._timeout:g}s"
        delivered = status is not None and 200 <= status < 300
        return Delivery(target.host or "", status, attempts, delivered, error, time.time())

    async def _attempt(self, target: URL, task_id: str, body: bytes) -> tuple[int | None, str | None, bool]:
        """One POST: (status, error, whether another attempt may help)."""
        try:
            check_url(target, self._policy)
            status = await self._post(target, task_id, body)
        except DownloadError as exc:  # a refused address stays refused
            return None, exc.reason, False
        except OSError as exc:  # ConnectionError included
            return None, f"connection failed ({type(exc).__name__})", True
        if status >= 500:
            return status, f"HTTP {status}", True
        return status, None if 200 <= status < 300 else f"HTTP {status}", False

    async def _post(self, target: URL, task_id: str, body: bytes) -> int:
        timestamp = str(int(time.time()))
        headers = {
            "Content-Type": "application/json",
            "X-Serverless-Task-Id": task_id,
            "X-Serverless-Timestamp": timestamp,
        }
        if self._secret:
            headers["X-Serverless-Signature"] = signature(self._secret, timestamp, body)
        return await self._post_through(target, body, headers)
