"""Each fault on its own, against a real router and real agent processes: what survives what.

- SIGTERM to an agent: its running job finishes and answers; past the grace period it is handed
  back, queued again without using an attempt.
- A router restart: jobs running on agents go on, and their answers count (the lease is resumed).
- ComfyUI killed under a running agent: only the image capability goes away until it is back;
  speech keeps serving, the agent never exits.
- ComfyUI wedged (stopped): found by its liveness check, killed, restarted; its job is retried.
- A full disk on an agent: an infrastructure failure, retried on another agent.
- An agent without ffmpeg does not offer media; an agent of another wire version is refused.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from gpugate.settings import Settings
from gpugate.wire import WIRE_VERSION
from router.keys import create_key
from router.state import SESSIONS, STORE
from tests.services import TOKEN, Agents, Router, call, finished, router_settings_in, until

SPEECH = '["speech"]'
# about 40 s of speech, some 40 sentences: long enough to be caught running, stoppable between sentences
LONG_TEXT = " ".join(f"Sentence number {i} is read slowly by the patient voice." for i in range(40))


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), sync_timeout_s="120",
                              heartbeat_timeout_s="6", lease_grace_s="15")


@pytest.fixture(scope="module")
def key(router: Router) -> str:
    return create_key(router.app[STORE], "faults", admin=True).token


@pytest.fixture
def agents(router: Router, tmp_path: Path) -> Iterator[Agents]:
    procs = Agents(tmp_path, router.url)
    yield procs
    procs.stop_all()


async def _running(router: Router, key: str, job_id: int) -> dict[str, Any]:
    return await until(router, key, job_id, lambda s: s["jobState"] != "Queued", timeout=120)


async def _speak(router: Router, key: str, text: str = LONG_TEXT, fmt: str = "wav") -> int:
    return (await call(router, key, "QueueTextToSpeech", {"input": text, "outputFormat": fmt}))["jobId"]


def _stored(router: Router, job_id: int) -> Any:
    job = router.app[STORE].get_job(job_id)
    assert job is not None
    return job


async def test_sigterm_lets_a_running_job_finish_and_answer(router: Router, key: str, agents: Agents) -> None:
    agents.start("drainer", 4, [], GPUGATE_AGENT__RUNNERS=SPEECH, GPUGATE_AGENT__SHUTDOWN_GRACE_S="120")
    await router.wait_for_agents("drainer", timeout=120)
    job_id = await _speak(router, key)
    assert (await _running(router, key, job_id))["jobState"] == "Started"
    agents.procs["drainer"].send_signal(signal.SIGTERM)
    await until(router, key, job_id, lambda s: router.app[SESSIONS].sessions.get("drainer") is None
                or router.app[SESSIONS].sessions["drainer"].draining, timeout=30)
    done = await until(router, key, job_id, finished, timeout=180)
    assert done["jobState"] == "Completed" and done["results"][0]["provider"] == "drainer"
    assert _stored(router, job_id).attempt == 1
    assert await asyncio.to_thread(agents.procs["drainer"].wait, 60) == 0


async def test_past_the_grace_period_a_job_is_handed_back_without_using_an_attempt(
        router: Router, key: str, agents: Agents) -> None:
    agents.start("hasty", 4, [], GPUGATE_AGENT__RUNNERS=SPEECH, GPUGATE_AGENT__SHUTDOWN_GRACE_S="0.5")
    await router.wait_for_agents("hasty", timeout=120)
    job_id = await _speak(router, key)
    await _running(router, key, job_id)
    agents.procs["hasty"].send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(agents.procs["hasty"].wait, 60) == 0
    back = await until(router, key, job_id, lambda s: s["jobState"] != "Started", timeout=30)
    assert back["jobState"] == "Queued"
    assert _stored(router, job_id).failures == 0, "handed back at shutdown: no attempt used"
    agents.start("heir", 4, [], GPUGATE_AGENT__RUNNERS=SPEECH)
    done = await until(router, key, job_id, finished, timeout=180)
    assert done["jobState"] == "Completed" and done["results"][0]["provider"] == "heir"
    assert (_stored(router, job_id).attempt, _stored(router, job_id).failures) == (2, 0)


async def test_a_router_restart_leaves_running_jobs_running_and_their_answers_count(
        router: Router, key: str, agents: Agents) -> None:
    agents.start("steady", 4, [], GPUGATE_AGENT__RUNNERS=SPEECH)
    await router.wait_for_agents("steady", timeout=120)
    waiting = asyncio.create_task(call(router, key, "TextToSpeech", {"input": LONG_TEXT, "refId": "through-restart"}))
    await until(router, key, None, lambda s: s.get("jobState") == "Started", timeout=120, refId="through-restart")
    await router.stop()  # a deploy: SIGTERM-like, orderly
    reference = await waiting
    assert reference["jobState"] == "Started", "the waiting sync call answers with the job's reference"
    job_id = reference["jobId"]
    await router.start()
    done = await until(router, key, job_id, finished, timeout=180)
    assert done["jobState"] == "Completed" and done["results"][0]["provider"] == "steady"
    job = _stored(router, job_id)
    assert (job.attempt, job.failures) == (1, 0), "the same attempt, resumed by the new router"


async def test_comfyui_dying_takes_away_only_images_until_it_is_back(router: Router, key: str, agents: Agents) -> None:
    agents.start("mixed", 8, ["tiny.safetensors"], GPUGATE_AGENT__RUNNERS='["comfy", "speech"]')
    await router.wait_for_agents("mixed", timeout=180)
    agent = psutil.Process(agents.procs["mixed"].pid)
    comfy = next(c for c in agent.children() if any("main.py" in part for part in c.cmdline()))
    comfy.kill()
    session = lambda: router.app[SESSIONS].sessions.get("mixed")  # noqa: E731
    await _eventually(lambda: session() is not None and "txt2img" not in session().capabilities, 30)
    assert "text-to-speech" in session().capabilities  # type: ignore[union-attr]
    spoken = await call(router, key, "TextToSpeech", {"input": "Speech while the image engine restarts."})
    assert spoken["results"][0]["provider"] == "mixed"
    await _eventually(lambda: session() is not None and "txt2img" in session().capabilities, 180)
    image = await call(router, key, "TextToImage", {"positivePrompt": "after the crash", "width": 64, "height": 64,
                                                    "model": "tiny.safetensors"})
    assert image["results"][0]["provider"] == "mixed"
    assert agents.procs["mixed"].poll() is None, "the agent never exited"


async def test_a_wedged_comfyui_is_killed_restarted_and_its_job_retried(router: Router, key: str, agents: Agents) -> None:
    agents.start("wedged", 64, ["tiny.safetensors"], GPUGATE_COMFY__LIVENESS_TIMEOUT_S="4",
                 GPUGATE_COMFY__LIVENESS_EVERY_S="1")
    await router.wait_for_agents("wedged", timeout=180)
    comfy = next(c for c in psutil.Process(agents.procs["wedged"].pid).children()
                 if any("main.py" in part for part in c.cmdline()))
    job = await call(router, key, "QueueTextToImage", {"positivePrompt": "frozen", "width": 128, "height": 128,
                                                       "model": "tiny.safetensors"})  # some 4 s on a CPU
    await _running(router, key, job["jobId"])
    comfy.suspend()  # SIGSTOP: alive, holding its job, answering nothing
    try:
        done = await until(router, key, job["jobId"], finished, timeout=600)
    finally:
        if comfy.is_running():
            comfy.resume()
    assert done["jobState"] == "Completed", done
    assert not comfy.is_running() or comfy.status() == psutil.STATUS_ZOMBIE, "the wedged ComfyUI was killed"
    stored = _stored(router, job["jobId"])
    assert stored.attempt == 2 and stored.error is None
    assert "ComfyUI stopped answering; killing it" in (agents.root / "wedged.log").read_text()


async def test_a_full_disk_on_an_agent_is_retried_on_another(router: Router, key: str, agents: Agents,
                                                             tmp_path: Path) -> None:
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-Urm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -Urm (user and mount namespaces) to give an agent a small disk of its own")
    small = tmp_path / "small-disk"
    small.mkdir()
    # the agent's temporary files (where Piper's WAV goes before ffmpeg) on a 256 KiB file system
    wrap = ["unshare", "-Urm", "sh", "-c", f'mount -t tmpfs -o size=256k tmpfs "{small}" && exec "$@"', "sh"]
    agents.start("cramped", 16, [], wrap=wrap, TMPDIR=str(small), GPUGATE_AGENT__RUNNERS=SPEECH)
    agents.start("roomy", 4, [], GPUGATE_AGENT__RUNNERS=SPEECH)
    await router.wait_for_agents("cramped", "roomy", timeout=120)
    job_id = await _speak(router, key, " ".join(LONG_TEXT.split(".")[:8]), fmt="mp3")  # some 8 s: 350 KB of WAV
    done = await until(router, key, job_id, finished, timeout=180)
    assert done["jobState"] == "Completed" and done["results"][0]["provider"] == "roomy"
    stored = _stored(router, job_id)
    assert (stored.attempt, stored.failures, stored.avoid) == (2, 1, ["cramped"]), "first on the fuller GPU, then elsewhere"
    assert "No space left on device" in (agents.root / "cramped.log").read_text()


async def test_an_agent_without_ffmpeg_does_not_offer_media(router: Router, key: str, agents: Agents) -> None:
    agents.start("bare", 4, [], GPUGATE_AGENT__RUNNERS='["speech", "media"]', PATH="/nonexistent")
    await router.wait_for_agents("bare", timeout=120)
    offered = set(router.app[SESSIONS].sessions["bare"].capabilities)
    assert "text-to-speech" in offered and "scale-video" not in offered
    assert "ffmpeg is not installed: media transforms are not offered" in (agents.root / "bare.log").read_text()


async def test_an_agent_of_another_wire_version_is_refused_naming_both(router: Router) -> None:
    hello = {"type": "hello", "version": WIRE_VERSION + 1, "name": "future", "instance": "x", "newer_field": 1}
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{router.url}/agent/ws", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            await ws.send_str(json.dumps(hello))
            refused = json.loads((await ws.receive()).data)
            await ws.receive()
    assert refused["type"] == "refused"
    assert f"wire protocol version {WIRE_VERSION}, the agent {WIRE_VERSION + 1}" in refused["reason"]
    assert ws.close_code == 4426


async def _eventually(predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.1)
