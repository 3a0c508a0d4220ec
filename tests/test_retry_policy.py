"""What the router does after a failure: a pure decision, tested without agents."""

from __future__ import annotations

import pytest

from gpugate.errors import FailureKind
from router.retry import after_failure
from router.store import Job, JobState


def job(failures: int = 0, max_attempts: int = 3) -> Job:
    return Job(id=1, api="TextToImage", capability="txt2img", params={}, inputs={}, model=None, megapixels=0.25,
               max_attempts=max_attempts, attempt=failures + 1, failures=failures)


@pytest.mark.parametrize("kind", [FailureKind.WORKER_LOST, FailureKind.INFRASTRUCTURE, FailureKind.TIMEOUT])
def test_infrastructure_failures_retry_preferring_another_agent_until_attempts_run_out(kind: FailureKind) -> None:
    first = after_failure(job(0), kind, 0)
    assert first.again and first.avoid_agent and first.charged
    assert after_failure(job(1), kind, 0).again
    assert not after_failure(job(2), kind, 0).again, "the third failed attempt of three ends the job"


def test_a_hand_back_at_shutdown_is_queued_again_without_using_an_attempt() -> None:
    decision = after_failure(job(2), FailureKind.SHUTDOWN, 0)
    assert decision.again and not decision.charged and not decision.avoid_agent


def test_out_of_memory_retries_on_a_device_with_more_free_memory() -> None:
    decision = after_failure(job(0), FailureKind.OUT_OF_MEMORY, 6 * 2**30)
    assert decision.again and decision.min_free_vram == 6 * 2**30 and not decision.avoid_agent


@pytest.mark.parametrize("kind, state", [(FailureKind.INVALID, JobState.FAILED), (FailureKind.EXECUTION, JobState.FAILED),
                                         (FailureKind.INTERRUPTED, JobState.CANCELLED)])
def test_request_and_code_failures_end_the_job_at_once(kind: FailureKind, state: str) -> None:
    decision = after_failure(job(0), kind, 0)
    assert not decision.again and decision.state == state
