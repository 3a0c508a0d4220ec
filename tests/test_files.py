"""Job files: the router's store (streamed uploads, random names, nothing left behind by a refused
request) and the agent's two ways to it (the store itself when it sees it, HTTP when it does not),
against a real router on loopback and, end to end, a real agent process."""

from __future__ import annotations

import asyncio
import io
import os
import re
from pathlib import Path

import aiohttp
import pytest

from agent.files import RouterFiles
from agent.runners import OutputFile
from gpugate.filestore import INCOMING, STORE_ID_FILE
from gpugate.settings import Settings
from gpugate.wire import SharedStore
from router.artifacts import ArtifactStore
from router.state import ARTIFACTS
from tests.services import TOKEN, Agents, Router, call, router_settings_in

BIG = os.urandom(10 * 2**20 + 12345)  # several write batches, not a multiple of any of them


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), sync_timeout_s="120", max_upload_mb="11")


def stored_files(router: Router) -> set[Path]:
    root = router.app[ARTIFACTS].root
    return {p for p in root.glob("??/*") if p.is_file()}


def incoming(router: Router) -> list[Path]:
    return list((router.app[ARTIFACTS].root / INCOMING).iterdir())


async def agent_files(router: Router, store: SharedStore | None) -> tuple[aiohttp.ClientSession, RouterFiles]:
    http = aiohttp.ClientSession(router.url, headers={"Authorization": f"Bearer {TOKEN}"})
    return http, await RouterFiles.for_session(http, store)


async def test_an_agent_that_sees_the_store_reads_and_writes_there(router: Router, tmp_path: Path) -> None:
    store = router.app[ARTIFACTS]
    name = await store.put(BIG, ".bin")
    http, files = await agent_files(router, store.shared)
    async with http:
        assert files.store == store.root and files.writable
        assert await files.fetch(name, tmp_path) == store.path(name), "read in place, not copied"
        artifact = await files.store_output(OutputFile("out.mp3", "audio/mpeg", b"an output"))
    assert artifact.name.endswith(".mp3") and artifact.size == 9
    assert store.path(artifact.name).read_bytes() == b"an output"  # type: ignore[union-attr]
    assert not list(tmp_path.iterdir()) and not incoming(router)


async def test_an_agent_that_sees_another_store_at_that_path_downloads_and_uploads(router: Router, tmp_path: Path) -> None:
    store = router.app[ARTIFACTS]
    name = await store.put(BIG, ".bin")
    elsewhere = SharedStore(path=store.shared.path, token="not this router's")
    http, files = await agent_files(router, elsewhere)
    async with http:
        assert files.store is None
        path = await files.fetch(name, tmp_path)
        artifact = await files.store_output(OutputFile("out.bin", "application/octet-stream", BIG))
    assert path.parent == tmp_path and path.read_bytes() == BIG, "streamed to the job's folder whole"
    assert store.path(artifact.name).read_bytes() == BIG and artifact.name.endswith(".bin")  # type: ignore[union-attr]


async def test_a_malformed_file_name_is_never_used_as_a_path(router: Router, tmp_path: Path) -> None:
    http, files = await agent_files(router, router.app[ARTIFACTS].shared)
    async with http:
        with pytest.raises(ValueError, match="malformed"):
            await files.fetch("../../etc/passwd", tmp_path)


async def test_uploads_get_random_names_so_content_cannot_be_probed(router: Router, admin) -> None:  # noqa: ANN001
    names = set()
    for _ in range(2):
        answer = await call(router, admin.token, "QueueConvertAudio", upload(b"RIFF same bytes twice", outputFormat="mp3"))
        names.add((await call(router, admin.token, "QueryJobs", {"refId": answer["refId"]}))["jobs"][0]["inputs"]["audio"])
        await call(router, admin.token, "CancelJob", {"jobId": answer["jobId"]})  # no agent here is to run it
    assert len(names) == 2 and all(re.search(r"/artifacts/[0-9a-f]{64}\?exp=", n) for n in names), names


async def test_a_retried_request_keeps_no_second_copy_of_its_upload(router: Router, admin) -> None:  # noqa: ANN001
    before = stored_files(router)
    answers = [await call(router, admin.token, "QueueConvertAudio", upload(b"RIFF retried", outputFormat="mp3",
                                                                          refId="retried-upload")) for _ in range(2)]
    assert answers[0]["jobId"] == answers[1]["jobId"]
    assert len(stored_files(router) - before) == 1
    await call(router, admin.token, "CancelJob", {"jobId": answers[0]["jobId"]})


@pytest.mark.parametrize(("fields", "status"), [
    ({"outputFormat": "exe"}, 400),  # the file arrived whole; another field is wrong
    ({"outputFormat": "mp3", "extra": BIG * 2}, 413),  # refused part-way through the second file
])
async def test_a_refused_request_leaves_no_file_behind(router: Router, admin, fields: dict, status: int) -> None:  # noqa: ANN001
    before = stored_files(router)
    await call(router, admin.token, "ConvertAudio", upload(BIG, **fields), status=status)
    assert stored_files(router) == before and not incoming(router)


def test_files_a_stopped_router_left_half_written_are_removed_at_start(tmp_path: Path) -> None:
    (tmp_path / INCOMING).mkdir()
    (tmp_path / INCOMING / "abc.partial").write_bytes(b"half")
    store = ArtifactStore(tmp_path)
    assert not list((tmp_path / INCOMING).iterdir())
    assert ArtifactStore(tmp_path).shared.token == store.shared.token, "the token is kept across starts"


async def test_an_agent_that_cannot_see_the_store_works_over_http(router: Router, admin, tmp_path: Path) -> None:  # noqa: ANN001
    """End to end with a real agent process: the store's token file says another store, so the agent
    must download the input and upload the output; the job still completes."""
    token_file = router.app[ARTIFACTS].root / STORE_ID_FILE
    real = token_file.read_text()
    token_file.write_text("another store's token")
    agents = Agents(tmp_path, router.url)
    try:
        agents.start("remote", 4.0, [], GPUGATE_AGENT__RUNNERS='["media"]')
        await router.wait_for_agents("remote", timeout=120)
        wav = await sine_wav(tmp_path)
        answer = await call(router, admin.token, "ConvertAudio", upload(wav, outputFormat="flac"))
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin.token}"}) as http:
            async with http.get(answer["results"][0]["url"]) as r:
                assert (await r.read())[:4] == b"fLaC"
    finally:
        agents.stop_all()
        token_file.write_text(real)
    assert "using the router's file store directly" not in (tmp_path / "remote.log").read_text()


def upload(data: bytes, **fields: object) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("audio", io.BytesIO(data), filename="sound.wav", content_type="audio/wav")
    for name, value in fields.items():
        if isinstance(value, bytes):
            form.add_field(name, io.BytesIO(value), filename=f"{name}.bin", content_type="application/octet-stream")
        else:
            form.add_field(name, str(value))
    return form


async def sine_wav(folder: Path) -> bytes:
    path = folder / "sine.wav"
    proc = await asyncio.create_subprocess_exec("ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                                                "sine=frequency=440:duration=2", str(path))
    assert await proc.wait() == 0
    return path.read_bytes()
