"""Warm-up against a real router and a real agent process: the agent joins at once, loads the
models of ``agent.warm_models`` (skipping, with a warning, one it does not have) before it asks for
its first job, and the router sees them loaded before any job was submitted."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpugate.settings import Settings
from router.keys import create_key
from router.state import SESSIONS, STORE
from tests.services import TINY_CATALOG, Agents, Router, call, finished, router_settings_in, until

CHECKPOINT = "tiny.safetensors"  # the file TINY_CATALOG names
UNKNOWN = "no-such-model.safetensors"


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory, fixture_models: Path) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), TINY_CATALOG, sync_timeout_s="120")


@pytest.fixture(scope="module")
def agents(router: Router, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    procs = Agents(tmp_path_factory.mktemp("agents"), router.url)
    yield procs
    procs.stop_all()


async def test_listed_models_are_loaded_before_the_first_job(router: Router, agents: Agents) -> None:
    agents.start("warm", 4, [CHECKPOINT], GPUGATE_AGENT__WARM_MODELS=f'["{CHECKPOINT}", "{UNKNOWN}"]')
    await router.wait_for_agents("warm")
    deadline = time.monotonic() + 120
    while CHECKPOINT not in router.app[SESSIONS].sessions["warm"].loaded:
        assert time.monotonic() < deadline, "the warmed checkpoint never showed as loaded"
        await asyncio.sleep(0.2)
    log = (agents.root / "warm.log").read_text()
    assert f"WARNING agent.link no runner here has this model; not warming it model={UNKNOWN}" in log
    assert "models warm" in log and f"models={CHECKPOINT}" in log

    key = create_key(router.app[STORE], "warmup", admin=True).token
    job = await call(router, key, "QueueTextToImage", {"positivePrompt": "a warm fox", "width": 64, "height": 64})
    done = await until(router, key, job["jobId"], finished, timeout=180)
    assert done["jobState"] == "Completed", done
