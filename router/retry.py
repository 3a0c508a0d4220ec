"""What happens to a job after an attempt fails: a pure decision over the job and the failure's kind.

- A request or code failure (invalid, execution_error) ends the job at once; a cancel ends it
  Cancelled.
- An infrastructure failure (the agent or its engine lost, a full disk, a timeout) queues it
  again, counted against ``max_attempts``, preferring another agent next time: a preference, not a
  ban, so with one agent (the usual deployment) it runs there again.
- Out of memory queues it again for a device with more free memory than the one that failed.
- A hand-back by an agent that is shutting down queues it again without using an attempt. (A router
  restart uses none either: the agents keep their jobs. A lease that runs out because its agent
  never came back is a lost attempt, ``worker_lost``.)

procrastinate's ``RetryStrategy.get_retry_decision`` has the same shape.
"""

from __future__ import annotations

from dataclasses import dataclass

from gpugate.errors import FailureKind

from .store import Job, JobState

RETRY_ELSEWHERE = frozenset({FailureKind.WORKER_LOST, FailureKind.INFRASTRUCTURE, FailureKind.TIMEOUT})
AGENT_FAULTS = frozenset({FailureKind.WORKER_LOST, FailureKind.INFRASTRUCTURE})  # count towards an agent's pause


@dataclass(frozen=True)
class Decision:
    """Retry (how) or finish in ``state``."""

    again: bool
    state: JobState = JobState.FAILED
    charged: bool = True  # the attempt counts against max_attempts
    avoid_agent: bool = False  # prefer another agent next time
    min_free_vram: int = 0  # the next agent must have more free memory than this


def after_failure(job: Job, kind: FailureKind, agent_free_vram: int) -> Decision:
    if kind is FailureKind.INTERRUPTED:
        return Decision(False, JobState.CANCELLED)
    if kind is FailureKind.SHUTDOWN:
        return Decision(True, charged=False)
    attempts_left = job.failures + 1 < job.max_attempts
    if kind in RETRY_ELSEWHERE and attempts_left:
        return Decision(True, avoid_agent=True)
    if kind is FailureKind.OUT_OF_MEMORY and attempts_left:
        return Decision(True, min_free_vram=max(agent_free_vram, job.min_free_vram))
    return Decision(False)
