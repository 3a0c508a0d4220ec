"""What the router does after a failure: a pure decision, tested without agents."""

from __future__ import annotations

import pytest

from gpugate.errors import FailureKind
from gpugate.wire import Failure
from router.queue import after_failure
from router.store import Job, JobState


def job(attempt: int = 1, max_attempts: int = 3) -> Job:
    return Job(id=1, api="TextToImage", capability="txt2img", params={}, inputs={}, model=None, megapixels=0.25,
               max_attempts=max_attempts, attempt=attempt)


@pytest.mark.parametrize("kind", [FailureKind.WORKER_LOST, FailureKind.TIMEOUT])
def test_infrastructure_failures_retry_elsewhere_until_attempts_run_out(kind: FailureKind) -> None:
    assert after_failure(job(1), Failure(kind=kind, message="x"), 0).again
    assert after_failure(job(1), Failure(kind=kind, message="x"), 0).exclude_agent
    assert not after_failure(job(3), Failure(kind=kind, message="x"), 0).again


def test_out_of_memory_retries_on_a_device_with_more_free_memory() -> None:
    decision = after_failure(job(1), Failure(kind=FailureKind.OUT_OF_MEMORY, message="oom"), 6 * 2**30)
    assert decision.again and decision.min_free_vram == 6 * 2**30 and not decision.exclude_agent


@pytest.mark.parametrize("kind, state", [(FailureKind.INVALID, JobState.FAILED), (FailureKind.EXECUTION, JobState.FAILED),
                                         (FailureKind.INTERRUPTED, JobState.CANCELLED)])
def test_request_and_code_failures_end_the_job_at_once(kind: FailureKind, state: str) -> None:
    decision = after_failure(job(1), Failure(kind=kind, message="x"), 0)
    assert not decision.again and decision.state == state
