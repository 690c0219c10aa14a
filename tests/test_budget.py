"""`ByteBudget`: the instance-wide byte semaphore that input fetches reserve from."""

from __future__ import annotations

import asyncio

import pytest

from serverless.inputs.budget import BudgetExhausted, ByteBudget


async def test_reservations_within_capacity_are_granted_at_once_and_shrink_gives_back() -> None:
    budget = ByteBudget(100)
    first = await budget.acquire(60, timeout=1)
    second = await budget.acquire(40, timeout=1)
    assert budget.available == 0
    first.shrink(10)
    assert budget.available == 50
    first.release()
    second.release()
    second.release()  # idempotent
    assert budget.available == 100


async def test_a_reservation_that_does_not_fit_waits_for_a_release_in_arrival_order() -> None:
    budget = ByteBudget(100)
    held = await budget.acquire(90, timeout=1)
    big = asyncio.create_task(budget.acquire(50, timeout=10))
    small = asyncio.create_task(budget.acquire(5, timeout=10))
    await asyncio.sleep(0)
    assert not big.done() and not small.done(), "the small one does not overtake the big one"
    held.shrink(40)
    lease_big = await big
    lease_small = await small
    assert budget.available == 100 - 40 - 50 - 5
    for lease in (held, lease_big, lease_small):
        lease.release()
    assert budget.available == 100


async def test_a_reservation_that_waits_too_long_fails_and_leaves_nothing_behind() -> None:
    budget = ByteBudget(100)
    held = await budget.acquire(100, timeout=1)
    with pytest.raises(BudgetExhausted, match="INPUT_MAX_JOB_BYTES"):
        await budget.acquire(1, timeout=0.05)
    held.release()
    assert budget.available == 100
    (await budget.acquire(100, timeout=1)).release()


async def test_a_cancelled_waiter_leaves_the_line_and_lets_the_next_one_in() -> None:
    budget = ByteBudget(100)
    held = await budget.acquire(60, timeout=1)
    blocked = asyncio.create_task(budget.acquire(80, timeout=10))
    behind = asyncio.create_task(budget.acquire(30, timeout=10))
    await asyncio.sleep(0)
    assert not behind.done()
    blocked.cancel()
    lease = await behind
    assert budget.available == 10
    lease.release()
    held.release()
    assert budget.available == 100


async def test_more_than_the_capacity_is_refused_at_once() -> None:
    with pytest.raises(BudgetExhausted, match="more than the instance holds"):
        await ByteBudget(100).acquire(101, timeout=10)
