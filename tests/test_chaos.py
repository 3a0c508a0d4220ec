"""The chaos suite: a stream of 100+ mixed Queue* jobs through a real router and real agents while
every ordinary fault of a GPU server happens once, with one agent and with two; and with two agents
and two routers serving one PostgreSQL at once (router.shared), the client using them in turn.

During the stream: kill -9 of a ComfyUI mid-job, kill -9 of an agent (started again under its
name), SIGTERM of the router (started again), kill -9 of the router (started again), and a second
agent connecting under a name in use. With two routers the router faults strike one each (the
first's agents fail over to the second), and the impostor tries the other router first. Passing means: every accepted job Completed (none Failed for
an infrastructure reason, none left Queued or Started), no process ended that was not killed, no
ComfyUI outlived its agent, and the impostor was refused with a message naming the name.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.chaos import Cluster, Stream, summary

MIN_JOBS = 100
PACE_S = 0.3  # between submissions
MOST_WAITING = 12  # unfinished jobs the client lets pile up


async def _a_txt2img_running_on(cluster: Cluster, stream: Stream, agent: str, timeout: float = 90) -> None:
    """Wait until the agent runs an image job, so the ComfyUI kill lands mid-job (or give up waiting)."""
    images = {job_id for ref, job_id in stream.accepted.items() if stream.kinds[ref] == "TextToImage"}
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        board = await cluster.dashboard()
        if board and any(set(a["running"]) & images for a in board["agents"] if a["name"] == agent):
            return
        images = {job_id for ref, job_id in stream.accepted.items() if stream.kinds[ref] == "TextToImage"}
        await asyncio.sleep(0.1)


async def _progress(stream: Stream, http: aiohttp.ClientSession, more: int, timeout: float = 300) -> None:
    """Let ``more`` jobs finish before the next fault (each fault meets a working system)."""
    start = await stream.finished(http)
    deadline = asyncio.get_running_loop().time() + timeout
    while await stream.finished(http) < start + more:
        assert asyncio.get_running_loop().time() < deadline, "no progress between faults"
        await asyncio.sleep(0.5)


async def run_chaos(root: Path, video: Path, agents: list[str], database: str | None = None,
                    routers: int = 1) -> dict[str, Any]:
    cluster = Cluster(root, video, database=database, routers=routers)
    stream = Stream(cluster)
    victim = agents[0]
    comfyuis: list[psutil.Process] = []
    try:
        await cluster.up(agents)
        async with aiohttp.ClientSession() as http:
            feeder = asyncio.create_task(stream.feed(http, PACE_S, MOST_WAITING))
            try:
                await _progress(stream, http, 5)
                await _a_txt2img_running_on(cluster, stream, victim)
                await cluster.kill_comfyui(victim)
                await _progress(stream, http, 5)
                await cluster.kill_agent(victim)
                await _progress(stream, http, 5)
                await cluster.restart_router(signal.SIGTERM)
                await _progress(stream, http, 5)
                await cluster.restart_router(signal.SIGKILL, routers - 1)
                refusal = await cluster.impostor(victim)
                while len(stream.accepted) < MIN_JOBS:
                    await asyncio.sleep(0.5)
            finally:
                feeder.cancel()
                await asyncio.gather(feeder, return_exceptions=True)
            jobs = await stream.wait_all(http, 900)
        comfyuis = [c for name in agents if (c := cluster.comfyui_of(name)) is not None]
        assert len(comfyuis) == len(agents), "every agent has its ComfyUI at the end"
        unexpected = cluster.unexpected_exits()
    finally:
        await cluster.down()
    report = summary(jobs)
    assert not unexpected, "\n\n".join(unexpected)
    assert not cluster.orphans, f"ComfyUI outlived its agent: {cluster.orphans}"
    for comfy in comfyuis:
        assert not comfy.is_running() or comfy.status() == psutil.STATUS_ZOMBIE, "ComfyUI outlived its agent's shutdown"
    assert report["jobs"] >= MIN_JOBS
    assert report["states"] == {"Completed": report["jobs"]}, report
    assert f"an agent named '{victim}' is already connected" in refusal or \
        f"an agent named '{victim}' is connected to another router" in refusal
    return {**report, "client_retries": stream.retries}


@pytest.mark.parametrize("agents", [["solo"], ["first", "second"]], ids=["one agent", "two agents"])
async def test_every_accepted_job_completes_through_every_fault(agents: list[str], tmp_path: Path, sample_video: Path,
                                                                fixture_models: Path) -> None:
    report = await run_chaos(tmp_path, sample_video, agents)
    assert report["client_retries"] > 0, "the client did meet the router down, and retried with its refIds"


async def test_two_routers_on_postgresql_lose_nothing_through_every_fault(tmp_path: Path, sample_video: Path,
                                                                          fixture_models: Path, postgres: Any) -> None:
    await run_chaos(tmp_path, sample_video, ["first", "second"], database=postgres.new_database(), routers=2)
