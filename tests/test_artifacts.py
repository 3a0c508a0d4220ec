"""Result files the way clients use them, on a real router and a real agent (ComfyUI and Piper):
signed URLs that work with no header, who may fetch and delete what, variants, and downloads."""

from __future__ import annotations

import asyncio
import io
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.error import HTTPError
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest
from PIL import Image

from gpugate.settings import Settings
from router.keys import create_key
from router.state import ARTIFACTS, SIGNER, STORE
from router.store import JobQuery
from router.urls import file_path
from tests.conftest import png
from tests.services import Agents, Router, call, router_settings_in, status

TTL = 7 * 86400


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), sync_timeout_s="120", max_variant_side="512")


@pytest.fixture(scope="module")
def keys(router: Router) -> dict[str, Any]:
    store = router.app[STORE]
    return {"a": create_key(store, "client a"), "b": create_key(store, "client b"),
            "admin": create_key(store, "admin", admin=True)}


@pytest.fixture(scope="module")
async def agent(router: Router, tmp_path_factory: pytest.TempPathFactory, fixture_models: Path) -> Iterator[Agents]:
    agents = Agents(tmp_path_factory.mktemp("agents"), router.url)
    agents.start("painter", 8, ["tiny.safetensors"], GPUGATE_AGENT__RUNNERS='["comfy", "speech"]')
    try:
        await router.wait_for_agents("painter", timeout=180)
        yield agents
    finally:
        agents.stop_all()


async def scaled(router: Router, key: Any, width: int = 64, height: int = 48) -> str:
    """A finished ScaleImage job's result URL (the router runs it itself)."""
    form = aiohttp.FormData()
    form.add_field("image", io.BytesIO(png(128, 96)), filename="in.png", content_type="image/png")
    form.add_field("width", str(width))
    form.add_field("height", str(height))
    return (await call(router, key.token, "ScaleImage", form))["results"][0]["url"]


def fetch(url: str, key: Any = None) -> tuple[int, dict[str, str], bytes]:
    """A plain GET as a browser, a CDN or AI Server's GetBytesFromUrl() makes it (urllib, no session)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key.token}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:  # noqa: S310 - loopback
            return r.status, dict(r.headers), r.read()
    except HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def unsigned(url: str) -> str:
    return url.split("?", 1)[0]


def name_of(url: str) -> str:
    return unsigned(url).rsplit("/", 1)[1]


async def test_results_open_with_no_header_as_ai_servers_clients_fetch_them(router: Router, agent: Agents,
                                                                           keys: dict[str, Any]) -> None:
    image = await call(router, keys["a"].token, "TextToImage", {"positivePrompt": "a harbour", "width": 64, "height": 64,
                                                                "model": "tiny.safetensors"})
    code, headers, body = await asyncio.to_thread(fetch, image["results"][0]["url"])
    assert code == 200 and Image.open(io.BytesIO(body)).size == (64, 64)
    assert headers["Cache-Control"].startswith("public, max-age=") and int(
        headers["Cache-Control"].split("=")[1].split(",")[0]) > TTL - 60, "a CDN may keep it until it expires"
    speech = await call(router, keys["a"].token, "TextToSpeech", {"input": "Signed and delivered."})
    code, _, audio = await asyncio.to_thread(fetch, speech["results"][0]["url"])
    assert code == 200 and audio[:4] == b"RIFF"
    _, headers, _ = await asyncio.to_thread(fetch, f"{image['results'][0]['url']}&download=true")
    assert headers["Content-Disposition"] == 'attachment; filename="txt2img_00001_.png"'


async def test_status_look_ups_hand_out_freshly_signed_urls(router: Router, keys: dict[str, Any]) -> None:
    url = await scaled(router, keys["a"])
    job_id = next(j for j in router.app[STORE].find_jobs(JobQuery(limit=3)) if j.api == "ScaleImage").id
    await asyncio.sleep(1.1)
    again = (await status(router, keys["a"].token, jobId=job_id))["results"][0]["url"]
    assert unsigned(again) == unsigned(url)
    assert int(parse_qs(urlsplit(again).query)["exp"][0]) > int(parse_qs(urlsplit(url).query)["exp"][0])


async def test_an_altered_forged_or_expired_url_is_refused_saying_which(router: Router, keys: dict[str, Any]) -> None:
    url = await scaled(router, keys["a"])
    other = await scaled(router, keys["a"])
    query = urlsplit(url).query
    signer = router.app[SIGNER]
    stale = f"{unsigned(url)}?{signer.query(file_path(name_of(url)), time.time() - TTL - 60)}"
    cases = {
        f"{unsigned(other)}?{query}": "does not match its path and expiry",  # another file, this file's signature
        url.replace("sig=", "sig=x"): "does not match its path and expiry",
        url.replace("exp=", "exp=1"): "does not match its path and expiry",
        stale: "the signed URL expired at",
        url.split("&sig=")[0]: "not completely signed",
    }
    for bad, reason in cases.items():
        code, _, body = await asyncio.to_thread(fetch, bad)
        assert code == 403 and reason.encode() in body, (bad, body)


async def test_a_key_sees_and_deletes_only_its_own_files_and_an_admin_all(router: Router, keys: dict[str, Any]) -> None:
    url = await scaled(router, keys["a"])
    plain = unsigned(url)
    assert (await asyncio.to_thread(fetch, plain))[0] == 401, "no signature, no key"
    code, headers, _ = await asyncio.to_thread(fetch, plain, keys["a"])
    assert code == 200 and headers["Cache-Control"].startswith("private")
    assert (await asyncio.to_thread(fetch, plain, keys["b"]))[0] == 404, "another key's file does not exist for b"
    assert (await asyncio.to_thread(fetch, plain, keys["admin"]))[0] == 200

    refused = await call(router, keys["b"].token, "DeleteFiles", {"paths": [url]})
    assert refused == {"deleted": [], "missing": [], "failed": [url]}
    assert (await asyncio.to_thread(fetch, url))[0] == 200, "still there"
    done = await call(router, keys["a"].token, "DeleteFiles", {"paths": [url, f"/artifacts/{'0' * 64}.png", "nonsense"]})
    assert done == {"deleted": [url], "missing": [f"/artifacts/{'0' * 64}.png", "nonsense"], "failed": []}
    assert (await asyncio.to_thread(fetch, url))[0] == 404, "gone, signed URL or not"

    by_admin = await scaled(router, keys["b"])
    async with aiohttp.ClientSession() as http:
        async with http.delete(f"{router.url}/api/DeleteFile", params={"path": by_admin},
                               headers={"Authorization": f"Bearer {keys['admin'].token}"}) as r:
            assert r.status == 200 and (await r.json())["deleted"] == [by_admin]


async def test_a_file_a_live_job_needs_cannot_be_deleted(router: Router, keys: dict[str, Any]) -> None:
    form = aiohttp.FormData()  # no agent runs videos here: the job waits, and needs its upload
    form.add_field("video", b"\x00" * 1024, filename="v.mp4", content_type="video/mp4")
    form.add_field("width", "64")
    form.add_field("height", "64")
    queued = await call(router, keys["a"].token, "QueueScaleVideo", form)
    upload = (await call(router, keys["a"].token, "QueryJobs", {"refId": queued["refId"]}))["jobs"][0]["inputs"]["video"]
    answer = await call(router, keys["a"].token, "DeleteFile", {"path": upload})
    assert answer["failed"] == [upload]
    await call(router, keys["a"].token, "CancelJob", {"jobId": queued["jobId"]})


async def test_variants_are_webp_of_the_size_asked_made_once_and_go_with_their_file(router: Router,
                                                                                  keys: dict[str, Any]) -> None:
    url = await scaled(router, keys["a"], 64, 48)
    base, query = unsigned(url).replace("/artifacts/", "/variants/{}/"), urlsplit(url).query
    for variant, size in (("width=32", (32, 24)), ("height=12", (16, 12)), ("width=40,height=10", (40, 10))):
        code, headers, body = await asyncio.to_thread(fetch, f"{base.format(variant)}?{query}")
        assert code == 200 and headers["Content-Type"] == "image/webp", body[:200]
        image = Image.open(io.BytesIO(body))
        assert (image.format, image.size) == ("WEBP", size)
    cached = router.app[ARTIFACTS].variant_path(name_of(url), 32, None)
    made = cached.stat().st_mtime_ns
    assert (await asyncio.to_thread(fetch, f"{base.format('width=32')}?{query}"))[0] == 200
    assert cached.stat().st_mtime_ns == made, "the second request is served from the cache"

    too_big = await asyncio.to_thread(fetch, f"{base.format('width=100000')}?{query}")
    assert too_big[0] == 400 and b"from 1 to 512" in too_big[2]
    assert (await asyncio.to_thread(fetch, f"{base.format('depth=3')}?{query}"))[0] == 400

    await call(router, keys["a"].token, "DeleteFile", {"path": url})
    assert not cached.parent.exists(), "its variants went with it"
    assert (await asyncio.to_thread(fetch, f"{base.format('width=32')}?{query}"))[0] == 404


async def test_download_answers_an_attachment_with_a_readable_name(router: Router, keys: dict[str, Any]) -> None:
    url = await scaled(router, keys["a"])
    code, headers, _ = await asyncio.to_thread(fetch, f"{url}&download=true")
    assert code == 200 and headers["Content-Disposition"] == 'attachment; filename="scale-image.png"'
