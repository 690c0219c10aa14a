"""The soak (`python -m bench soak`: 2,000 jobs, two workers SIGKILLed) in small: 200 mixed jobs
(sync, SSE, async; 1 MB inputs; cancels) through a gateway and three workers, one worker SIGKILLed
and started again (a process; the other two and the gateway in-process). Every job ends exactly
once with a terminal payload, none runs more than twice, and Redis holds no more than at the start
once its TTLs have run."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.soak import soak

pytestmark = pytest.mark.timeout(170)


async def test_two_hundred_mixed_jobs_with_a_worker_killed_each_end_exactly_once_and_redis_is_left_as_found(
    tmp_path: Path,
) -> None:
    report = await soak(tmp_path, jobs=200, kills=1, spared_in_process=True)  # the one killed is a process
    print("\n".join(report.lines()))
    assert report.problems == []
    assert sum(report.outcomes.values()) == 200 and report.outcomes["succeeded"] >= 150, report.outcomes
    assert report.kills == 1
