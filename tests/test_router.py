"""A real router and real agents (each a `gpugate agent` process with its own ComfyUI) on loopback.

The agents report small, different VRAM figures (agent.gpus in their settings) and have different
model files, so the scheduling rules run for real on a CPU-only machine:

    agent   free VRAM   checkpoints
    a       1.8 GB      model-x, shared
    b       2.0 GB      model-y, shared
    c       4.0 GB      shared, model-z      (joins late, in the test that needs it)

Their txt2img declares 40 GB per output megapixel (a workflow's own VRAM estimate), so by the
router's estimate a 64x64 job needs about 1.2 GB, 128x128 about 1.7 GB, and 64x64 x10 about
2.7 GB: too big for a and b, and still cheap to run on a CPU.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from gpugate.settings import Settings
from router.keys import create_key
from router.state import SESSIONS, STORE
from tests.conftest import png
from tests.model_fixtures import UPSCALER
from tests.services import TOKEN, Agents, Router, call, finished, router_settings_in, status, until

SMALL = {"width": 64, "height": 64}

@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory, fixture_models: Path) -> Settings:
    catalog = ('[models.tiny]\nkind = "checkpoints"\nfile = "shared.safetensors"\ndefault = true\n'
               '[models.zeta]\nkind = "checkpoints"\nfile = "model-z.safetensors"\n'  # no agent has it at first
               f'[models.upscaler]\nkind = "upscale_models"\nfile = "{UPSCALER}"\ndefault = true\n')
    return router_settings_in(tmp_path_factory.mktemp("router"), catalog, sync_timeout_s="120", heartbeat_timeout_s="6",
                              lease_grace_s="2", echo_api="true", max_upload_mb="1")


@pytest.fixture(scope="module")
def keys(router: Router) -> dict[str, str]:
    store = router.app[STORE]
    return {"admin": create_key(store, "admin", admin=True).token,
            "upscale_only": create_key(store, "limited", apis=("ImageUpscale",)).token}


@pytest.fixture(scope="module")
def agent_procs(router: Router, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    agents = Agents(tmp_path_factory.mktemp("agents"), router.url)
    yield agents
    agents.stop_all()


@pytest.fixture(scope="module")
async def agents_ab(router: Router, agent_procs: Agents, keys: dict[str, str]) -> Agents:
    """Agent a joins and runs a job on `shared` (so it has it loaded); then agent b joins."""
    agent_procs.start("a", 1.8, ["model-x.safetensors", "shared.safetensors"])
    await router.wait_for_agents("a")
    answer = await call(router, keys["admin"], "TextToImage", {"positivePrompt": "warm up", **SMALL})
    assert answer["results"][0]["provider"] == "a"
    agent_procs.start("b", 2.0, ["model-y.safetensors", "shared.safetensors"])
    await router.wait_for_agents("a", "b")
    async with asyncio.timeout(30):  # a heartbeat reports what a has loaded
        while "shared.safetensors" not in router.app[SESSIONS].sessions["a"].loaded:
            await asyncio.sleep(0.1)
    return agent_procs


# ---- API contract ----------------------------------------------------------------------------------


async def test_keys_are_required_and_limited(router: Router, keys: dict[str, str]) -> None:
    none = await call(router, None, "TextToImage", {"positivePrompt": "x"}, status=401)
    assert none["responseStatus"]["errorCode"] == "Unauthorized"
    wrong = await call(router, "gg_not-a-real-key", "TextToImage", {"positivePrompt": "x"}, status=401)
    assert wrong["responseStatus"]["errorCode"] == "Unauthorized"
    limited = await call(router, keys["upscale_only"], "QueueTextToImage", {"positivePrompt": "x"}, status=403)
    assert limited["responseStatus"] == {"errorCode": "Forbidden", "message": "this key may not call QueueTextToImage",
                                         "errors": []}
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{router.url}/health") as r:
            assert r.status == 200
        async with http.get(f"{router.url}/artifacts/{'0' * 64}.png") as r:
            assert r.status == 401


async def test_bad_requests_get_ai_servers_error_shape(router: Router, keys: dict[str, str]) -> None:
    answer = await call(router, keys["admin"], "TextToImage", {"width": 4000, "batchSize": 0}, status=400)
    errors = {e["fieldName"]: e for e in answer["responseStatus"]["errors"]}
    assert set(errors) == {"positivePrompt", "width", "batchSize"}
    assert errors["positivePrompt"]["errorCode"] == "NotEmpty"
    assert errors["width"] == {"errorCode": "InclusiveBetween", "fieldName": "width",
                               "message": "Input should be less than or equal to 2048"}
    unknown = await call(router, keys["admin"], "TextToImage", {"positivePrompt": "x", "model": "nope"}, status=400)
    assert unknown["responseStatus"]["errors"][0]["fieldName"] == "model"


async def test_an_upload_that_is_not_an_image_is_refused(router: Router, keys: dict[str, str]) -> None:
    form = aiohttp.FormData()
    form.add_field("image", b"%PDF-1.4 not an image", filename="doc.png", content_type="image/png")
    answer = await call(router, keys["upscale_only"], "ImageUpscale", form, status=400)
    assert answer["responseStatus"]["errors"] == [
        {"errorCode": "InvalidImage", "fieldName": "image", "message": "is not an image (PNG, JPEG, WebP, ...)"}]
    text = await call(router, keys["upscale_only"], "ImageUpscale", {"image": "aGVsbG8="}, status=400)
    assert "multipart/form-data" in text["responseStatus"]["errors"][0]["message"]


async def test_an_upload_over_the_limit_is_refused_naming_the_part(router: Router, keys: dict[str, str]) -> None:
    form = aiohttp.FormData()
    form.add_field("image", io.BytesIO(png(8, 8) + bytes(3 * 2**19)), filename="big.png", content_type="image/png")
    answer = await call(router, keys["upscale_only"], "ImageUpscale", form, status=413)
    assert answer["responseStatus"]["errorCode"] == "RequestEntityTooLarge"
    assert answer["responseStatus"]["message"] == "image: larger than 1 MB"


async def test_the_whole_request_and_its_parts_are_limited(router: Router, keys: dict[str, str]) -> None:
    """Each file under the 1 MB limit, but many of them: refused as soon as the total passes its limit."""
    many = aiohttp.FormData()
    for i in range(8):
        many.add_field(f"extra{i}", io.BytesIO(bytes(900_000)), filename=f"{i}.bin", content_type="image/png")
    answer = await call(router, keys["upscale_only"], "ImageUpscale", many, status=413)
    assert answer["responseStatus"]["message"] == "the request is larger than 3 MB in all"
    answer = await call(router, keys["upscale_only"], "ImageUpscale", text_parts({f"field{i}": "x" for i in range(40)}),
                        status=413)
    assert answer["responseStatus"]["message"] == "the request has more than 32 parts"
    answer = await call(router, keys["admin"], "TextToImage", text_parts({"positivePrompt": "x" * (2**20 + 1)}),
                        status=413)
    assert answer["responseStatus"]["message"] == "positivePrompt: the text fields are larger than 1 MB in all"
    assert not list((router.settings.artifacts_dir / "incoming").iterdir()), "nothing of them was kept"


def text_parts(fields: dict[str, str]) -> aiohttp.MultipartWriter:
    """A multipart body of text fields only (aiohttp's FormData would send these urlencoded)."""
    writer = aiohttp.MultipartWriter("form-data")
    for name, value in fields.items():
        writer.append(io.BytesIO(value.encode()), {"Content-Type": "text/plain"}).set_content_disposition(
            "form-data", name=name)
    return writer


async def test_an_agent_without_comfyui_serves_echo_jobs(router: Router, agent_procs: Agents, keys: dict[str, str]) -> None:
    agent_procs.start("echo", 1.0, [], GPUGATE_AGENT__RUNNERS='["echo"]', GPUGATE_AGENT__CONCURRENCY="4")
    await router.wait_for_agents("echo", timeout=30)
    answer = await call(router, keys["admin"], "Echo", {"text": "hello"})
    assert answer == {"results": [{"text": "hello"}], "responseStatus": None}
    queued = await call(router, keys["admin"], "QueueEcho", {"text": "again"})
    assert queued["statusUrl"].endswith(f"/api/GetTextGenerationStatus?jobId={queued['jobId']}")
    done = await until(router, keys["admin"], queued["jobId"], finished)
    assert done["results"] == [{"text": "again"}]


async def test_a_silent_agents_job_goes_back_to_the_queue(router: Router, keys: dict[str, str]) -> None:
    """Connected (its socket answers pings) but no heartbeat: after heartbeat_timeout_s it is lost."""
    from gpugate.wire import Capability, Device, Hello, Model, Pull

    hello = Hello(name="silent", instance="silent-1", cpu_only=False, devices=[Device(index=0, name="gpu", vram_total=8 * 2**30, vram_free=8 * 2**30)],
                  models=[Model(kind="checkpoints", name="only-silent.safetensors", size=1)],
                  capabilities=[Capability(name="txt2img", model_kind="checkpoints")], concurrency=1)
    async with aiohttp.ClientSession() as http:
        async with http.ws_connect(f"{router.url}/agent/ws", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            await ws.send_str(hello.model_dump_json())
            await ws.receive()  # welcome
            await ws.send_str(Pull(slots=1).model_dump_json())
            job = await call(router, keys["admin"], "QueueTextToImage",
                             {"positivePrompt": "x", "model": "only-silent.safetensors", **SMALL})
            offer = json.loads((await ws.receive()).data)
            assert offer["type"] == "job" and offer["job_id"] == job["jobId"]
            started = time.monotonic()
            reading = asyncio.create_task(ws.receive())  # keeps answering pings: only heartbeats are missing
            back = await until(router, keys["admin"], job["jobId"], lambda s: s["jobState"] == "Queued", timeout=30)
            waited = router.settings.router.heartbeat_timeout_s + router.settings.router.lease_grace_s
            assert time.monotonic() - started >= waited - 2.5, "disconnected when silent, given up when it did not return"
            await reading  # the router closed the connection
    assert not back["status"].startswith("running"), back


async def test_a_crashing_runner_still_answers_and_the_job_ends(router: Router, keys: dict[str, str]) -> None:
    """A bug in a runner (not a JobFailed) must fail the job with a message, never leave it running."""
    from agent.link import RouterLink
    from gpugate.wire import Capability

    class Crashing:
        def capabilities(self) -> list[Capability]:
            return [Capability(name="scale-video", vram_base=0, vram_per_megapixel=0)]

        async def models(self) -> list:
            return []

        def loaded(self) -> list[str]:
            return []

        async def run(self, *args: object) -> None:
            raise RuntimeError("a bug in a runner")

    settings = router.settings.model_copy(update={"agent": router.settings.agent.model_copy(
        update={"name": "crashing", "router_url": router.url, "token": TOKEN, "gpus": ()})})
    stop = asyncio.Event()
    link = asyncio.create_task(RouterLink(settings, [Crashing()]).run(stop))
    try:
        await router.wait_for_agents("crashing", timeout=30)
        form = aiohttp.FormData()
        form.add_field("video", b"any bytes", filename="v.mp4")
        form.add_field("width", "64")
        form.add_field("height", "64")
        answer = await call(router, keys["admin"], "ScaleVideo", form, status=500)
        assert answer["responseStatus"]["errorCode"] == "ExecutionError"
        assert "the agent failed: RuntimeError: a bug in a runner" in answer["responseStatus"]["message"]
    finally:
        stop.set()
        await link


# ---- scheduling -------------------------------------------------------------------------------------


async def test_a_job_goes_to_the_agent_that_has_its_model(router: Router, agents_ab: Agents, keys: dict[str, str]) -> None:
    for model, agent in (("model-x.safetensors", "a"), ("model-y.safetensors", "b")):
        answer = await call(router, keys["admin"], "TextToImage", {"positivePrompt": "x", "model": model, **SMALL})
        assert answer["results"][0]["provider"] == agent


async def test_jobs_for_a_loaded_model_go_where_it_is_loaded(router: Router, agents_ab: Agents, keys: dict[str, str]) -> None:
    # b has more free VRAM, but a has `shared` loaded: a wins
    answer = await call(router, keys["admin"], "TextToImage", {"positivePrompt": "x", "model": "tiny", **SMALL})
    assert answer["results"][0]["provider"] == "a"


async def test_sync_queued_and_ref_id_calls(router: Router, agents_ab: Agents, keys: dict[str, str]) -> None:
    key = keys["admin"]
    queued = await call(router, key, "QueueTextToImage", {"positivePrompt": "x", "refId": "my-ref-1", "batchSize": 2, **SMALL})
    assert queued["refId"] == "my-ref-1" and queued["jobState"] == "Queued"
    assert queued["statusUrl"].endswith(f"/api/GetArtifactGenerationStatus?jobId={queued['jobId']}")
    done = await until(router, key, queued["jobId"], finished)
    by_ref = await status(router, key, refId="my-ref-1")
    assert done["jobState"] == by_ref["jobState"] == "Completed" and by_ref["jobId"] == queued["jobId"]
    assert len(done["results"]) == 2
    again = await call(router, key, "QueueTextToImage", {"positivePrompt": "x", "refId": "my-ref-1", **SMALL})
    assert again["jobId"] == queued["jobId"], "a retried request with the same refId is the same job"

    form = aiohttp.FormData()
    form.add_field("image", png(24, 16), filename="in.png", content_type="image/png")
    upscaled = await call(router, keys["upscale_only"], "ImageUpscale", form)
    async with aiohttp.ClientSession() as http:
        url = upscaled["results"][0]["url"]
        async with http.get(url, headers={"Authorization": f"Bearer {key}"}) as r:
            assert Image.open(io.BytesIO(await r.read())).size == (48, 32)
    assert (await status(router, keys["upscale_only"], jobId=queued["jobId"]))["responseStatus"]["errorCode"] == "NotFound"


async def test_image_to_image_and_image_with_mask(router: Router, agents_ab: Agents, keys: dict[str, str]) -> None:
    form = aiohttp.FormData()
    form.add_field("image", png(80, 64), filename="in.png", content_type="image/png")
    form.add_field("positivePrompt", "watercolour")
    form.add_field("batchSize", "2")
    form.add_field("model", "tiny")
    answer = await call(router, keys["admin"], "ImageToImage", form)
    assert len(answer["results"]) == 2
    masked = aiohttp.FormData()
    masked.add_field("image", png(64, 64), filename="in.png", content_type="image/png")
    masked.add_field("mask", png(64, 64, (255, 255, 255)), filename="mask.png", content_type="image/png")
    masked.add_field("PositivePrompt", "a door")  # any case is accepted
    answer = await call(router, keys["admin"], "ImageWithMask", masked)
    async with aiohttp.ClientSession() as http:
        async with http.get(answer["results"][0]["url"], headers={"Authorization": f"Bearer {keys['admin']}"}) as r:
            assert Image.open(io.BytesIO(await r.read())).size == (64, 64)
    mismatch = aiohttp.FormData()
    mismatch.add_field("image", png(64, 64), filename="in.png", content_type="image/png")
    mismatch.add_field("mask", png(32, 32), filename="mask.png", content_type="image/png")
    refused = await call(router, keys["admin"], "ImageWithMask", mismatch, status=400)
    assert refused["responseStatus"]["errors"][0]["fieldName"] == "mask"
    assert "must be the same size as image (64x64), got 32x32" in refused["responseStatus"]["message"]


async def test_unplaceable_jobs_wait_with_a_reason_survive_a_restart_and_run_when_a_capable_agent_joins(
        router: Router, agents_ab: Agents, keys: dict[str, str]) -> None:
    key = keys["admin"]
    big = await call(router, key, "QueueTextToImage", {"positivePrompt": "big", **SMALL, "batchSize": 10})
    z = await call(router, key, "QueueTextToImage", {"positivePrompt": "z", "model": "zeta", **SMALL})
    big_status = await until(router, key, big["jobId"], lambda s: s["status"] != "Queued", timeout=10)
    assert big_status["jobState"] == "Queued"
    # agent a has the model loaded, so it needs only the output's memory there: 2.1 GB, not 2.7 with the model
    assert big_status["status"] == "needs about 2.1 GB VRAM, the most free is 2.0 GB"
    assert (await status(router, key, jobId=z["jobId"]))["status"] == "no agent has model model-z.safetensors"

    await router.stop()  # a router restart with queued jobs loses none
    await router.start()
    for job in (big, z):
        assert (await status(router, key, jobId=job["jobId"]))["jobState"] == "Queued"

    agents_ab.start("c", 4.0, ["shared.safetensors", "model-z.safetensors"])
    for job in (big, z):
        answer = await until(router, key, job["jobId"], finished)
        assert answer["jobState"] == "Completed" and answer["results"][0]["provider"] == "c"
    assert len((await status(router, key, jobId=big["jobId"]))["results"]) == 10


async def test_a_killed_agents_job_completes_on_another(router: Router, agents_ab: Agents, keys: dict[str, str]) -> None:
    key = keys["admin"]
    await router.wait_for_agents("a", "b", "c")
    job = await call(router, key, "QueueTextToImage", {"positivePrompt": "long", "model": "tiny", "width": 128,
                                                        "height": 128, "refId": "long-one"})
    running = await until(router, key, job["jobId"], lambda s: s["jobState"] != "Queued")
    assert running["jobState"] == "Started", running  # on its agent now: kill that agent mid-job
    victim = running["status"].split()[2].rstrip(":")
    agents_ab.kill(victim)
    done = await until(router, key, job["jobId"], finished)
    assert done["jobState"] == "Completed", done
    assert done["results"][0]["provider"] not in (victim,)
