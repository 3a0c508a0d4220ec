"""ReplyTo callbacks, cancel, history, metrics and the OpenAPI document, on a real router.

The jobs here are image transforms the router runs itself (ScaleImage completes, a CropImage
outside the frame fails at run time), and echo jobs on a real `gpugate agent` process without
ComfyUI, so these tests need no model. A real aiohttp receiver on 127.0.0.1 takes the callbacks.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver

from agent.comfy.launch import free_port
from gpugate.settings import PROJECT_ROOT, Settings
from gpugate.settings import Router as RouterSettings
from router.archive import archive_finished
from router.callbacks import CallbackSender
from router.keys import create_key, new_webhook_secret
from router.state import ARCHIVE, CALLBACKS, QUEUE, STORE
from router.store import Job, JobState
from router.store.sqlite import SqliteStore
from router.urls import UrlSigner
from tests.conftest import png
from tests.services import Agents, Router, call, router_settings_in, status, until

class Receiver:
    """A callback receiver that answers 503 to the first ``failures`` attempts of each delivery."""

    def __init__(self, failures: int, hang_s: float = 0.0) -> None:
        self.failures, self.hang_s = failures, hang_s
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.attempts: list[dict[str, Any]] = []  # every POST: headers and body
        self.accepted: dict[str, dict[str, Any]] = {}  # webhook-id -> the delivery taken
        self.arrived = asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        attempt = {"headers": dict(request.headers), "body": body}
        self.attempts.append(attempt)
        await asyncio.sleep(self.hang_s)
        webhook_id = request.headers["webhook-id"]
        if sum(a["headers"]["webhook-id"] == webhook_id for a in self.attempts) <= self.failures:
            return web.Response(status=503)
        self.accepted.setdefault(webhook_id, attempt)
        self.arrived.set()
        return web.Response(status=204)

    async def __aenter__(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()

    async def wait_for(self, count: int, timeout: float = 30) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.accepted) < count:
            assert time.monotonic() < deadline, f"{len(self.accepted)} of {count} callbacks arrived: {self.attempts}"
            await asyncio.sleep(0.05)
        return list(self.accepted.values())


def verify(secret: str, attempt: dict[str, Any]) -> bool:
    """Standard Webhooks verification, written from the specification (not with our signer)."""
    headers = attempt["headers"]
    signed = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.".encode() + attempt["body"]
    expected = base64.b64encode(hmac.new(base64.b64decode(secret.removeprefix("whsec_")), signed,
                                         hashlib.sha256).digest()).decode()
    return any(hmac.compare_digest(f"v1,{expected}", given) for given in headers["webhook-signature"].split())


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), echo_api="true", sync_timeout_s="0.5",
                              callback_retry_s="0.2", callback_allow_networks='["127.0.0.0/8"]', heartbeat_timeout_s="6")


@pytest.fixture(scope="module")
def client(router: Router) -> Any:
    return create_key(router.app[STORE], "client", apis=("ScaleImage", "CropImage", "Echo"))


@pytest.fixture(scope="module")
def echo_agent(router: Router, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Agents]:
    agents = Agents(tmp_path_factory.mktemp("agents"), router.url)
    agents.start("echo-1", 6.5, [], GPUGATE_AGENT__RUNNERS='["echo"]')
    yield agents
    agents.stop_all()


def image_form(fields: dict[str, Any]) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("image", io.BytesIO(png(64, 48)), filename="in.png", content_type="image/png")
    for name, value in fields.items():
        form.add_field(name, str(value))
    return form


# ---- callbacks ---------------------------------------------------------------------------------


async def test_callbacks_are_signed_retried_and_arrive_once_in_effect_for_completed_and_failed_jobs(
        router: Router, client: Any) -> None:
    async with Receiver(failures=2) as receiver:
        done = await call(router, client.token, "QueueScaleImage",
                          image_form({"width": 32, "height": 24, "replyTo": receiver.url, "refId": "cb-ok"}))
        failed = await call(router, client.token, "QueueCropImage",
                            image_form({"x": 40, "y": 0, "width": 40, "height": 10, "replyTo": receiver.url}))
        delivered = await receiver.wait_for(2)
    by_job = {json.loads(d["body"])["jobId"]: d for d in delivered}
    assert set(by_job) == {done["jobId"], failed["jobId"]}
    for job_id, delivery in by_job.items():
        tries = [a for a in receiver.attempts if a["headers"]["webhook-id"] == delivery["headers"]["webhook-id"]]
        assert len(tries) == 3, "two refusals, then the accepted attempt, all with one webhook-id"
        assert all(verify(client.key.webhook_secret, a) for a in tries)
        assert not verify(admin_secret_of_another_key(), delivery)
        body = json.loads(delivery["body"])
        assert _unsigned(body) == _unsigned(await status(router, client.token, jobId=job_id)), \
            "the body is the status answer (its file URLs signed when it was made)"
    assert json.loads(by_job[done["jobId"]]["body"])["jobState"] == "Completed"
    assert json.loads(by_job[done["jobId"]]["body"])["refId"] == "cb-ok"
    [job] = (await call(router, client.token, "QueryJobs", {"refId": "cb-ok"}))["jobs"]
    assert re.search(r"/artifacts/[0-9a-f]{64}\.png\?exp=\d+&sig=", job["inputs"]["image"]), job["inputs"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {client.token}"}) as http:
        async with http.get(job["inputs"]["image"]) as r:
            assert await r.read() == png(64, 48), "the upload is stored as it came, under a random name"
    failure = json.loads(by_job[failed["jobId"]]["body"])
    assert failure["jobState"] == "Failed"
    assert failure["responseStatus"]["errors"][0]["fieldName"] == "width"


async def test_a_hanging_receiver_delays_only_its_own_callbacks(router: Router, client: Any) -> None:
    async with Receiver(failures=0, hang_s=30) as slow, Receiver(failures=0) as fast:
        await call(router, client.token, "QueueScaleImage", image_form({"width": 8, "height": 8, "replyTo": slow.url}))
        deadline = time.monotonic() + 10
        while not slow.attempts:  # its delivery is under way, and stays so for the router's timeout
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        started = time.monotonic()
        await call(router, client.token, "QueueScaleImage", image_form({"width": 8, "height": 8, "replyTo": fast.url}))
        await fast.wait_for(1, timeout=5)
        assert time.monotonic() - started < 5 and not slow.accepted


async def test_a_callback_links_results_at_the_address_the_client_used(router: Router, client: Any) -> None:
    async with Receiver(failures=0) as receiver, aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}/api/QueueScaleImage", data=image_form({"width": 8, "height": 8,
                                                                                   "replyTo": receiver.url}),
                             headers={"Authorization": f"Bearer {client.token}", "Host": "media.example.org"}) as r:
            assert r.status == 200
        [delivery] = await receiver.wait_for(1)
    assert json.loads(delivery["body"])["results"][0]["url"].startswith("http://media.example.org/artifacts/")


def _unsigned(answer: dict[str, Any]) -> dict[str, Any]:
    return {**answer, "results": [{**r, "url": r["url"].split("?")[0]} if "url" in r else r for r in answer["results"]]}


def admin_secret_of_another_key() -> str:
    return "whsec_" + base64.b64encode(b"x" * 24).decode()


async def test_a_router_restart_loses_no_delivery(router: Router, client: Any) -> None:
    receiver = Receiver(failures=0)  # not listening yet: every attempt fails to connect
    retried = router.app[CALLBACKS].outcomes["retried"]
    queued = await call(router, client.token, "QueueScaleImage", image_form({"width": 16, "height": 16,
                                                                            "replyTo": receiver.url}))
    await until(router, client.token, queued["jobId"], lambda a: a["jobState"] == "Completed")
    async with asyncio.timeout(30):
        while router.app[CALLBACKS].outcomes["retried"] == retried:  # a first attempt fails
            await asyncio.sleep(0.05)
    await router.stop()
    await router.start()
    async with receiver:
        [delivery] = await receiver.wait_for(1)
    assert json.loads(delivery["body"])["jobId"] == queued["jobId"]
    assert verify(client.key.webhook_secret, delivery)


@pytest.mark.parametrize("url", ["http://10.0.0.1/hook", "http://169.254.169.254/latest", "http://[::1]:9/x",
                                 "http://192.168.1.20/hook", "ftp://example.com/hook", "not a url"])
async def test_reply_to_a_private_address_or_a_bad_url_is_refused_at_submission(
        router: Router, client: Any, url: str) -> None:
    answer = await call(router, client.token, "QueueScaleImage", image_form({"width": 16, "height": 16, "replyTo": url}),
                        status=400)
    assert answer["responseStatus"]["errors"][0]["fieldName"] == "replyTo"


# ---- cancel and progress -------------------------------------------------------------------------


async def test_a_queued_job_is_cancelled_by_job_id_or_ref_id(router: Router, client: Any) -> None:
    # no agent offers echo yet: these wait in the queue
    first = await call(router, client.token, "QueueEcho", {"text": "a"})
    second = await call(router, client.token, "QueueEcho", {"text": "b", "refId": "to-cancel"})
    cancelled = await call(router, client.token, "CancelJob", {"jobId": first["jobId"]})
    assert cancelled["jobState"] == "Cancelled"
    assert (await call(router, client.token, "CancelJob", {"refId": "to-cancel"}))["jobState"] == "Cancelled"
    again = await call(router, client.token, "CancelJob", {"jobId": second["jobId"]}, status=409)
    assert again["responseStatus"]["errorCode"] == "InvalidState"
    assert (await status(router, client.token, jobId=first["jobId"]))["responseStatus"]["errorCode"] == "Cancelled"
    assert first["jobId"] not in router.app[QUEUE].live


async def test_job_events_stream_the_status_until_the_result(router: Router, client: Any, echo_agent: Agents) -> None:
    await router.wait_for_agents("echo-1")
    queued = await call(router, client.token, "QueueEcho", {"text": "streamed"})
    events = []
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{router.url}/api/GetJobEvents", params={"jobId": queued["jobId"]},
                            headers={"Authorization": f"Bearer {client.token}"}) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                if line.startswith(b"event: "):
                    events.append(line[7:].strip().decode())
                elif line.startswith(b"data: "):
                    last = json.loads(line[6:])
    assert events[-1] == "result"
    assert last["jobState"] == "Completed" and last["results"] == [{"text": "streamed"}]


# ---- history -----------------------------------------------------------------------------------------


def _old_job(router: Router, key_id: int, created: float, ref: str, tag: str) -> Job:
    store = router.app[STORE]
    job = store.add_job(Job(id=0, api="Echo", capability="echo", params={"text": ref}, inputs={}, model=None,
                            megapixels=0, max_attempts=1, key_id=key_id, ref_id=ref, tag=tag, created=created))
    job.state, job.results = JobState.COMPLETED, {"artifacts": [], "texts": [ref]}
    store.finish(job, created + 2)
    return job


async def test_finished_jobs_move_to_monthly_archives_and_stay_findable(router: Router, client: Any,
                                                                        admin: Any, router_settings: Settings) -> None:
    september = _old_job(router, client.key.id, time.mktime((2026, 9, 14, 12, 0, 0, 0, 0, 0)), "sep-job", "batch-a")
    october = _old_job(router, client.key.id, time.mktime((2026, 10, 2, 12, 0, 0, 0, 0, 0)), "oct-job", "batch-a")
    moved = await archive_finished(router.app[STORE], router.app[ARCHIVE], older_than_s=0)
    assert moved >= 2
    files = {p.name for p in (router_settings.paths.data_dir / "archive").iterdir()}
    assert {"2026-09.db", "2026-10.db"} <= files
    assert router.app[STORE].get_job(september.id) is None, "gone from the live store"
    # still answered by id and by refId, and found by tag, state and date
    assert (await status(router, client.token, jobId=september.id))["results"][0]["text"] == "sep-job"
    assert (await status(router, client.token, refId="oct-job"))["jobId"] == october.id
    tagged = await call(router, client.token, "QueryJobs", {"tag": "batch-a"})
    assert [j["jobId"] for j in tagged["jobs"]] == [october.id, september.id]
    in_october = await call(router, client.token, "QueryJobs", {"since": "2026-10-01", "until": "2026-11-01",
                                                                "state": "Completed"})
    assert [j["refId"] for j in in_october["jobs"]] == ["oct-job"]
    assert in_october["jobs"][0]["queued"].startswith("2026-10-02")
    others = await call(router, admin.token, "QueryJobs", {"keyId": client.key.id, "tag": "batch-a"})
    assert len(others["jobs"]) == 2
    mine_only = await call(router, create_key(router.app[STORE], "other").token, "QueryJobs", {"tag": "batch-a"})
    assert mine_only["jobs"] == [], "a key sees only its own jobs"
    bad = await call(router, client.token, "QueryJobs", {"state": "Done"}, status=400)
    assert bad["responseStatus"]["errors"][0]["fieldName"] == "state"
    env = {"GPUGATE_PATHS__DATA_DIR": str(router_settings.paths.data_dir)}
    listing = _cli("jobs", "list", "--tag", "batch-a", env=env)
    assert "sep-job" in listing and "oct-job" in listing
    shown = json.loads(_cli("jobs", "show", str(september.id), env=env))
    assert shown["refId"] == "sep-job" and shown["jobState"] == "Completed"


def _cli(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-m", "gpugate.cli", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


# ---- metrics and the OpenAPI document --------------------------------------------------------------


async def test_metrics_in_prometheus_format(router: Router, admin: Any, client: Any, echo_agent: Agents) -> None:
    await router.wait_for_agents("echo-1")
    await call(router, client.token, "Echo", {"text": "counted"})
    async with Receiver(failures=1) as receiver:
        await call(router, client.token, "QueueEcho", {"text": "called back", "replyTo": receiver.url})
        await receiver.wait_for(1)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin.token}"}) as http:
        async with http.get(f"{router.url}/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await r.text()
        async with http.get(f"{router.url}/metrics", headers={"Authorization": f"Bearer {client.token}"}) as r:
            assert r.status == 403
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['gpugate_jobs_finished_total{api="Echo",state="Completed"}'] >= 1
    assert samples['gpugate_job_duration_seconds_bucket{api="Echo",le="+Inf"}'] == \
        samples['gpugate_job_duration_seconds_count{api="Echo"}'] >= 1
    assert samples["gpugate_agents_online"] == 1
    assert samples['gpugate_gpu_vram_free_bytes{agent="echo-1",gpu="0",name="test GPU"}'] == 6.5 * 2**30
    assert samples['gpugate_callback_deliveries_total{outcome="delivered"}'] >= 1
    assert samples['gpugate_callback_deliveries_total{outcome="retried"}'] >= 1
    assert 'gpugate_jobs{state="Queued"}' in samples


async def test_the_openapi_document_validates_and_schemathesis_finds_no_server_error(
        router: Router, admin: Any, tmp_path: Path) -> None:
    from openapi_spec_validator import validate

    async with aiohttp.ClientSession() as http:
        async with http.get(f"{router.url}/openapi.json") as r:
            document = await r.json()
    validate(document)
    assert document["openapi"] == "3.1.0"
    operations = {op["operationId"] for path in document["paths"].values() for op in path.values()}
    from router.api.requests import APIS

    assert {*APIS, *(f"Queue{a}" for a in APIS), "CancelJob", "QueryJobs", "GetJobEvents"} <= operations
    trim = document["components"]["schemas"]["TrimVideo"]
    assert set(trim["required"]) == {"video", "endTime"} and trim["properties"]["video"]["format"] == "binary"
    # every API, generated requests, no 5xx (streams that never end and key revocation are tested elsewhere)
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "schemathesis.cli", "run", f"{router.url}/openapi.json", "--checks", "not_a_server_error",
        "--max-examples", "6", "--header", f"Authorization: Bearer {admin.token}", "--phases", "examples,fuzzing",
        "--exclude-operation-id", "GetDashboardEvents", "--exclude-operation-id", "GetJobEvents",
        "--exclude-operation-id", "RevokeApiKey", "--request-timeout", "20", "--no-color"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


async def test_a_callback_connects_only_to_an_address_that_passed_the_check(tmp_path: Path) -> None:
    """DNS may answer differently between a check and the connection (rebinding, toward 169.254.169.254
    say). Each attempt resolves the host once, inside its timeout, checks the answer and connects to
    exactly that: an internal answer is refused and never reached; an allowed one is used."""
    resolved: list[str] = []

    class Resolver(AbstractResolver):  # the DNS answer of the moment, as a rebinding server would give it
        def __init__(self, answer: str) -> None:
            self.answer = answer

        async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
            resolved.append(self.answer)
            return [{"hostname": host, "host": self.answer, "port": port, "family": socket.AF_INET, "proto": 0, "flags": 0}]

        async def close(self) -> None:
            return None

    async with Receiver(0) as receiver:
        url = f"http://callbacks.example:{receiver.port}/hook"
        for allowed, outcome in (((), "failed"), (("127.0.0.0/8",), "delivered")):
            store = SqliteStore(tmp_path / f"router-{outcome}.db")
            settings = RouterSettings(callback_allow_networks=allowed, callback_timeout_s=5, callback_retry_s=0.1)
            sender = CallbackSender(store, settings, new_webhook_secret(), lambda api: {}, UrlSigner("test", 60),
                                    resolver=Resolver("127.0.0.1"))
            job = store.add_job(Job(id=0, api="Echo", capability="echo", params={}, inputs={}, model=None, megapixels=0,
                                    max_attempts=1, reply_to=url, state=JobState.QUEUED, created=time.time()))
            job.state = JobState.COMPLETED
            store.finish(job, time.time(), sender.delivery_for(job))
            running = asyncio.create_task(sender.run())
            try:
                async with asyncio.timeout(20):
                    while sender.outcomes[outcome] == 0:
                        await asyncio.sleep(0.05)
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
                store.close()
            if outcome == "failed":
                assert receiver.attempts == [], "the internal address was never connected to"
                assert sender.outcomes["retried"] == 0, "a refused address is given up at once"
        assert len(receiver.attempts) == 1 and resolved == ["127.0.0.1", "127.0.0.1"], "one lookup per attempt"
