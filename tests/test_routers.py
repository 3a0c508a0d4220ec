"""Two routers serving one PostgreSQL and one file store at once (router.shared), each with agents of
its own: any router answers for any job. A chat submitted to router 1 runs on router 2's agent and
streams through router 1; status, waiting reasons, models and cancel work through either; each
callback is delivered once; the job's event stream through either router ends with its result; an
agent's name is one across routers; kill -9 of a router mid-stream
loses nothing (its agent reconnects to the other, every job completes)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from agent.chat.build import server_binary
from gpugate.settings import load_settings
from gpugate.wire import Capability, Hello
from tests.services import TOKEN, Agents, RouterProcess, api_call

pytestmark = pytest.mark.skipif(not server_binary(load_settings(environ={})).exists(),
                                reason="llama-server is not built: run `gpugate llm provision` (make install does)")
LONG = "Count from 1 to 900, writing every number in words, separated by commas."
SHORT = "Say hello."
FINAL = ("Completed", "Failed", "Cancelled")


@pytest.fixture
def pair(postgres: Any, tmp_path: Path) -> Iterator[tuple[RouterProcess, RouterProcess]]:
    database = postgres.new_database()
    data = tmp_path / "data"  # one data folder for both: the file store and the secrets, as on a shared volume
    data.mkdir()
    env = {"GPUGATE_ROUTER__SHARED": "true", "GPUGATE_ROUTER__PEER_TIMEOUT_S": "3",
           "GPUGATE_ROUTER__LEASE_GRACE_S": "30", "GPUGATE_ROUTER__CALLBACK_ALLOW_NETWORKS": '["127.0.0.0/8"]'}
    routers = [RouterProcess(data, database, **env), RouterProcess(data, database, **env)]
    try:
        asyncio.run(_healthy(routers))
        yield routers[0], routers[1]
    finally:
        for router in routers:
            router.stop()


async def _healthy(routers: list[RouterProcess]) -> None:
    await asyncio.gather(*(r.wait_healthy() for r in routers))


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A callback receiver on loopback: its URL and what it got (webhook-id and body of each POST)."""
    got: list[dict[str, Any]] = []

    async def take(request: web.Request) -> web.Response:
        got.append({"id": request.headers["webhook-id"], "body": json.loads(await request.read())})
        return web.Response()

    app = web.Application()
    app.add_routes([web.post("/hook", take)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}/hook", got
    await runner.cleanup()


def _chat(content: str, max_tokens: int) -> dict[str, Any]:
    return {"model": "smollm2", "max_tokens": max_tokens, "temperature": 0, "messages": [{"role": "user", "content": content}]}


async def _state(url: str, key: str, job_id: int, wanted: tuple[str, ...], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (status := await api_call(url, key, "GetOpenAiChatStatus", {"jobId": job_id}))["jobState"] not in wanted:
        assert time.monotonic() < deadline, f"job {job_id} never got to {wanted}: {status}"
        await asyncio.sleep(0.1)
    return status


async def _events(url: str, key: str, job_id: int) -> list[tuple[str, dict[str, Any]]]:
    """GetJobEvents' events for a job until its result: (event name, data)."""
    events: list[tuple[str, dict[str, Any]]] = []
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http, \
            http.get(f"{url}/api/GetJobEvents", params={"jobId": str(job_id)}) as r:
        name = None
        async for line in r.content:
            text = line.decode().strip()
            if text.startswith("event: "):
                name = text.removeprefix("event: ")
            elif text.startswith("data: ") and name:
                events.append((name, json.loads(text.removeprefix("data: "))))
                if name == "result":
                    break
    return events


async def _models(url: str, key: str) -> list[str]:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http, \
            http.get(f"{url}/v1/models") as r:
        return [m["id"] for m in (await r.json())["data"]]


async def _until_known(url: str, key: str, model: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while model not in await _models(url, key):
        assert time.monotonic() < deadline, f"{model} never listed by {url}"
        await asyncio.sleep(0.2)


async def test_any_router_serves_any_job(pair: tuple[RouterProcess, RouterProcess], tmp_path: Path,
                                         receiver: tuple[str, list[dict[str, Any]]]) -> None:
    one, two = pair
    key = one.new_key("shared")
    hook, got = receiver
    talkers = Agents(tmp_path / "agents-2", two.url)  # the only agent that chats is router 2's
    talkers.start("talker", 4.0, [], GPUGATE_AGENT__RUNNERS='["chat"]', GPUGATE_CHAT__PARALLEL="1",
                  GPUGATE_CHAT__CONTEXT="4096")
    cutters = Agents(tmp_path / "agents-1", one.url)  # router 1's agent does media only
    cutters.start("cutter", 4.0, [], GPUGATE_AGENT__RUNNERS='["media"]')
    try:
        await _until_known(one.url, key, "smollm2")  # router 1 knows router 2's agent's models

        # a chat through router 1 runs on router 2's agent, streamed token by token through router 1
        client = openai.AsyncOpenAI(base_url=f"{one.url}/v1", api_key=key)
        stream = await client.chat.completions.create(model="smollm2", max_tokens=60, temperature=0, stream=True,
                                                      messages=[{"role": "user", "content": LONG}])
        pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
        assert len(pieces) == 60, pieces  # a token a piece: this tiny model counts in digits
        await client.close()

        # a long chat queued through router 2; followed, waited on and cancelled through router 1
        long = await api_call(two.url, key, "QueueOpenAiChatCompletion", {"request": _chat(LONG, 3000)})
        await _state(one.url, key, long["id"], ("Started",))
        waiting = await api_call(one.url, key, "QueueOpenAiChatCompletion",
                                 {"request": _chat(SHORT, 20), "replyTo": hook, "refId": "after-cancel"})
        followed = asyncio.create_task(_events(one.url, key, waiting["id"]))  # through router 1, run by router 2
        await asyncio.sleep(1.5)  # a dispatch pass or two on each router
        queued = await api_call(one.url, key, "GetOpenAiChatStatus", {"jobId": waiting["id"]})
        assert queued["jobState"] == "Queued" and "waiting for a free agent" in queued["status"], queued
        await api_call(one.url, key, "CancelJob", {"jobId": long["id"]})
        assert (await _state(two.url, key, long["id"], FINAL, timeout=10))["jobState"] == "Cancelled"
        deadline = time.monotonic() + 30  # router 2 told its agent to stop
        while "job cancelled by the router" not in (tmp_path / "agents-2" / "talker.log").read_text():
            assert time.monotonic() < deadline, "the cancel never reached the agent"
            await asyncio.sleep(0.2)
        done = await _state(two.url, key, waiting["id"], FINAL, timeout=60)  # its one slot is free again
        assert done["jobState"] == "Completed", done
        events = await asyncio.wait_for(followed, 30)
        assert events[0][0] == "progress" and events[-1][0] == "result", events
        assert events[-1][1]["jobState"] == "Completed"

        # its callback arrives once, whichever router sends it
        deadline = time.monotonic() + 30
        while not got:
            assert time.monotonic() < deadline, "no callback"
            await asyncio.sleep(0.2)
        await asyncio.sleep(6)  # longer than a router's idle look at the outbox
        assert [g["body"]["refId"] for g in got] == ["after-cancel"], got

        found = await api_call(one.url, key, "QueryJobs", {})
        assert {j["agent"] for j in found["jobs"]} == {"talker"}

        # an agent name is one across routers: another process under "talker" is refused by router 1 too
        impostor = Hello(name="talker", instance="another-process", cpu_only=True, devices=[], models=[],
                         capabilities=[Capability(name="chat")], concurrency=1)
        async with aiohttp.ClientSession() as http, \
                http.ws_connect(f"{one.url}/agent/ws", headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            await ws.send_str(impostor.model_dump_json())
            refused = json.loads((await ws.receive()).data)
        assert refused["type"] == "refused" and "another router" in refused["reason"], refused
    finally:
        talkers.stop_all()
        cutters.stop_all()


async def test_kill_9_of_a_router_mid_stream_loses_nothing(pair: tuple[RouterProcess, RouterProcess],
                                                           tmp_path: Path) -> None:
    """The agent chats on router 1; a client streams through router 2 and more chats wait. kill -9 of
    router 1: the agent reconnects to router 2 with its chat, the stream goes on, every job completes."""
    one, two = pair
    key = one.new_key("chaos")
    agents = Agents(tmp_path / "agents", f"{one.url},{two.url}")  # router 1 first, router 2 if it goes
    agents.start("talker", 4.0, [], GPUGATE_AGENT__RUNNERS='["chat"]', GPUGATE_CHAT__PARALLEL="2",
                 GPUGATE_CHAT__CONTEXT="1024")
    try:
        await _until_known(two.url, key, "smollm2")
        queued = [await api_call(two.url, key, "QueueOpenAiChatCompletion", {"request": _chat(LONG, 250)})
                  for _ in range(2)]
        client = openai.AsyncOpenAI(base_url=f"{two.url}/v1", api_key=key)
        stream = await client.chat.completions.create(model="smollm2", max_tokens=250, temperature=0, stream=True,
                                                      stream_options={"include_usage": True},
                                                      messages=[{"role": "user", "content": LONG}])
        text, killed, usage = "", False, None
        async for chunk in stream:
            usage = chunk.usage or usage
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if not killed and len(text) > 40:  # mid-stream
                one.proc.send_signal(signal.SIGKILL)
                one.proc.wait(10)
                killed = True
        await client.close()
        assert killed, "the stream ended before the router could be killed"
        for job in queued:
            status = await _state(two.url, key, job["id"], FINAL, timeout=180)
            assert status["jobState"] == "Completed", status
            assert status["result"]["usage"]["completion_tokens"] == 250
        assert usage is not None and usage.completion_tokens == 250, "the stream went on to its end"
    finally:
        agents.stop_all()
