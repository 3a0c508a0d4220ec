"""The queue's bookkeeping with the real store and registry; agents are stand-ins that record what
they are sent (the websocket path is tested end to end in test_router.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpugate.errors import FailureKind
from gpugate.wire import Capability, Device, Done, Failed, Failure, Hello, JobOffer, Model
from router.agents import AgentRegistry, ConnectedAgent
from router.archive import JobArchive
from router.queue import JobQueue
from router.store import Job, JobState
from router.store.sqlite import SqliteStore

GB = 2**30


@pytest.fixture
def queue(tmp_path: Path) -> JobQueue:
    return JobQueue(SqliteStore(tmp_path / "router.db"), AgentRegistry(), JobArchive(tmp_path / "archive"))


def join(queue: JobQueue, name: str, free_gb: float, sent: list[tuple[str, JobOffer]]) -> ConnectedAgent:
    async def send(offer: JobOffer) -> None:
        sent.append((name, offer))

    async def disconnect() -> None:
        return None

    hello = Hello(name=name, cpu_only=False, devices=[Device(index=0, name="gpu", vram_total=24 * GB, vram_free=int(free_gb * GB))],
                  models=[Model(kind="checkpoints", name="m.safetensors", size=2 * GB)],
                  capabilities=[Capability(name="txt2img", model_kind="checkpoints")], concurrency=1)
    agent = queue.agents.join(hello, send, disconnect)
    agent.slots = 1
    return agent


def submit(queue: JobQueue) -> Job:
    return queue.submit(Job(id=0, api="TextToImage", capability="txt2img", params={"prompt": "x"}, inputs={},
                            model="m.safetensors", megapixels=0.25, max_attempts=3))


async def test_out_of_memory_moves_the_job_to_an_agent_with_more_free_memory(queue: JobQueue) -> None:
    sent: list[tuple[str, JobOffer]] = []
    small = join(queue, "small", 6, sent)
    job = submit(queue)
    await queue._dispatch()
    assert [name for name, _ in sent] == ["small"]
    big = join(queue, "big", 12, sent)
    big.slots = 0  # not asking for work yet
    queue.on_failed(small, Failed(job_id=job.id, attempt=1, failure=Failure(kind=FailureKind.OUT_OF_MEMORY, message="oom")))
    small.slots = 1
    await queue._dispatch()
    assert queue.waiting_reason[job.id].startswith("waiting for a free agent"), "small no longer qualifies; big is busy"
    big.slots = 1
    await queue._dispatch()
    assert [name for name, _ in sent] == ["small", "big"] and sent[-1][1].attempt == 2
    queue.on_done(big, Done(job_id=job.id, attempt=2))
    stored = queue.store.get_job(job.id)
    assert stored is not None and stored.state == JobState.COMPLETED and stored.attempt == 2


async def test_an_invalid_request_fails_at_once_and_late_answers_change_nothing(queue: JobQueue) -> None:
    sent: list[tuple[str, JobOffer]] = []
    agent = join(queue, "a", 12, sent)
    job = submit(queue)
    await queue._dispatch()
    queue.on_failed(agent, Failed(job_id=job.id, attempt=1, failure=Failure(
        kind=FailureKind.INVALID, message="prompt: is required", errors=[{"field": "prompt", "message": "is required"}])))
    queue.on_done(agent, Done(job_id=job.id, attempt=1))  # a stale, contradicting answer
    stored = queue.store.get_job(job.id)
    assert stored is not None and stored.state == JobState.FAILED and stored.error["kind"] == "invalid"


async def test_a_lost_agents_jobs_go_back_and_the_attempts_are_bounded(queue: JobQueue) -> None:
    sent: list[tuple[str, JobOffer]] = []
    job = submit(queue)
    for attempt, name in enumerate(("a", "b", "c"), start=1):
        agent = join(queue, name, 12, sent)
        await queue._dispatch()
        assert sent[-1] == (name, sent[-1][1]) and sent[-1][1].attempt == attempt
        queue.agents.leave(agent)
        queue.agent_lost(agent)
    stored = queue.store.get_job(job.id)
    assert stored is not None and stored.state == JobState.FAILED and stored.error["kind"] == "worker_lost"
