"""Leases, retries and sessions with the real store: the queue, dispatcher, outcomes and session
registry wired as the router wires them. Agents are stand-ins that record what they are sent (the
websocket path and real agent processes are in test_router.py and test_chaos.py)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gpugate.errors import FailureKind
from gpugate.settings import Router as RouterSettings
from gpugate.wire import Ack, Artifact, Capability, Device, Done, Failed, Failure, HeldJob, Hello, JobOffer, Model, StopJob
from router.artifacts import ArtifactStore
from router.dispatch import Dispatcher, fair_order
from router.events import JobEvents
from router.outcomes import Outcomes
from router.queue import JobQueue
from router.retention import Retention
from router.sessions import LOCAL_WORKER, AgentSession, Refusal, SessionRegistry
from router.store import Job, JobState, Store
from router.store.postgres import PostgresStore
from router.store.sqlite import SqliteStore

GB = 2**30
GRACE = 20.0


@dataclass
class Fleet:
    store: Store
    queue: JobQueue
    sessions: SessionRegistry
    dispatcher: Dispatcher
    outcomes: Outcomes
    artifacts: ArtifactStore
    open: Callable[[], Store]
    sent: list[tuple[str, JobOffer | StopJob]] = field(default_factory=list)

    async def join(self, name: str, free_gb: float = 12, instance: str | None = None,
             held: list[HeldJob] = ()) -> tuple[AgentSession, list[int], list[int]]:  # type: ignore[assignment]
        async def send(message: JobOffer | StopJob | Ack) -> None:
            if not isinstance(message, Ack):
                self.sent.append((name, message))

        async def disconnect() -> None:
            return None

        hello = Hello(name=name, instance=instance or name, cpu_only=False,
                      devices=[Device(index=0, name="gpu", vram_total=24 * GB, vram_free=int(free_gb * GB))],
                      models=[Model(kind="checkpoints", name="m.safetensors", size=2 * GB)],
                      capabilities=[Capability(name="txt2img", model_kind="checkpoints")], concurrency=1,
                      held=list(held))
        session, _ = self.sessions.join(hello, send, disconnect)
        session.slots = 1
        resumed, dropped = await self.outcomes.resume(session, hello.held)
        return session, resumed, dropped

    async def leave(self, session: AgentSession) -> None:
        self.sessions.leave(session)
        await self.outcomes.session_closed(session)

    async def submit(self, **overrides: object) -> Job:
        return await self.queue.submit(Job(**{"id": 0, "api": "TextToImage", "capability": "txt2img", "params": {"prompt": "x"},
                                        "inputs": {}, "model": "m.safetensors", "megapixels": 0.25, "max_attempts": 3,
                                        **overrides}))

    async def dispatch(self) -> list[tuple[str, JobOffer | StopJob]]:
        before = len(self.sent)
        await self.dispatcher.dispatch(time.time())
        return self.sent[before:]

    def reopen(self) -> Store:
        """The same store as a new router opens it (after this one closed it); closed at the end."""
        self.store = self.open()
        return self.store

    def stored(self, job: Job) -> Job:
        found = self.store.get_job(job.id)
        assert found is not None
        return found


@pytest.fixture(params=["sqlite", "postgres"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    """A router's queue, dispatcher and outcomes on each store: SQLite, and a PostgreSQL of its own."""
    if request.param == "sqlite":
        def open_store() -> Store:
            return SqliteStore(tmp_path / "router.db")
    else:
        url = request.getfixturevalue("postgres").new_database()

        def open_store() -> Store:
            return PostgresStore(url, pool_size=2)
    store = open_store()
    queue = JobQueue(store, JobEvents())
    sessions = SessionRegistry(failure_limit=3, pause_s=60)
    artifacts = ArtifactStore(tmp_path / "files")
    outcomes = Outcomes(queue, sessions, Retention(store, artifacts, RouterSettings()), GRACE)
    fleet = Fleet(store, queue, sessions, Dispatcher(queue, sessions, unplaceable_timeout_s=30), outcomes, artifacts,
                  open_store)
    yield fleet
    fleet.store.close()


def held(session: AgentSession, offer: JobOffer) -> HeldJob:
    return HeldJob(job_id=offer.job_id, attempt=offer.attempt, session=session.id)


async def test_out_of_memory_moves_the_job_to_an_agent_with_more_free_memory(fleet: Fleet) -> None:
    small, _, _ = await fleet.join("small", 6)
    job = await fleet.submit()
    assert [name for name, _ in await fleet.dispatch()] == ["small"]
    big, _, _ = await fleet.join("big", 12)
    big.slots = 0  # not asking for work yet
    await fleet.outcomes.failed(small, Failed(job_id=job.id, attempt=1, failure=Failure(kind=FailureKind.OUT_OF_MEMORY, message="oom")))
    small.slots = 1
    assert await fleet.dispatch() == []
    assert fleet.queue.status_text(job).startswith("waiting for a free agent"), "small no longer qualifies; big is busy"
    big.slots = 1
    [(name, offer)] = await fleet.dispatch()
    assert name == "big" and offer.attempt == 2
    await fleet.outcomes.done(big, Done(job_id=job.id, attempt=2))
    stored = fleet.stored(job)
    assert stored.state == JobState.COMPLETED and stored.attempt == 2 and stored.failures == 1


async def test_an_invalid_request_fails_at_once_and_late_answers_change_nothing(fleet: Fleet) -> None:
    agent, _, _ = await fleet.join("a")
    job = await fleet.submit()
    await fleet.dispatch()
    await fleet.outcomes.failed(agent, Failed(job_id=job.id, attempt=1, failure=Failure(
        kind=FailureKind.INVALID, message="prompt: is required", errors=[{"field": "prompt", "message": "is required"}])))
    await fleet.outcomes.done(agent, Done(job_id=job.id, attempt=1))  # a stale, contradicting answer
    stored = fleet.stored(job)
    assert stored.state == JobState.FAILED and stored.error is not None and stored.error["kind"] == "invalid"


async def test_with_one_agent_a_lost_job_runs_there_again_and_the_failures_are_bounded(fleet: Fleet) -> None:
    """The old rule banned the agent that lost a job: with one agent, the job waited forever."""
    job = await fleet.submit()
    for attempt in (1, 2, 3):
        agent, _, _ = await fleet.join("only", instance=f"process-{attempt}")  # restarted each time, under its name
        [(name, offer)] = await fleet.dispatch()
        assert name == "only" and offer.attempt == attempt
        await fleet.leave(agent)  # killed: its lease waits for it...
        assert fleet.stored(job).state == JobState.STARTED
        await fleet.outcomes.expire_leases(time.time() + GRACE)  # ...and runs out
    stored = fleet.stored(job)
    assert stored.state == JobState.FAILED and stored.error is not None and stored.error["kind"] == "worker_lost"
    assert stored.failures == 3 and "did not come back within 20s" in stored.error["message"]


async def test_a_reconnecting_agent_keeps_its_running_job_and_its_answer_counts(fleet: Fleet) -> None:
    agent, _, _ = await fleet.join("a")
    job = await fleet.submit()
    [(_, offer)] = await fleet.dispatch()
    await fleet.leave(agent)  # the connection dropped; the process lives on
    again, resumed, dropped = await fleet.join("a", held=[held(agent, offer)])
    assert (resumed, dropped) == ([job.id], [])
    await fleet.outcomes.done(agent, Done(job_id=job.id, attempt=1))  # the old session's late answer: ignored
    assert fleet.stored(job).state == JobState.STARTED
    await fleet.outcomes.done(again, Done(job_id=job.id, attempt=1))
    stored = fleet.stored(job)
    assert stored.state == JobState.COMPLETED and stored.attempt == 1 and stored.failures == 0


async def test_a_restarted_agent_without_the_job_gives_it_back_at_once(fleet: Fleet) -> None:
    agent, _, _ = await fleet.join("a", instance="first process")
    job = await fleet.submit()
    await fleet.dispatch()
    await fleet.leave(agent)
    _, resumed, _ = await fleet.join("a", instance="second process")  # kill -9 and start again: holds nothing
    assert resumed == [] and fleet.stored(job).state == JobState.QUEUED and fleet.stored(job).failures == 1
    [(name, offer)] = await fleet.dispatch()
    assert name == "a" and offer.attempt == 2


async def test_after_a_router_restart_running_jobs_wait_for_their_agents(fleet: Fleet, tmp_path: Path) -> None:
    agent, _, _ = await fleet.join("a")
    job = await fleet.submit()
    [(_, offer)] = await fleet.dispatch()
    fleet.store.close()

    restarted = fleet.reopen()  # a new router on the same store
    queue = JobQueue(restarted, JobEvents())
    await queue.recover(time.time(), GRACE)
    assert queue.live[job.id].state == JobState.STARTED and queue.live[job.id].lease_expires is not None
    sessions = SessionRegistry()
    outcomes = Outcomes(queue, sessions, Retention(restarted, fleet.artifacts, RouterSettings()), GRACE)
    hello = Hello(name="a", instance="a", cpu_only=False, devices=[], models=[], capabilities=[], concurrency=1,
                  held=[held(agent, offer)])

    async def send(message: object) -> None:
        return None

    session, _ = sessions.join(hello, send, send)  # type: ignore[arg-type]
    assert await outcomes.resume(session, hello.held) == ([job.id], [])
    await outcomes.done(session, Done(job_id=job.id, attempt=1))
    finished = restarted.get_job(job.id)
    assert finished is not None and finished.state == JobState.COMPLETED and finished.failures == 0


async def test_after_a_router_restart_its_own_workers_jobs_run_again_at_no_attempts_cost(fleet: Fleet,
                                                                                        tmp_path: Path) -> None:
    worker = fleet.sessions.join(Hello(name=LOCAL_WORKER, instance="w", cpu_only=True, devices=[], models=[],
                                       capabilities=[Capability(name="scale-image", vram_base=0, vram_per_megapixel=0)], concurrency=1),
                                 _noop, _noop, local=True)[0]
    worker.slots = 1
    mine = await fleet.submit(capability="scale-image", model=None)
    theirs = await fleet.submit()
    await fleet.join("a")
    await fleet.dispatch()
    assert (fleet.stored(mine).agent, fleet.stored(theirs).agent) == (LOCAL_WORKER, "a")
    fleet.store.close()

    restarted = fleet.reopen()  # the router (and its worker) stopped mid-job
    queue = JobQueue(restarted, JobEvents())
    await queue.recover(time.time(), GRACE)
    again = queue.live[mine.id]
    assert again.state == JobState.QUEUED and again.failures == 0 and again.agent is None
    assert queue.live[theirs.id].state == JobState.STARTED, "an agent's job waits for its agent to come back"


async def _noop(*_: object) -> None:
    return None


async def test_names_are_one_live_agent_each(fleet: Fleet) -> None:
    first, _, _ = await fleet.join("gpu-host", instance="one process")
    with pytest.raises(Refusal, match="an agent named 'gpu-host' is already connected"):
        await fleet.join("gpu-host", instance="another process")
    replacement, _, _ = await fleet.join("gpu-host", instance="one process")  # the same process, reconnecting
    assert fleet.sessions.sessions["gpu-host"] is replacement and fleet.sessions.by_id(first.id) is None
    with pytest.raises(Refusal, match="reserved for the router's own worker"):
        await fleet.join("router")
    with pytest.raises(Refusal, match="is not allowed"):
        await fleet.join("bad name!")


async def test_a_job_handed_back_at_shutdown_uses_no_attempt(fleet: Fleet) -> None:
    leaving, _, _ = await fleet.join("leaving")
    job = await fleet.submit()
    await fleet.dispatch()
    await fleet.outcomes.failed(leaving, Failed(job_id=job.id, attempt=1, failure=Failure(kind=FailureKind.SHUTDOWN, message="bye")))
    await fleet.leave(leaving)
    assert fleet.stored(job).state == JobState.QUEUED and fleet.stored(job).failures == 0
    other, _, _ = await fleet.join("other")
    [(name, offer)] = await fleet.dispatch()
    assert name == "other" and offer.attempt == 2


async def test_a_job_no_agent_can_take_fails_after_the_limit_with_the_reason(fleet: Fleet) -> None:
    job = await fleet.submit(model="nowhere.safetensors")
    await fleet.join("a")
    now = time.time()
    await fleet.dispatcher.dispatch(now)
    assert fleet.queue.status_text(job) == "no agent has model nowhere.safetensors"
    await fleet.dispatcher.dispatch(now + 31)
    stored = fleet.stored(job)
    assert stored.state == JobState.FAILED and stored.error is not None and stored.error["kind"] == "unschedulable"
    assert "for 31s: no agent has model nowhere.safetensors" in stored.error["message"]


async def test_an_agent_failing_jobs_in_a_row_is_paused(fleet: Fleet) -> None:
    broken, _, _ = await fleet.join("broken")
    for _ in range(3):
        await fleet.submit()
    for _ in range(3):
        [(_, offer)] = await fleet.dispatch()
        broken.slots = 1
        await fleet.outcomes.failed(broken, Failed(job_id=offer.job_id, attempt=offer.attempt, failure=Failure(
            kind=FailureKind.INFRASTRUCTURE, message="the disk is full")))
    assert await fleet.dispatch() == [], "paused: it would only fail the next one too"
    waiting = fleet.queue.queued()[0]
    assert "3 infrastructure failures in a row, the last: the disk is full" in fleet.queue.status_text(waiting)
    healthy, _, _ = await fleet.join("healthy")
    assert [name for name, _ in await fleet.dispatch()] == ["healthy"]


async def test_a_stale_answers_files_are_deleted_and_a_completed_jobs_kept(fleet: Fleet) -> None:
    agent, _, _ = await fleet.join("a")
    job = await fleet.submit()
    await fleet.dispatch()
    kept, stale = await fleet.artifacts.put(b"kept", ".png"), await fleet.artifacts.put(b"stale", ".png")
    files = [Artifact(name=kept, file_name="x.png", media_type="image/png", size=4)]
    await fleet.outcomes.done(agent, Done(job_id=job.id, attempt=1, artifacts=files))
    await fleet.outcomes.done(agent, Done(job_id=job.id, attempt=1, artifacts=[  # sent again, plus a stray file
        *files, Artifact(name=stale, file_name="y.png", media_type="image/png", size=5)]))
    assert fleet.artifacts.path(kept) is not None and fleet.artifacts.path(stale) is None


async def test_cancelling_a_running_job_stops_it_on_the_session_holding_it(fleet: Fleet) -> None:
    agent, _, _ = await fleet.join("a")
    job = await fleet.submit()
    await fleet.dispatch()
    assert await fleet.outcomes.cancel(job, "changed my mind")
    assert fleet.sent[-1] == ("a", StopJob(job_id=job.id, attempt=1))
    assert fleet.stored(job).state == JobState.CANCELLED
    assert not await fleet.outcomes.cancel(job, "again")


async def test_a_welcome_the_agent_never_got_does_not_cost_it_its_job(fleet: Fleet) -> None:
    """The lease moved to a new session, but the connection broke before the agent heard of it: the
    agent comes back naming the old session, and keeps its job."""
    first, _, _ = await fleet.join("a")
    job = await fleet.submit()
    [(_, offer)] = await fleet.dispatch()
    await fleet.leave(first)
    lost_welcome, resumed, _ = await fleet.join("a", held=[held(first, offer)])
    assert resumed == [job.id]
    await fleet.leave(lost_welcome)
    again, resumed, dropped = await fleet.join("a", held=[held(first, offer)])  # still the first session's id
    assert (resumed, dropped) == ([job.id], [])
    await fleet.outcomes.done(again, Done(job_id=job.id, attempt=1))
    assert fleet.stored(job).state == JobState.COMPLETED and fleet.stored(job).failures == 0


async def test_a_replaced_connections_late_answer_keeps_its_files_for_the_new_one(fleet: Fleet) -> None:
    old, _, _ = await fleet.join("a", instance="process")
    job = await fleet.submit()
    [(_, offer)] = await fleet.dispatch()
    new, _, _ = await fleet.join("a", instance="process", held=[held(old, offer)])  # reconnected; old socket not yet closed
    output = await fleet.artifacts.put(b"image", ".png")
    answer = Done(job_id=job.id, attempt=1, artifacts=[Artifact(name=output, file_name="x.png", media_type="image/png", size=5)])
    await fleet.outcomes.done(old, answer)  # read from the old socket: stale, but the same agent sends it again
    assert fleet.artifacts.path(output) is not None
    await fleet.outcomes.done(new, answer)
    assert fleet.stored(job).state == JobState.COMPLETED and fleet.artifacts.path(output) is not None


async def test_an_answer_naming_files_the_store_lacks_is_an_infrastructure_failure(fleet: Fleet) -> None:
    agent, _, _ = await fleet.join("a")
    job = await fleet.submit()
    await fleet.dispatch()
    await fleet.outcomes.done(agent, Done(job_id=job.id, attempt=1, artifacts=[
        Artifact(name="ab" * 32 + ".png", file_name="x.png", media_type="image/png", size=5)]))
    stored = fleet.stored(job)
    assert stored.state == JobState.QUEUED and stored.failures == 1, "retried, not completed without its image"


async def test_when_the_store_refuses_a_change_the_cache_follows_the_store(fleet: Fleet) -> None:
    agent, _, _ = await fleet.join("a")
    job = await fleet.submit()
    await fleet.dispatch()
    other = fleet.open()  # another writer (another router on the same store) got there first
    assert other.finish(dataclasses.replace(fleet.stored(job), state=JobState.CANCELLED), time.time())
    other.close()
    await fleet.outcomes.done(agent, Done(job_id=job.id, attempt=1))
    assert job.id not in fleet.queue.live and fleet.queue.live.get(job.id) is None
    assert fleet.stored(job).state == JobState.CANCELLED


async def test_api_keys_take_turns_so_a_long_queue_does_not_hold_up_another_keys_job(fleet: Fleet) -> None:
    agent, _, _ = await fleet.join("a")
    flood = [await fleet.submit(key_id=1) for _ in range(3)]
    other = await fleet.submit(key_id=2)
    order = []
    for _ in range(4):
        [(_, offer)] = await fleet.dispatch()
        order.append(offer.job_id)
        await fleet.outcomes.done(agent, Done(job_id=offer.job_id, attempt=offer.attempt))
        agent.slots = 1
    assert order == [flood[0].id, other.id, flood[1].id, flood[2].id]


def test_fair_order_takes_keys_in_turn_oldest_and_least_recently_served_first() -> None:
    jobs = [Job(id=i, api="TextToImage", capability="txt2img", params={}, inputs={}, model="m", megapixels=1.0,
                max_attempts=3, key_id=i % 3) for i in range(1, 10)]
    assert [j.id for j in fair_order(jobs, {})] == [1, 2, 3, 4, 5, 6, 7, 8, 9], "keys already alternating: unchanged"
    assert [j.id for j in fair_order(list(reversed(jobs)), {})] == [1, 2, 3, 4, 5, 6, 7, 8, 9], "oldest first"
    assert [j.id for j in fair_order(jobs, {1: 5, 2: 3})][:3] == [3, 2, 1], "the key served longest ago first"


async def test_a_job_whose_model_the_free_agent_has_loaded_goes_first(fleet: Fleet) -> None:
    """Within ``lookahead`` jobs, a job needing the loaded model passes one that would swap it out."""
    agent, _, _ = await fleet.join("a")
    agent.models = [Model(kind="checkpoints", name=n, size=2 * GB) for n in ("m.safetensors", "n.safetensors")]
    agent.loaded = {"n.safetensors"}
    swapping, loaded = await fleet.submit(model="m.safetensors"), await fleet.submit(model="n.safetensors")
    [(_, first)] = await fleet.dispatch()
    assert first.job_id == loaded.id, "no swap while a job for the loaded model waits"
    agent.slots = 1
    [(_, second)] = await fleet.dispatch()
    assert second.job_id == swapping.id, "the passed job goes next"
    fleet.dispatcher.lookahead = 0
    agent.slots, agent.loaded = 1, {"m.safetensors"}
    later = [await fleet.submit(model="n.safetensors"), await fleet.submit(model="m.safetensors")]
    [(_, plain)] = await fleet.dispatch()
    assert plain.job_id == later[0].id, "without look-ahead: first come, first served"


async def test_a_passed_job_is_passed_at_most_lookahead_times(fleet: Fleet) -> None:
    agent, _, _ = await fleet.join("a")
    agent.models = [Model(kind="checkpoints", name=n, size=2 * GB) for n in ("m.safetensors", "n.safetensors")]
    fleet.dispatcher.lookahead = 2
    swapping = await fleet.submit(model="m.safetensors")
    handed = []
    for _ in range(4):  # jobs for the loaded model keep coming
        await fleet.submit(model="n.safetensors")
        agent.slots, agent.loaded = 1, {"n.safetensors"}
        [(_, offer)] = await fleet.dispatch()
        handed.append(offer.job_id)
    assert swapping.id == handed[2], "passed twice, then its turn"


async def test_key_weights_hold_when_slots_free_one_at_a_time(fleet: Fleet) -> None:
    agent, _, _ = await fleet.join("a")
    fleet.dispatcher.weight = {1: 3, 2: 1}.__getitem__
    for _ in range(8):
        await fleet.submit(key_id=1)
        await fleet.submit(key_id=2)
    keys = []
    for _ in range(8):
        agent.slots = 1
        [(_, offer)] = await fleet.dispatch()
        keys.append(fleet.queue.live[offer.job_id].key_id)
    assert keys.count(1) == 6 and keys.count(2) == 2, keys


async def test_a_pass_reads_what_agents_can_take_and_a_job_queued_again_keeps_its_place(fleet: Fleet) -> None:
    stuck = [await fleet.submit(model="nowhere.safetensors") for _ in range(300)]  # no agent has it: never read by a pass
    first, second = await fleet.submit(), await fleet.submit()
    agent, _, _ = await fleet.join("a")
    [(_, offer)] = await fleet.dispatch()
    assert offer.job_id == first.id
    await fleet.outcomes.failed(agent, Failed(job_id=first.id, attempt=1, failure=Failure(kind=FailureKind.INFRASTRUCTURE,
                                                                                    message="disk full")))
    assert fleet.stored(first).state == JobState.QUEUED
    agent.slots = 1
    [(_, offer)] = await fleet.dispatch()
    assert offer.job_id == first.id and offer.attempt == 2, "queued again: back in its place, before the newer job"
    agent.slots = 1
    assert [o.job_id for _, o in await fleet.dispatch()] == [second.id]  # type: ignore[union-attr]
    assert fleet.queue.status_text(stuck[0]) == "no agent has model nowhere.safetensors"
    fleet.queue.backlog.compact()
    assert {j.id for j in fleet.queue.backlog.jobs(("txt2img", "nowhere.safetensors"))} == {j.id for j in stuck}
    assert list(fleet.queue.backlog.jobs(("txt2img", "m.safetensors"))) == [], "handed out: out of the index"


async def test_a_keys_weight_from_the_store_sets_its_share(fleet: Fleet) -> None:
    from router.keys import create_key
    from router.limits import KeyWeights
    from router.store import KeyLimits

    heavy = create_key(fleet.store, "heavy", limits=KeyLimits(weight=3)).key
    light = create_key(fleet.store, "light").key
    dispatcher = Dispatcher(fleet.queue, fleet.sessions, 30, KeyWeights(fleet.store))
    agent, _, _ = await fleet.join("a")
    for _ in range(8):
        await fleet.submit(key_id=heavy.id)
        await fleet.submit(key_id=light.id)
    served = []
    for _ in range(8):  # one slot at a time
        agent.slots = 1
        before = len(fleet.sent)
        await dispatcher.dispatch(time.time())
        [(_, offer)] = fleet.sent[before:]
        served.append(fleet.queue.live[offer.job_id].key_id)  # type: ignore[union-attr]
    assert served.count(heavy.id) == 6 and served.count(light.id) == 2, served
