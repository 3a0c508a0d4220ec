"""`gpugate up` (what `make run` starts) and `gpugate keys`, as a person runs them."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import psutil

from agent.comfy.launch import free_port
from gpugate.settings import PROJECT_ROOT
from tests.model_fixtures import CHECKPOINT


def gpugate_env(tmp_path: Path, models_dir: Path) -> dict[str, str]:
    return {**os.environ, "GPUGATE_PATHS__DATA_DIR": str(tmp_path / "data"), "GPUGATE_PATHS__MODELS_DIR": str(models_dir),
            "GPUGATE_ROUTER__PORT": str(free_port("127.0.0.1")), "GPUGATE_COMFY__DEVICE": "cpu"}


async def test_up_serves_the_api_with_a_local_agent_until_stopped(tmp_path: Path, models_dir: Path) -> None:
    env = gpugate_env(tmp_path, models_dir)
    up = subprocess.Popen([sys.executable, "-m", "gpugate.cli", "up"], cwd=PROJECT_ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        lines = []
        assert up.stdout is not None
        for line in up.stdout:
            lines.append(line)
            if "joined router" in line:
                break
        text = "".join(lines)
        url = re.search(r"gpugate router: (http://127\.0\.0\.1:\d+)", text).group(1)  # type: ignore[union-attr]
        key = re.search(r"admin key: (gg_\S+)", text).group(1)  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as http:
            async with http.post(f"{url}/api/TextToImage", headers={"Authorization": f"Bearer {key}"},
                                 json={"positivePrompt": "a lighthouse", "width": 64, "height": 64, "model": CHECKPOINT}) as r:
                answer = await r.json()
            assert r.status == 200 and len(answer["results"]) == 1, answer
            headers = {"Authorization": f"Bearer {key}"}
            async with http.post(f"{url}/api/TextToSpeech", headers=headers, json={"input": "Speech works."}) as r:
                spoken = await r.json()
            async with http.get(spoken["results"][0]["url"], headers=headers) as r:
                audio = await r.read()
            form = aiohttp.FormData()
            form.add_field("audio", audio, filename="speech.wav", content_type="audio/wav")
            async with http.post(f"{url}/api/SpeechToText", headers=headers, data=form) as r:
                heard = await r.json()
        assert "speech works" in heard["results"][0]["text"].lower(), "speech out of the box, packaged model and voice"
    finally:
        up.send_signal(signal.SIGTERM)
        rest, _ = up.communicate(timeout=60)
    assert up.returncode == 0, rest
    again = (tmp_path / "data" / "admin_key").read_text().strip()
    assert again == key, "the admin key is kept for the next `gpugate up`"


def test_keys_create_list_revoke(tmp_path: Path, models_dir: Path) -> None:
    env = gpugate_env(tmp_path, models_dir)

    def gpugate(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gpugate.cli", "keys", *args], cwd=PROJECT_ROOT, env=env,
                              capture_output=True, text=True)

    made = gpugate("create", "--name", "mobile app", "--apis", "TextToImage,ImageUpscale")
    assert made.returncode == 0
    key_id, token = re.search(r"^key (\d+) \(TextToImage, ImageUpscale\): (gg_\S+)$", made.stdout, re.M).groups()  # type: ignore[union-attr]
    assert re.search(r"^webhook secret .*: whsec_[A-Za-z0-9+/=]{32}$", made.stdout, re.M)
    listed = gpugate("list").stdout
    assert f"{token[:10]}..." in listed and "mobile app" in listed and token not in listed
    assert gpugate("revoke", key_id).returncode == 0
    assert "revoked" in gpugate("list").stdout
    assert gpugate("revoke", key_id).returncode == 2


async def test_up_keeps_its_router_when_the_local_agent_dies_and_starts_the_agent_again(
        tmp_path: Path, models_dir: Path) -> None:
    env = {**gpugate_env(tmp_path, models_dir), "GPUGATE_AGENT__RUNNERS": '["speech"]'}
    up = subprocess.Popen([sys.executable, "-m", "gpugate.cli", "up"], cwd=PROJECT_ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert up.stdout is not None
    seen: list[str] = []

    def read_until(marker: str, count: int) -> None:
        for line in up.stdout:  # type: ignore[union-attr]
            seen.append(line)
            if sum(marker in s for s in seen) >= count:
                return
        raise AssertionError("gpugate up ended:\n" + "".join(seen[-40:]))

    try:
        await asyncio.to_thread(read_until, "joined router", 1)
        text = "".join(seen)
        url = re.search(r"gpugate router: (http://127\.0\.0\.1:\d+)", text).group(1)  # type: ignore[union-attr]
        key = re.search(r"admin key: (gg_\S+)", text).group(1)  # type: ignore[union-attr]
        [agent] = [p for p in psutil.Process(up.pid).children() if "agent" in p.cmdline()]
        agent.kill()  # what the OOM killer does
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{url}/health") as r:
                assert r.status == 200, "the router stays up"
            await asyncio.to_thread(read_until, "joined router", 2)
            assert "local agent exited; starting it again" in "".join(seen)
            async with http.post(f"{url}/api/TextToSpeech", headers={"Authorization": f"Bearer {key}"},
                                 json={"input": "Back again."}) as r:
                assert r.status == 200, await r.text()
        assert up.poll() is None
    finally:
        up.send_signal(signal.SIGTERM)
        rest, _ = up.communicate(timeout=90)
    assert up.returncode == 0, rest
