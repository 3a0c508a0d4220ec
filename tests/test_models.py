"""`gpugate models pull` against a real HTTP server on 127.0.0.1: progress, resume after a dropped
connection and after an interrupted run, hash mismatch, 404, gated downloads with a token that is
never printed, and a pulled model showing up in a running agent's advertisement."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from agent.comfy.launch import free_port
from gpugate.settings import PROJECT_ROOT
from router.state import SESSIONS
from tests.services import Agents, Router, router_settings_in

PAYLOAD = os.urandom(3 * 2**20 + 12345)  # a "model": a few MB, so it comes in several chunks
SECRET = "hf_never-print-me"


class ModelServer:
    """Serves PAYLOAD with Range support; /flaky drops the connection halfway through its first answer."""

    def __init__(self) -> None:
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.ranges: list[str | None] = []
        self.dropped = False

    async def model(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["name"] == "gated" and request.headers.get("Authorization") != f"Bearer {SECRET}":
            raise web.HTTPUnauthorized()
        self.ranges.append(request.headers.get("Range"))
        start = int(request.headers["Range"].removeprefix("bytes=").rstrip("-")) if "Range" in request.headers else 0
        body = PAYLOAD[start:]
        response = web.StreamResponse(status=206 if start else 200, headers={"Content-Length": str(len(body))})
        await response.prepare(request)
        if request.match_info["name"] == "flaky" and not self.dropped:
            self.dropped = True
            await response.write(body[:len(body) // 2])
            assert request.transport is not None
            request.transport.close()  # the client sees a short body
            return response
        await response.write(body)
        return response

    async def __aenter__(self) -> ModelServer:
        app = web.Application()
        app.router.add_get("/files/{name}", self.model)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


@pytest.fixture
async def server() -> AsyncIterator[ModelServer]:
    async with ModelServer() as s:
        yield s


def _catalog(path: Path, url: str) -> Path:
    good = hashlib.sha256(PAYLOAD).hexdigest()
    path.write_text(f"""
[models.flaky]
kind = "upscale_models"
file = "flaky.pth"
url = "{url}/files/flaky"
size = {len(PAYLOAD)}
sha256 = "{good}"

[models.steady]
kind = "checkpoints"
file = "steady.safetensors"
url = "{url}/files/steady"
size = {len(PAYLOAD)}
sha256 = "{good}"

[models.tampered]
kind = "checkpoints"
file = "tampered.safetensors"
url = "{url}/files/tampered"
sha256 = "{'0' * 64}"

[models.gone]
kind = "checkpoints"
file = "gone.safetensors"
url = "{url}/nothing/here"
sha256 = "{good}"

[models.gated]
kind = "checkpoints"
file = "gated.safetensors"
url = "{url}/files/gated"
sha256 = "{good}"
token_env = "GPUGATE_TEST_TOKEN"

[models.en_US-test-voice]
kind = "piper"
file = "en_US-test-voice"
[[models.en_US-test-voice.files]]
path = "en_US-test-voice.onnx"
url = "{url}/files/voice"
size = {len(PAYLOAD)}
sha256 = "{good}"
[[models.en_US-test-voice.files]]
path = "en_US-test-voice.onnx.json"
url = "{url}/files/voice-config"
size = {len(PAYLOAD)}
sha256 = "{good}"
""")
    return path


@pytest.fixture
def env(tmp_path: Path, server: ModelServer) -> dict[str, str]:
    return {"GPUGATE_ROUTER__CATALOG": str(_catalog(tmp_path / "catalog.toml", server.url)),
            "GPUGATE_PATHS__MODELS_DIR": str(tmp_path / "models"), "GPUGATE_PATHS__DATA_DIR": str(tmp_path / "data")}


async def gpugate(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gpugate.cli", *args], cwd=PROJECT_ROOT,
                                   env={**os.environ, **env}, capture_output=True, text=True, timeout=120)


async def test_a_pull_shows_progress_resumes_a_dropped_connection_and_places_the_file(
        env: dict[str, str], server: ModelServer, tmp_path: Path) -> None:
    done = await gpugate(env, "models", "pull", "flaky")
    assert done.returncode == 0, done.stderr
    placed = tmp_path / "models" / "upscale_models" / "flaky.pth"
    assert placed.read_bytes() == PAYLOAD and not placed.with_name("flaky.pth.partial").exists()
    assert "100%" in done.stderr and "resuming" in done.stderr
    resumed_at = int(server.ranges[1].removeprefix("bytes=").rstrip("-"))  # type: ignore[union-attr]
    assert server.ranges[0] is None and 0 < resumed_at <= len(PAYLOAD) // 2, "the second request resumes"
    again = await gpugate(env, "models", "pull", "flaky")
    assert again.returncode == 0 and len(server.ranges) == 2, "an installed, verified file is not fetched again"
    listing = (await gpugate(env, "models", "list")).stdout
    assert any(line.startswith("flaky") and "installed" in line for line in listing.splitlines())
    assert any(line.startswith("steady") and "available" in line for line in listing.splitlines())


async def test_an_interrupted_run_resumes_from_the_partial_file(env: dict[str, str], server: ModelServer,
                                                                tmp_path: Path) -> None:
    folder = tmp_path / "models" / "checkpoints"
    folder.mkdir(parents=True)
    (folder / "steady.safetensors.partial").write_bytes(PAYLOAD[:2**20])  # what a killed run left
    done = await gpugate(env, "models", "pull", "steady", "--quiet")
    assert done.returncode == 0, done.stderr
    assert server.ranges == [f"bytes={2**20}-"]
    assert (folder / "steady.safetensors").read_bytes() == PAYLOAD


async def test_a_hash_mismatch_deletes_the_file_and_says_so(env: dict[str, str], tmp_path: Path) -> None:
    done = await gpugate(env, "models", "pull", "tampered", "--quiet")
    assert done.returncode == 1
    assert "does not match the catalog" in done.stderr and "the file was deleted" in done.stderr
    assert list((tmp_path / "models" / "checkpoints").iterdir()) == []


async def test_a_missing_file_and_an_unknown_name_are_clear_errors(env: dict[str, str]) -> None:
    gone = await gpugate(env, "models", "pull", "gone", "--quiet")
    assert gone.returncode == 1 and "HTTP 404" in gone.stderr
    unknown = await gpugate(env, "models", "pull", "no-such-model")
    assert unknown.returncode == 2 and "not in the catalog: no-such-model" in unknown.stderr


async def test_a_gated_download_uses_the_token_from_the_environment_and_never_prints_it(
        env: dict[str, str], tmp_path: Path) -> None:
    refused = await gpugate(env, "models", "pull", "gated", "--quiet")
    assert refused.returncode == 1 and "HTTP 401" in refused.stderr
    done = await gpugate({**env, "GPUGATE_TEST_TOKEN": SECRET}, "--log-level", "DEBUG", "models", "pull", "gated")
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout + done.stderr and "$GPUGATE_TEST_TOKEN" in done.stderr
    assert (tmp_path / "models" / "checkpoints" / "gated.safetensors").is_file()


async def test_a_pulled_voice_appears_in_the_running_agents_advertisement(env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "router").mkdir()
    router = Router(router_settings_in(tmp_path / "router"))
    await router.start()
    agents = Agents(tmp_path / "agents", router.url)
    try:
        agents.start("speaker", 4, [], GPUGATE_AGENT__RUNNERS='["speech"]',
                     GPUGATE_PATHS__MODELS_DIR=env["GPUGATE_PATHS__MODELS_DIR"])
        await router.wait_for_agents("speaker")
        voices = lambda: {m.name for m in router.app[SESSIONS].sessions["speaker"].models if m.kind == "piper"}  # noqa: E731
        assert voices() == {"en_US-joe-medium"}
        done = await gpugate(env, "models", "pull", "en_US-test-voice", "--quiet")
        assert done.returncode == 0, done.stderr
        deadline = time.monotonic() + 20
        while "en_US-test-voice" not in voices():
            assert time.monotonic() < deadline, "the agent never advertised the pulled voice"
            await asyncio.sleep(0.2)
    finally:
        agents.stop_all()
        await router.stop()


def test_the_shipped_catalog_lists_the_well_known_models_each_with_size_and_hash() -> None:
    from gpugate.catalog import Catalog

    catalog = Catalog.load(PROJECT_ROOT / "models" / "catalog.toml")
    pullable = {name: e for name, e in catalog.entries.items() if e.files}
    assert {"sd15", "sdxl-base", "flux1-schnell-fp8", "sd3.5-medium", "realesrgan-x2", "realesrgan-x4",
            "whisper-tiny", "whisper-base", "whisper-small", "whisper-medium", "whisper-large-v3"} <= set(pullable)
    assert sum(e.kind == "piper" for e in pullable.values()) >= 3
    placed = [(e.kind, f.path) for e in pullable.values() for f in e.files]
    assert len(placed) == len(set(placed)), "no two entries write the same file"
    for entry in pullable.values():
        assert entry.vram_gb and entry.description
        assert all(f.url.startswith("https://") for f in entry.files)
    assert catalog.entries["sd3.5-medium"].token_env == "HF_TOKEN", "the gated one asks for a token"
    assert all(f.size for name in ("sd15", "sdxl-base", "flux1-schnell-fp8", "whisper-large-v3")
               for f in catalog.entries[name].files)
