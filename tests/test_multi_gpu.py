"""An agent on a several-GPU host: one worker per GPU, each with its own ComfyUI pinned by
CUDA_VISIBLE_DEVICES, reporting only its GPU, so the router places jobs per GPU. The GPUs are a
fake device list from configuration (agent.gpus); the ComfyUIs and the router are real."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest

from agent.gpu import plan_workers, report_devices
from gpugate.settings import load_settings, Settings
from router.keys import create_key
from router.state import SESSIONS, STORE
from tests.services import TINY_CATALOG, Agents, Router, call, router_settings_in

TWO_GPUS = json.dumps([{"name": "small GPU", "vram_total_gb": 8, "vram_free_gb": 1.0},
                       {"name": "big GPU", "vram_total_gb": 24, "vram_free_gb": 4.0}])


def test_one_worker_per_gpu_with_shared_runners_on_the_first() -> None:
    settings = load_settings(environ={"GPUGATE_AGENT__NAME": "box", "GPUGATE_AGENT__GPUS": TWO_GPUS})
    _, devices = report_devices(settings)
    workers = plan_workers(settings, devices, "hostname")
    assert [(w.agent.name, w.agent.gpu, w.agent.runners) for w in workers] == [
        ("box-gpu0", 0, ("comfy", "speech", "media", "chat")), ("box-gpu1", 1, ("comfy", "chat"))]  # chat per GPU too
    assert workers[0].comfy_state_dir != workers[1].comfy_state_dir
    assert [d.name for d in report_devices(workers[1])[1]] == ["big GPU"], "a worker reports only its GPU"
    one = load_settings(environ={"GPUGATE_AGENT__GPUS": TWO_GPUS, "GPUGATE_AGENT__PER_GPU": "false"})
    assert plan_workers(one, devices, "hostname") == [one]
    single = load_settings(environ={"GPUGATE_AGENT__GPUS": TWO_GPUS[:TWO_GPUS.index("},") + 1] + "]"})
    assert plan_workers(single, report_devices(single)[1], "host") == [single]


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory, fixture_models: Path) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), TINY_CATALOG, sync_timeout_s="120")


async def test_each_gpu_gets_its_own_pinned_comfyui_and_jobs_go_to_the_gpu_that_fits(
        router: Router, tmp_path_factory: pytest.TempPathFactory) -> None:
    agents = Agents(tmp_path_factory.mktemp("agents"), router.url)  # their txt2img needs 40 GB per megapixel
    agents.start("box", 0, ["tiny.safetensors"], GPUGATE_AGENT__GPUS=TWO_GPUS)
    try:
        await router.wait_for_agents("box-gpu0", "box-gpu1")
        registry = router.app[SESSIONS].sessions
        assert [d.name for d in registry["box-gpu0"].devices] == ["small GPU"]
        assert [d.name for d in registry["box-gpu1"].devices] == ["big GPU"]
        comfyuis = [p for p in psutil.Process(agents.procs["box"].pid).children(recursive=True)
                    if "main.py" in " ".join(p.cmdline())]
        assert sorted(p.environ().get("CUDA_VISIBLE_DEVICES") for p in comfyuis) == ["0", "1"]
        key = create_key(router.app[STORE], "k").token
        small = await call(router, key, "TextToImage", {"positivePrompt": "fits both", "width": 64, "height": 64})
        big = await call(router, key, "TextToImage", {"positivePrompt": "needs 1.7 GB", "width": 128, "height": 128})
        assert big["results"][0]["provider"] == "box-gpu1", "only the big GPU has the memory"
        assert small["results"][0]["provider"] in ("box-gpu0", "box-gpu1")
    finally:
        agents.stop_all()
