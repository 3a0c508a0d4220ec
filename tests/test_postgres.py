"""The router on PostgreSQL (``router.database_url``): a real router and agent on a throwaway
cluster; jobs, keys, refIds and callbacks' outbox in the database; a restart loses nothing;
finished jobs move to monthly partitions and stay findable; two routers' claims never collide.
(The queue's own rules run on both stores in tests/test_queue.py.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import pytest

from gpugate.settings import Settings
from router.keys import create_key
from router.state import STORE
from router.store import Job, JobQuery, JobState
from router.store.postgres import PostgresArchive, PostgresStore
from tests.services import Agents, Router, call, router_settings_in, until


@pytest.fixture(scope="module")
def database(postgres: Any) -> str:
    return postgres.new_database()


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory, database: str) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), echo_api="true", database_url=database,
                              archive_after_s="0.5", archive_every_s="0.2", sync_timeout_s="30")


@pytest.fixture(scope="module")
async def agents(router: Router, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Agents]:
    agents = Agents(tmp_path_factory.mktemp("agents"), router.url)
    agents.start("echoes", 1.0, [], GPUGATE_AGENT__RUNNERS='["echo"]', GPUGATE_AGENT__CONCURRENCY="4")
    try:
        await router.wait_for_agents("echoes", timeout=60)
        yield agents
    finally:
        agents.stop_all()


async def test_jobs_run_survive_a_restart_and_are_archived_into_monthly_partitions(
        router: Router, agents: Agents, database: str) -> None:
    key = create_key(router.app[STORE], "pg client").token
    assert isinstance(router.app[STORE], PostgresStore)
    done = await call(router, key, "Echo", {"text": "on postgres", "refId": "pg-1", "tag": "pg"})
    assert done["results"] == [{"text": "on postgres"}]
    await router.stop()  # a restart: queued and finished jobs, keys and refIds are in the database
    await router.start()
    again = await call(router, key, "Echo", {"text": "a retry", "refId": "pg-1"})
    assert again["results"] == [{"text": "on postgres"}], "the refId's job, from before the restart"
    deadline = time.monotonic() + 30
    with psycopg.connect(database) as db:
        while db.execute("SELECT count(*) FROM jobs").fetchone()[0] > 0:  # the archiver moved them
            assert time.monotonic() < deadline, "finished jobs were never archived"
            await asyncio.sleep(0.2)
        month = time.strftime("archived_jobs_%Y_%m", time.gmtime())
        assert db.execute(f"SELECT count(*) FROM {month}").fetchone()[0] >= 1, "in this month's partition"
    found = await call(router, key, "QueryJobs", {"tag": "pg"})
    assert [j["refId"] for j in found["jobs"]] == ["pg-1"]
    status = await until(router, key, None, lambda s: s["jobState"] == "Completed", refId="pg-1")
    assert status["results"] == [{"text": "on postgres"}]


def test_two_routers_claims_on_one_database_never_collide(database: str) -> None:
    first, second = PostgresStore(database, pool_size=2), PostgresStore(database, pool_size=2)
    try:
        job = first.add_job(Job(id=0, api="Echo", capability="echo", params={}, inputs={}, model=None, megapixels=0,
                                max_attempts=1, created=time.time()))
        seen_by_second = second.get_job(job.id)
        assert seen_by_second is not None
        assert first.claim(job, "a", "session-a", time.time())
        assert not second.claim(seen_by_second, "b", "session-b", time.time()), "the job was claimed already"
        assert second.get_job(job.id).session == "session-a"  # type: ignore[union-attr]
        claimed = first.get_job(job.id)
        assert claimed is not None and first.finish(
            Job(**{**claimed.__dict__, "state": JobState.COMPLETED, "results": {"texts": ["x"]}}), time.time())
        archive = PostgresArchive(second)
        archive.put([second.get_job(job.id)])  # type: ignore[list-item]
        archive.put([second.get_job(job.id)])  # a copy repeated after a crash replaces the row
        assert [j.id for j in archive.find(JobQuery(limit=100))].count(job.id) == 1
    finally:
        first.close()
        second.close()


def test_one_router_per_database_and_a_newer_schema_is_refused(router: Router, database: str, postgres: Any) -> None:
    from gpugate.errors import ConfigError

    with pytest.raises(ConfigError, match="another router uses this database"):
        PostgresStore(database, hold="exclusive")  # the module's router holds it
    newer = postgres.new_database()
    PostgresStore(newer).close()
    with psycopg.connect(newer, autocommit=True) as db:
        db.execute("UPDATE schema_version SET version = 99")
    with pytest.raises(ConfigError, match="schema is version 99, newer"):
        PostgresStore(newer)


def test_a_time_a_hair_before_midnight_is_archived_in_its_own_month() -> None:
    from router.store.postgres import _month

    start, end, name = _month(1735689599.9999995)  # 2024-12-31 23:59:59.9999995 UTC
    assert name == "archived_jobs_2024_12" and start <= 1735689599.9999995 < end


def test_a_standby_without_a_database_is_refused(tmp_path: Any) -> None:
    from gpugate.errors import ConfigError
    from gpugate.settings import load_settings
    from router.store.backends import open_store

    settings = load_settings(environ={"GPUGATE_ROUTER__STANDBY": "true", "GPUGATE_PATHS__DATA_DIR": str(tmp_path)})
    with pytest.raises(ConfigError, match="router.standby needs router.database_url"):
        open_store(settings, router=True)
