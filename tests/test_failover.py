"""A standby router takes over: two router processes on one PostgreSQL (the active one holds the
database; the standby waits for it), an agent that knows both. kill -9 of the active router mid-
chat: the standby starts serving, the agent reconnects to it with the chats it was running, and
every accepted job completes; status through the new router."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.chat.build import server_binary
from gpugate.settings import load_settings
from tests.services import Agents, RouterProcess, api_call

pytestmark = pytest.mark.skipif(not server_binary(load_settings(environ={})).exists(),
                                reason="llama-server is not built: run `gpugate llm provision` (make install does)")
LONG = "Count from 1 to 300, writing every number in words, separated by commas."


@pytest.fixture
def routers(postgres: Any, tmp_path: Path) -> Iterator[tuple[RouterProcess, RouterProcess]]:
    database = postgres.new_database()
    shared = tmp_path / "data"  # one data folder: the file store and the secrets, as on a shared volume
    shared.mkdir()
    active = RouterProcess(shared, database, GPUGATE_ROUTER__STANDBY="false")
    routers = [active]
    try:
        asyncio.run(active.wait_healthy())  # first: then the standby finds the database taken
        routers.append(standby := RouterProcess(shared, database, GPUGATE_ROUTER__STANDBY="true"))
        yield active, standby
    finally:
        for router in routers:
            router.stop()


async def test_a_standby_router_takes_over_and_every_job_completes(
        routers: tuple[RouterProcess, RouterProcess], tmp_path: Path) -> None:
    active, standby = routers
    await asyncio.sleep(1.0)
    assert not await standby.healthy(), "the standby does not serve while the active router holds the database"
    key = active.new_key("failover")
    agents = Agents(tmp_path / "agents", f"{active.url},{standby.url}")
    agents.start("talker", 4.0, [], GPUGATE_AGENT__RUNNERS='["chat"]', GPUGATE_CHAT__PARALLEL="2",
                 GPUGATE_CHAT__CONTEXT="1024")
    try:
        request = {"model": "smollm2", "max_tokens": 250, "temperature": 0, "messages": [{"role": "user", "content": LONG}]}
        jobs = [await api_call(active.url, key, "QueueOpenAiChatCompletion", {"refId": f"fo-{n}", "request": request})
                for n in range(3)]  # two run at once, one waits
        deadline = time.monotonic() + 120
        while (await api_call(active.url, key, "GetOpenAiChatStatus", {"jobId": jobs[0]["id"]}))["jobState"] != "Started":
            assert time.monotonic() < deadline, "the first chat never started"
            await asyncio.sleep(0.1)
        active.proc.send_signal(signal.SIGKILL)  # the active router dies mid-chat
        active.proc.wait(10)
        await standby.wait_healthy()
        for job in jobs:
            deadline = time.monotonic() + 180
            while (status := await api_call(standby.url, key, "GetOpenAiChatStatus", {"jobId": job["id"]}))["jobState"] \
                    not in ("Completed", "Failed", "Cancelled"):
                assert time.monotonic() < deadline, f"job {job['id']} never finished: {status}"
                await asyncio.sleep(0.2)
            assert status["jobState"] == "Completed", status
            assert status["result"]["usage"]["completion_tokens"] == 250
        found = await api_call(standby.url, key, "QueryJobs", {})
        assert {j["refId"] for j in found["jobs"]} == {"fo-0", "fo-1", "fo-2"}
        assert all(j["agent"] == "talker" for j in found["jobs"])
    finally:
        agents.stop_all()


async def test_a_router_that_loses_its_hold_on_the_database_stops(routers: tuple[RouterProcess, RouterProcess],
                                                                  postgres: Any) -> None:
    """Its lock's connection broken (a network cut, a database restart): the standby may take over,
    so the router stops itself rather than serve beside it."""
    import psycopg

    active, standby = routers
    database = active.env["GPUGATE_ROUTER__DATABASE_URL"]
    with psycopg.connect(database, autocommit=True) as db:
        [(holder,)] = db.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objid = 4241 AND granted").fetchall()
        db.execute("SELECT pg_terminate_backend(%s)", (holder,))
    assert active.proc.wait(30) is not None, "the router stopped"
    await standby.wait_healthy()
