"""How many bytes of loader inputs an instance holds at once, across all its requests.

A request's inputs are held in memory from the moment they are fetched until they are uploaded to
ComfyUI. Without a shared bound, N concurrent requests of M large inputs each hold N x M bodies.
`ByteBudget` is a byte-counting semaphore: a fetch reserves what it may read (its size limit, or
the known size of a base64 value) before reading, shrinks the reservation to what it read, and the
request gives it all back once its inputs are uploaded. A request that cannot get its reservation
waits in line (first come, first served), for a bounded time.
"""

from __future__ import annotations

import asyncio
from collections import deque

from ..errors import InputError


class BudgetExhausted(InputError):
    """A reservation could not be had within its time: other requests hold the budget."""


class Lease:
    """Bytes reserved from a `ByteBudget`; `shrink` gives back what was not used, `release` all."""

    def __init__(self, budget: ByteBudget, size: int) -> None:
        self._budget = budget
        self.size = size

    def shrink(self, size: int) -> None:
        """Keep only `size` bytes (no-op when that is not less than what is held)."""
        if size < self.size:
            self._budget._give_back(self.size - size)
            self.size = size

    def release(self) -> None:
        """Give everything back; safe to call more than once."""
        self.shrink(0)


class ByteBudget:
    """A byte semaphore of `capacity` bytes, shared by the fetches of all requests (see module)."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("ByteBudget capacity must be positive")
        self.capacity = capacity
        self.available = capacity
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def acquire(self, size: int, timeout: float) -> Lease:
        """A lease of `size` bytes, waiting up to `timeout` seconds behind earlier requests;
        `BudgetExhausted` when it cannot be had in time (or ever: more than the capacity)."""
        if size > self.capacity:
            raise BudgetExhausted(
                f"needs {size} bytes, more than the instance holds for inputs ({self.capacity} bytes, "
                "INPUT_MAX_JOB_BYTES + INPUT_MAX_BYTES)"
            )
        if not self._waiters and self.available >= size:
            self.available -= size
            return Lease(self, size)
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, granted)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(granted)
        except BaseException as exc:
            if granted.done() and not granted.cancelled():
                self._give_back(size)  # granted as we gave up: hand it on
            else:
                granted.cancel()
                self._waiters.remove(entry)
                self._wake()  # a smaller request behind us may fit now
            if isinstance(exc, TimeoutError):
                raise BudgetExhausted(
                    f"waited {timeout:g}s for memory to hold inputs: other requests' inputs fill the "
                    "instance's budget (INPUT_MAX_JOB_BYTES + INPUT_MAX_BYTES); try again later"
                ) from None
            raise
        return Lease(self, size)

    def _give_back(self, size: int) -> None:
        self.available += size
        self._wake()

    def _wake(self) -> None:
        """Grant waiting reservations in order while the first in line fits."""
        while self._waiters and self._waiters[0][0] <= self.available:
            size, granted = self._waiters.popleft()
            self.available -= size
            granted.set_result(None)
