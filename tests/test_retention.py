"""The file store's lifetime on a real router: retention, orphans, the free-space floor, and refIds
that outlive archiving. The jobs are image transforms the router runs itself (no agent needed)."""

from __future__ import annotations

import asyncio
import io
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gpugate.settings import Settings
from router.archive import archive_finished
from router.keys import create_key
from router.state import ARCHIVE, ARTIFACTS, FINDER, STORE
from router.store import JobQuery
from tests.conftest import png
from tests.services import Router, call, router_settings_in, status

RETENTION_S = 2.0


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), retention_days=str(RETENTION_S / 86400),
                              retention_every_s="0.2", orphan_grace_s="5", sync_timeout_s="30",
                              lease_grace_s="0.5")


@pytest.fixture(scope="module")
def key(router: Router) -> Any:
    return create_key(router.app[STORE], "retention")


def scale_form(ref: str | None = None) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", io.BytesIO(png(64, 48)), filename="in.png", content_type="image/png")
    form.add_field("width", "32")
    form.add_field("height", "24")
    if ref:
        form.add_field("refId", ref)
    return form


async def eventually(predicate: Any, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.1)


async def test_a_finished_jobs_files_go_after_the_retention_period_and_a_live_jobs_never(router: Router, key: Any) -> None:
    artifacts = router.app[ARTIFACTS]
    waiting = aiohttp.FormData()  # no agent runs videos here: this job stays queued, its upload must stay
    waiting.add_field("video", b"\x00" * 4096, filename="v.mp4", content_type="video/mp4")
    waiting.add_field("width", "64")
    waiting.add_field("height", "64")
    live = await call(router, key.token, "QueueScaleVideo", waiting)
    live_input = (await router.app[FINDER].get(live["jobId"])).inputs["video"]  # type: ignore[union-attr]

    done = await call(router, key.token, "ScaleImage", scale_form())
    output = done["results"][0]["fileName"]
    finished = next(j for j in router.app[STORE].find_jobs(JobQuery(limit=5)) if j.api == "ScaleImage")
    upload = finished.inputs["image"]
    assert artifacts.path(output) is not None and artifacts.path(upload) is not None

    await eventually(lambda: artifacts.path(output) is None and artifacts.path(upload) is None)
    assert artifacts.path(live_input) is not None, "nothing of a live job is deleted"
    after = await status(router, key.token, jobId=finished.id)
    assert after["jobState"] == "Completed", "the job's record stays; only its files went"
    async with aiohttp.ClientSession() as http:
        async with http.get(done["results"][0]["url"], headers={"Authorization": f"Bearer {key.token}"}) as r:
            assert r.status == 404
        async with http.post(f"{router.url}/api/CancelJob", json={"jobId": live["jobId"]},
                             headers={"Authorization": f"Bearer {key.token}"}) as r:
            assert r.status == 200


async def test_files_no_job_owns_are_deleted_once_old(router: Router) -> None:
    artifacts = router.app[ARTIFACTS]
    old, fresh = await artifacts.put(b"orphan", ".png"), await artifacts.put(b"newborn", ".png")
    path = artifacts.path(old)
    assert path is not None
    os.utime(path, (time.time() - 60, time.time() - 60))
    await eventually(lambda: artifacts.path(old) is None)
    assert artifacts.path(fresh) is not None, "younger than orphan_grace_s: it may yet be reported"


async def test_a_ref_id_stays_taken_after_its_job_is_archived(router: Router, key: Any) -> None:
    first = await call(router, key.token, "ScaleImage", scale_form("keep-me"))
    original = (await status(router, key.token, refId="keep-me"))["jobId"]
    assert await archive_finished(router.app[STORE], router.app[ARCHIVE], 0) >= 1
    assert router.app[STORE].get_job(original) is None, "archived: out of the live store"
    again = await call(router, key.token, "QueueScaleImage", scale_form("keep-me"))
    assert again["jobId"] == original and again["jobState"] == "Completed", "the same job, not a second one"
    assert (await status(router, key.token, refId="keep-me"))["jobId"] == original
    assert first["results"]

    [month] = router.app[ARCHIVE].files()
    with sqlite3.connect(month) as db:
        plan = " ".join(r[3] for r in db.execute("EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE ref_id = ? AND key_id = ?",
                                                 ("keep-me", key.key.id)))
    assert "USING INDEX jobs_ref_id" in plan, plan


async def test_uploads_are_refused_while_the_disk_is_below_its_floor(tmp_path: Path) -> None:
    settings = router_settings_in(tmp_path, min_free_disk_mb=str(2**40))  # more than any disk has free
    low = Router(settings)
    await low.start()
    try:
        key = create_key(low.app[STORE], "low")
        refused = await call(low, key.token, "ScaleImage", scale_form(), status=507)
        assert refused["responseStatus"]["errorCode"] == "InsufficientStorage"
        assert "below its floor" in refused["responseStatus"]["message"]
        assert "router.min_free_disk_mb" in refused["responseStatus"]["message"]
        admin = create_key(low.app[STORE], "admin", admin=True)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{low.url}/api/GetDashboard", headers={"Authorization": f"Bearer {admin.token}"}) as r:
                assert any("below its floor" in p for p in (await r.json())["problems"]), "the dashboard says why"
            async with http.get(f"{low.url}/health") as r:
                assert (await r.json())["problems"]
        assert not list((Path(settings.artifacts_dir) / "incoming").iterdir()), "nothing of it was written"
    finally:
        await low.stop()
