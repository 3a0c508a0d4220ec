"""Models and workflows through the router, end to end: a real router and a real agent with its
ComfyUI on the tiny checkpoint. An AI Server model id gets its family's recipe; a workflow dropped
into the agent's folder is listed, described and run over HTTP (and by `gpugate run`); a UI-format
export runs as its API format does; discovery answers in AI Server's shapes; hopeless calls fail fast."""

from __future__ import annotations

import asyncio
import io
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image

from gpugate.settings import PROJECT_ROOT, Settings
from router.keys import create_key
from router.state import STORE
from tests.conftest import png
from tests.services import Agents, Router, call, finished, router_settings_in, until

CATALOG = """
[models.tiny]
kind = "checkpoints"
file = "tiny.safetensors"
default = true
[models.fast]
kind = "checkpoints"
file = "tiny.safetensors"
family = "flux1-schnell"
aliases = ["flux1-schnell"]
[models.zeta]
kind = "checkpoints"
file = "zeta.safetensors"
[models.voice]
kind = "piper"
file = "en_US-test-voice"
aliases = ["text-to-speech"]
"""
SMALL = {"width": 64, "height": 64}


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), CATALOG, sync_timeout_s="120")


@pytest.fixture(scope="module")
def key(router: Router) -> str:
    return create_key(router.app[STORE], "workflow tests").token


@pytest.fixture(scope="module")
async def agents(router: Router, tmp_path_factory: pytest.TempPathFactory, fixture_models: Path) -> AsyncIterator[Agents]:
    agents = Agents(tmp_path_factory.mktemp("agents"), router.url)
    agents.start("painter", 8.0, ["tiny.safetensors"])
    try:
        await router.wait_for_agents("painter", timeout=120)
        yield agents
    finally:
        agents.stop_all()


async def get(router: Router, key: str, api: str, **query: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{router.url}/api/{api}", params=query, headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status, await r.json()


async def image_at(url: str) -> Image.Image:
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            assert r.status == 200
            return Image.open(io.BytesIO(await r.read())).convert("RGB")


async def served(router: Router, key: str, workflow: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while workflow not in (await get(router, key, "GetComfyWorkflows"))[1]["results"]:
        assert time.monotonic() < deadline, f"{workflow} never listed"
        await asyncio.sleep(0.3)


def form(**parts: Any) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, value in parts.items():
        if isinstance(value, bytes):
            data.add_field(name, value, filename=f"{name}.png", content_type="image/png")
        else:
            data.add_field(name, str(value))
    return data


async def test_an_ai_server_model_id_gets_its_familys_recipe(router: Router, agents: Agents, key: str) -> None:
    queued = await call(router, key, "QueueTextToImage", {"positivePrompt": "a lighthouse", "negativePrompt": "blurry",
                                                          "model": "flux1-schnell", **SMALL, "seed": 3})
    assert queued["notes"] == ["negativePrompt is ignored: FLUX.1 [schnell] takes no negative prompt"]
    done = await until(router, key, queued["jobId"], finished)
    assert done["jobState"] == "Completed", done
    assert (await image_at(done["results"][0]["url"])).size == (64, 64)
    [job] = (await call(router, key, "QueryJobs", {"refId": queued["refId"]}))["jobs"]
    assert job["request"]["steps"] == 4 and job["request"]["cfg"] == 1.0 and job["request"]["scheduler"] == "simple"
    assert "negative_prompt" not in job["request"] and job["notes"] == queued["notes"]


async def test_arguments_reach_the_workflow_and_unknown_ones_are_refused(router: Router, agents: Agents, key: str) -> None:
    answer = await call(router, key, "TextToImage", {"positivePrompt": "p", **SMALL, "arguments": {"steps": 1, "denoise": 1}})
    assert answer["results"][0]["url"]
    refused = await call(router, key, "TextToImage", {"positivePrompt": "p", "arguments": {"steps": 1, "bogus": 2}}, status=400)
    [error] = refused["responseStatus"]["errors"]
    assert error["fieldName"] == "arguments.bogus" and "txt2img takes" in error["message"]
    out_of_range = await call(router, key, "TextToImage", {"positivePrompt": "p", "arguments": {"steps": 0}}, status=400)
    assert out_of_range["responseStatus"]["errors"][0]["fieldName"] == "arguments.steps"


async def test_unknown_models_are_refused_and_hopeless_sync_calls_answer_at_once(router: Router, agents: Agents, key: str) -> None:
    refused = await call(router, key, "TextToImage", {"positivePrompt": "p", "model": "flux1-schnel"}, status=400)
    message = refused["responseStatus"]["message"]
    assert "'flux1-schnel'" in message and "'flux1-schnell'" in message
    started = time.monotonic()
    answer = await call(router, key, "TextToImage", {"positivePrompt": "p", "model": "zeta", **SMALL})  # no agent has it
    assert time.monotonic() - started < 5, "a sync call no agent can take must not wait for the sync timeout (120 s)"
    assert answer["jobState"] == "Queued" and answer["status"] == "no agent has model zeta.safetensors"
    await call(router, key, "CancelJob", {"jobId": answer["jobId"]})


async def test_a_dropped_in_workflow_is_listed_described_and_run_with_an_upload(
        router: Router, agents: Agents, key: str) -> None:
    folder = agents.workflows
    shutil.copy(PROJECT_ROOT / "workflows" / "img2img.json", folder / "recolor.json")
    (folder / "recolor.toml").write_text((PROJECT_ROOT / "workflows" / "img2img.toml").read_text().replace(
        'description = "', 'description = "Recolor: ', 1))
    await served(router, key, "recolor")
    status, info = await get(router, key, "GetComfyWorkflowInfo", workflow="recolor")
    assert status == 200 and info["result"]["agents"] == ["painter"]
    params = info["result"]["parameters"]
    assert params["image"] == {"type": "image", "required": True, "description": params["image"]["description"]}
    assert params["steps"]["min"] == 1 and params["steps"]["default"] == 20
    assert "tiny.safetensors" in params["checkpoint"]["values"] and "euler" in params["sampler"]["values"]
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{router.url}/openapi.json") as r:
            document = await r.json()
    assert "workflow.recolor" in document["components"]["schemas"]
    answer = await call(router, key, "ComfyWorkflow", form(workflow="recolor", image=png(80, 64), prompt="red", steps=1,
                                                           denoise="0.5", checkpoint="flux1-schnell"))  # an alias
    assert (await image_at(answer["results"][0]["url"])).size == (80, 64)
    queued = await call(router, key, "QueueComfyWorkflow", form(workflow="recolor", image=png(64, 64), prompt="red", steps=1))
    assert queued["notes"] == ["checkpoint: the workflow's own 'v1-5-pruned-emaonly-fp16.safetensors' is on no connected "
                               "agent; the catalog's default 'tiny.safetensors' is used"]
    assert (await until(router, key, queued["jobId"], finished))["jobState"] == "Completed"
    refused = await call(router, key, "ComfyWorkflow", form(workflow="recolor", prompt="red", colour=3), status=400)
    assert {e["fieldName"] for e in refused["responseStatus"]["errors"]} == {"colour", "image"}
    refused = await call(router, key, "QueueComfyWorkflow", {"workflow": "nope", "args": {}}, status=400)
    assert "recolor" in refused["responseStatus"]["message"]


async def test_a_ui_format_export_runs_as_its_api_format_does(router: Router, agents: Agents, key: str) -> None:
    for suffix in (".json", ".toml"):
        shutil.copy(PROJECT_ROOT / "tests" / "workflows" / f"txt2img_ui{suffix}", agents.workflows / f"txt2img_ui{suffix}")
    await served(router, key, "txt2img_ui")
    args = {"prompt": "a red square", "width": 64, "height": 64, "steps": 2, "seed": 7, "checkpoint": "tiny.safetensors"}
    images = []
    for workflow in ("txt2img", "txt2img_ui"):
        answer = await call(router, key, "ComfyWorkflow", {"workflow": workflow, "args": args})
        images.append(await image_at(answer["results"][0]["url"]))
    assert images[0].tobytes() == images[1].tobytes()


async def test_discovery_answers_in_ai_servers_shapes(router: Router, agents: Agents, key: str) -> None:
    _, active = await get(router, key, "ActiveMediaModels")
    assert {"tiny", "fast", "flux1-schnell"} <= set(active["results"]) and "zeta" not in active["results"]
    _, media = await get(router, key, "QueryMediaModels", id="flux1-schnell")
    [model] = media["results"]
    assert model["id"] == "fast" and model["apiModels"] == {"painter": "tiny.safetensors"} and model["family"] == "flux1-schnell"
    assert (model["steps"], model["cfgScale"], model["width"], model["negativePrompt"]) == (4, 1.0, 1024, False)
    assert model["supportedTasks"] == ["TextToImage", "ImageToImage", "ImageWithMask"]
    _, everything = await get(router, key, "QueryMediaModels", take=2)
    assert everything["total"] == 3 and len(everything["results"]) == 2
    _, tiny = await get(router, key, "QueryMediaModels", id="tiny")
    assert tiny["results"][0]["family"] == "sd15", "detected by the agent from the file's header"
    _, voices = await get(router, key, "QueryTextToSpeechVoices")
    assert voices["results"] == [{"id": "voice", "model": "en_US-test-voice", "aliases": ["text-to-speech"],
                                  "available": False, "description": ""}]
    _, files = await get(router, key, "GetComfyModels")
    assert "tiny.safetensors" in files["results"]


async def test_gpugate_run_runs_a_served_workflow_through_the_router(router: Router, agents: Agents, key: str,
                                                                     tmp_path: Path) -> None:
    command = [sys.executable, "-m", "gpugate.cli", "run", "txt2img", "--router", router.url, "--key", key,
               "--set", "prompt=a boat", "--set", "width=64", "--set", "height=64", "--set", "steps=1", "--out", str(tmp_path)]
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, timeout=300, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr
    [saved] = done.stdout.split()
    with Image.open(saved) as image:
        assert image.size == (64, 64)
    bad = await asyncio.to_thread(subprocess.run, [c if c != "steps=1" else "steps=0" for c in command],
                                  capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT)
    assert bad.returncode == 1 and "steps: must be between 1 and 150" in bad.stderr, bad.stderr
