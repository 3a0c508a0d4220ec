"""Routers sharing one PostgreSQL (router.shared), piece by piece on a throwaway cluster: the lock
modes exclude each other, a callback is leased by one router, an agent name is one session across
routers, each router's live-job cache follows the others', and the leases of a router that went
silent start their clock while a live router's are left alone. (Two router processes with agents,
and kill -9 of one, are in tests/test_routers.py.)"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from gpugate.errors import ConfigError
from gpugate.settings import load_settings
from gpugate.wire import Progress
from router.events import JobEvents
from router.outcomes import Outcomes
from router.peers import Peers
from router.queue import JobQueue
from router.sessions import SessionRegistry
from router.store import Delivery, Job, JobState
from router.store.postgres import PostgresStore


@pytest.fixture
def database(postgres: Any) -> str:
    return postgres.new_database()


@pytest.fixture
def stores(database: str) -> Iterator[tuple[PostgresStore, PostgresStore]]:
    first, second = PostgresStore(database, pool_size=2), PostgresStore(database, pool_size=2)
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def _job(**changes: Any) -> Job:
    return Job(id=0, api="Echo", capability="echo", params={}, inputs={}, model=None, megapixels=0, max_attempts=3,
               created=time.time(), **changes)


def test_shared_and_exclusive_routers_exclude_each_other(database: str) -> None:
    shared = PostgresStore(database, hold="shared")
    also_shared = PostgresStore(database, hold="shared")  # any number of shared routers
    try:
        with pytest.raises(ConfigError, match="set router.shared = true on every router"):
            PostgresStore(database, hold="exclusive")
    finally:
        shared.close()
        also_shared.close()
    alone = PostgresStore(database, hold="exclusive")
    try:
        with pytest.raises(ConfigError, match="a router without router.shared serves this database"):
            PostgresStore(database, hold="shared")
    finally:
        alone.close()


def test_a_callback_is_leased_to_one_router(stores: tuple[PostgresStore, PostgresStore]) -> None:
    first, second = stores
    job = first.add_job(_job(reply_to="https://example.com/hook"))
    assert first.claim(job, "a", "r1.s", time.time())
    job.attempt = 1
    now = time.time()
    delivery = Delivery(id=0, job_id=job.id, key_id=None, url="https://example.com/hook", webhook_id="msg_1", body="{}",
                        created=now, next_at=now)
    assert first.finish(Job(**{**job.__dict__, "state": JobState.COMPLETED}), now, delivery)
    [mine], [theirs] = first.due_deliveries(now + 1, 10), second.due_deliveries(now + 1, 10)
    assert first.claim_delivery(mine, now + 15)
    assert not second.claim_delivery(theirs, now + 15), "the other router leased it already"
    assert second.due_deliveries(now + 1, 10) == [], "leased: due again only when the lease runs out"


def test_an_agent_name_is_one_session_across_routers(stores: tuple[PostgresStore, PostgresStore], database: str) -> None:
    first, second = stores
    assert first.admit_agent("gpu1", "process-a", "r1.s1", "r1", "{}", 10)
    assert not second.admit_agent("gpu1", "process-b", "r2.s1", "r2", "{}", 10), "another process"
    assert second.admit_agent("gpu1", "process-a", "r2.s2", "r2", "{}", 10), "the same one, failing over"
    first.report_agents("r1", {"r1.s1": ("gpu1", "process-a", '{"stale": true}')})  # r1's old session
    [row] = second.agent_reports(10)
    assert (row["session"], row["router"], row["report"]) == ("r2.s2", "r2", "{}"), "the old session wrote nothing back"
    _age(database, "agent_reports", 30)  # r2 silent since: its row is stale
    assert second.agent_reports(10) == []
    assert first.admit_agent("gpu1", "process-b", "r1.s3", "r1", "{}", 10)
    second.agent_left("r2.s2")  # r2's session ends late: the new row is not its own
    assert [r["session"] for r in first.agent_reports(10)] == ["r1.s3"]


def _age(database: str, table: str, seconds: float) -> None:
    """Make every row of ``table`` as if last heard ``seconds`` earlier."""
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(f"UPDATE {table} SET seen = seen - %s", (seconds,))


async def test_each_routers_cache_follows_the_others(stores: tuple[PostgresStore, PostgresStore]) -> None:
    first, second = stores
    told: list[tuple[int, Any]] = []
    one, two = JobQueue(first, JobEvents()), JobQueue(second, JobEvents())
    one.announce = lambda job_id, event: told.append((job_id, event))
    job = await one.submit(_job())
    assert told == [(job.id, None)]
    assert await two.follow(job.id) is None and two.live[job.id].state == JobState.QUEUED
    assert await one.claim(job, "gpu1", "r1.s1")
    before = await two.follow(job.id)
    assert before is not None and before.state == JobState.QUEUED
    assert (two.live[job.id].state, two.live[job.id].session) == (JobState.STARTED, "r1.s1")
    progress = Progress(job_id=job.id, attempt=1, step=1, total=2)
    two.set_progress(two.live[job.id], progress, here=False)
    assert two.progress[job.id] == progress and len(told) == 2, "what came from elsewhere is not told again"
    with two.events.watch(job.id) as events:
        await one.finish(job, JobState.COMPLETED, results={"texts": ["done"]})
        await two.follow(job.id)
        ended = [e for e in [events.get_nowait() for _ in range(events.qsize())] if isinstance(e, Job)]
    assert job.id not in two.live and ended and ended[0].state == JobState.COMPLETED
    gone = await one.submit(_job())
    await two.resync()  # notices missed: a fresh read of every live job
    assert set(two.live) == {gone.id}


async def test_a_silent_routers_leases_start_their_clock_a_live_ones_do_not(
        stores: tuple[PostgresStore, PostgresStore], database: str) -> None:
    first, second = stores
    now = time.time()
    first.router_seen("r1", "http://r1")  # router r1, alive, runs a job on its agent and one on its own worker
    agents = first.add_job(_job())
    assert first.claim(agents, "gpu1", "r1.s1", now)
    worker = first.add_job(_job())
    assert first.claim(worker, "router@r1", "r1.s2", now)
    settings = load_settings(environ={"GPUGATE_ROUTER__DATABASE_URL": database, "GPUGATE_ROUTER__SHARED": "true",
                                      "GPUGATE_ROUTER__PEER_TIMEOUT_S": "5", "GPUGATE_ROUTER__LEASE_GRACE_S": "20"})
    queue, sessions = JobQueue(second, JobEvents()), SessionRegistry(router_id="r2")
    peers = Peers(second, settings.router, queue, sessions, Outcomes(queue, sessions, None, 20))  # type: ignore[arg-type]
    assert peers.join() == {"r1"}
    await queue.recover(now, 20, live_routers=peers.live)  # router r2 starts beside it: r1's jobs are r1's
    assert [(j.state, j.lease_expires) for j in queue.running()] == [(JobState.STARTED, None)] * 2
    _age(database, "routers", 60)  # r1 falls silent (and r2 with it, until its next beat)
    await peers._exchange()
    assert queue.live[worker.id].state == JobState.QUEUED, "r1's own worker's job: queued again at once, uncharged"
    assert queue.live[worker.id].failures == 0
    [lease] = queue.running()
    assert lease.id == agents.id and lease.lease_expires is not None and lease.lease_expires >= now + 19
    assert second.get_job(agents.id).lease_expires == lease.lease_expires  # type: ignore[union-attr]
    assert second.silent_routers(5) == ({"r2"}, set()), "r1 forgotten; r2 heard again"


def test_streamed_text_of_any_script_goes_in_notices_the_database_takes() -> None:
    from gpugate.wire import Delta
    from router.bus import PAYLOAD_MAX, Kind, Notice, notices_of

    text = "漢字😀\n\x01" * 3000  # escaped in JSON: several times its length in characters
    pieces = notices_of("r1", 7, Delta(job_id=7, attempt=2, offset=100, text=text))
    assert len(pieces) > 1 and all(len(p.encode().encode()) <= PAYLOAD_MAX for p in pieces)
    back = [Notice.decode(p.encode()) for p in pieces]
    assert "".join(n.event.text for n in back) == text  # type: ignore[union-attr]
    assert [n.event.offset for n in back] == [100 + sum(len(m.event.text) for m in back[:i])  # type: ignore[union-attr]
                                              for i in range(len(back))]
    assert notices_of("r1", 7, None) == [Notice("r1", Kind.JOB, 7)]
    with pytest.raises(ValueError, match="not a notice"):
        Notice.decode('{"r": "r1", "k": "progress", "j": 7, "e": {"oops": 1}}')


async def test_the_routers_hot_calls_run_on_async_connections_with_the_same_answers(database: str) -> None:
    from router.store import DuplicateRefId, store_call

    store = PostgresStore(database, pool_size=2)
    try:
        assert not store.async_ready
        await store.open_async()  # what a router does: from here on its hot calls never block its loop
        assert store.async_ready
        job = await store_call(store, store.add_job, _job(ref_id="r-1", key_id=3))
        assert job.id and store.get_job(job.id) == await store_call(store, store.get_job, job.id)
        with pytest.raises(DuplicateRefId):
            await store_call(store, store.add_job, _job(ref_id="r-1", key_id=3))
        assert await store_call(store, store.job_id_by_ref, 3, "r-1") == job.id
        assert await store_call(store, store.claim, job, "gpu1", "r1.s1", time.time())
        assert not await store_call(store, store.claim, job, "gpu2", "r1.s2", time.time()), "claimed already"
        job.attempt, job.session = 1, "r1.s1"
        assert await store_call(store, store.move_lease, job, "r1.s3")
        job.session = "r1.s3"
        assert await store_call(store, store.set_lease_expiry, job, 123.0)
        delivery = Delivery(id=0, job_id=job.id, key_id=3, url="https://example.com/h", webhook_id="msg_x", body="{}",
                            created=1.0, next_at=1.0)
        done = Job(**{**job.__dict__, "state": JobState.COMPLETED, "results": {"texts": ["ok"]}})
        assert await store_call(store, store.finish, done, time.time(), delivery) and delivery.id
        [stored] = await store_call(store, store.get_jobs, [job.id, 99999])
        assert stored.state == JobState.COMPLETED and stored.results == {"texts": ["ok"]}
        assert await store_call(store, store.key_by_digest, "no such digest") is None
        assert await store_call(store, store.unfinished_jobs) == [], "a call without an async twin: in a worker thread"
    finally:
        await store.close_async()
        store.close()


def test_shared_without_a_database_or_with_standby_is_refused(tmp_path: Any) -> None:
    from router.store.backends import open_store

    for env, message in (({"GPUGATE_ROUTER__SHARED": "true"}, "router.shared needs router.database_url"),
                         ({"GPUGATE_ROUTER__SHARED": "true", "GPUGATE_ROUTER__STANDBY": "true",
                           "GPUGATE_ROUTER__DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"}, "exclude each other")):
        settings = load_settings(environ={**env, "GPUGATE_PATHS__DATA_DIR": str(tmp_path)})
        with pytest.raises(ConfigError, match=message):
            open_store(settings, router=True)
