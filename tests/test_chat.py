"""Chat through router and agent, answered by the real SmolLM2-135M (llama.cpp's llama-server on
the CPU): the official `openai` client against /v1/chat/completions, AI Server's chat APIs,
streaming, parallel slots, cancel, a killed llama-server, forward mode and bad input."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import psutil
import pytest

from agent.chat.build import server_binary
from agent.chat.models import packaged
from agent.comfy.launch import free_port
from gpugate.settings import Settings, load_settings
from router.api.chat import SentText
from router.keys import create_key
from router.state import SESSIONS, STORE
from tests.services import Agents, Router, call, router_settings_in
from tests.test_delivery import Receiver, verify

MODEL = "smollm2"  # the catalog's alias of the packaged SmolLM2-135M-Instruct
CONTEXT = 1024
LONG = "Count from 1 to 300, writing every number in words, separated by commas."

pytestmark = pytest.mark.skipif(not server_binary(load_settings(environ={})).exists(),
                                reason="llama-server is not built: run `gpugate llm provision` (make install does)")


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), sync_timeout_s="120",
                              callback_allow_networks='["127.0.0.0/8"]')


@pytest.fixture(scope="module")
def key(router: Router) -> str:
    return create_key(router.app[STORE], "chat tests").token


@pytest.fixture(scope="module")
async def agents(router: Router, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Agents]:
    agents = Agents(tmp_path_factory.mktemp("agents"), router.url)
    # room for one loaded model (about 400 MB each at 2 slots of 1024 tokens), not two
    agents.start("talker", 4.0, [], GPUGATE_AGENT__RUNNERS='["chat"]', GPUGATE_CHAT__PARALLEL="2",
                 GPUGATE_CHAT__CONTEXT=str(CONTEXT), GPUGATE_CHAT__THREADS="2", GPUGATE_CHAT__MEMORY_BUDGET_MB="600")
    try:
        await router.wait_for_agents("talker", timeout=120)
        yield agents
    finally:
        agents.stop_all()


@pytest.fixture
async def client(router: Router, key: str, agents: Agents) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{router.url}/v1", api_key=key, max_retries=0, timeout=120) as client:
        yield client


def llama_servers(agents: Agents, name: str = "talker") -> list[psutil.Process]:
    return [p for p in psutil.Process(agents.procs[name].pid).children(recursive=True) if "llama-server" in p.name()]


async def chat_status(router: Router, key: str, job_id: int) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(
            f"{router.url}/api/GetOpenAiChatStatus", params={"jobId": job_id},
            headers={"Authorization": f"Bearer {key}"}) as r:
        return await r.json()


def job_id_of(chunk_id: str) -> int:
    return int(chunk_id.removeprefix("chatcmpl-"))


async def test_the_openai_client_gets_an_answer_and_max_tokens_is_honoured(client: openai.AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(model=MODEL, max_tokens=40, temperature=0, messages=[
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France? Answer in one word."}])
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-") and answer.model == MODEL
    assert "paris" in answer.choices[0].message.content.lower()
    assert answer.choices[0].message.role == "assistant"
    assert 0 < answer.usage.completion_tokens <= 40 and answer.usage.prompt_tokens > 10
    short = await client.chat.completions.create(model=MODEL, max_tokens=5, temperature=0,
                                                 messages=[{"role": "user", "content": LONG}])
    assert short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length"
    counted = await client.chat.completions.create(model=MODEL, max_tokens=60, temperature=0, seed=3,
                                                   messages=[{"role": "user", "content": LONG}])
    text = counted.choices[0].message.content
    stop = text.strip()[len(text.strip()) // 2]  # a character from the middle of the answer
    stopped = await client.chat.completions.create(model=MODEL, max_tokens=60, temperature=0, seed=3, stop=[stop],
                                                   messages=[{"role": "user", "content": LONG}])
    assert stop not in stopped.choices[0].message.content and text.startswith(stopped.choices[0].message.content)
    assert stopped.choices[0].finish_reason == "stop" and stopped.usage.completion_tokens < counted.usage.completion_tokens


async def test_streamed_deltas_arrive_before_the_job_ends(client: openai.AsyncOpenAI, router: Router, key: str) -> None:
    stream = await client.chat.completions.create(model=MODEL, max_tokens=200, temperature=0, stream=True,
                                                  stream_options={"include_usage": True},
                                                  messages=[{"role": "user", "content": LONG}])
    pieces, state_at_first, usage, finish = [], None, None, None
    async for chunk in stream:
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                if state_at_first is None:
                    state_at_first = (await chat_status(router, key, job_id_of(chunk.id)))["jobState"]
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert state_at_first == "Started", "the first delta came only after the job had ended"
    assert len(pieces) > 20 and finish == "length" and usage.completion_tokens == 200
    final = await chat_status(router, key, job_id_of(chunk.id))
    assert final["jobState"] == "Completed"
    assert "".join(pieces) == final["result"]["choices"][0]["message"]["content"]


async def test_a_json_response_format_gives_parseable_json(client: openai.AsyncOpenAI) -> None:
    answer = await client.chat.completions.create(
        model=MODEL, max_tokens=200, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give a JSON object with the keys name and age of a person."}])
    assert isinstance(json.loads(answer.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    answer = await client.chat.completions.create(
        model=MODEL, max_tokens=100, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "place", "schema": schema}},
        messages=[{"role": "user", "content": "Which city is the capital of Italy? Reply in JSON."}])
    assert isinstance(json.loads(answer.choices[0].message.content)["city"], str)


async def test_ai_server_chat_apis(router: Router, key: str, agents: Agents, admin: Any) -> None:
    request = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}
    answer = await call(router, key, "OpenAiChatCompletion", {**request, "refId": "chat-sync-1", "tag": "chats"})
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
    queued = await call(router, key, "QueueOpenAiChatCompletion", {"refId": "chat-queued-1", "tag": "chats",
                                                                   "request": request})
    assert queued["id"] == queued["jobId"] and queued["refId"] == "chat-queued-1"
    assert queued["statusUrl"].endswith(f"/api/GetOpenAiChatStatus?jobId={queued['id']}")
    waited = await call(router, key, "WaitForOpenAiChat", {"id": queued["id"]})
    assert waited["jobState"] == "Completed" and waited["result"]["usage"]["completion_tokens"] <= 8
    by_ref = await call(router, key, "GetOpenAiChat", {"refId": "chat-queued-1"})
    assert by_ref["result"] == waited["result"]
    assert (await call(router, key, "GetOpenAiChatStatus", {"refId": "chat-sync-1"}))["jobState"] == "Completed"
    models = await call(router, key, "ActiveAiModels", {})
    assert "smollm2-135m" in models["results"]
    async with aiohttp.ClientSession() as http, http.get(f"{router.url}/v1/models",
                                                         headers={"Authorization": f"Bearer {key}"}) as r:
        listing = await r.json()
    assert listing["object"] == "list" and "smollm2-135m" in [m["id"] for m in listing["data"]]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        async with http.get(f"{router.url}/v1/models/smollm2-135m") as r:
            assert r.status == 200 and (await r.json())["id"] == "smollm2-135m"
        async with http.get(f"{router.url}/v1/models/gpt-17") as r:
            assert r.status == 404 and (await r.json())["error"]["param"] == "model"
    jobs = await call(router, key, "QueryJobs", {"tag": "chats"})
    assert {j["refId"] for j in jobs["jobs"]} == {"chat-sync-1", "chat-queued-1"}
    metrics = await _metrics(router, admin.token)
    assert metrics["gpugate_chat_tokens_total{direction=\"out\"}"] >= 8


async def test_a_queued_chat_calls_back_with_its_answer_signed(router: Router, agents: Agents) -> None:
    made = create_key(router.app[STORE], "chat callbacks")
    async with Receiver(failures=1) as receiver:
        queued = await call(router, made.token, "QueueOpenAiChatCompletion", {
            "refId": "chat-hook-1", "replyTo": receiver.url,
            "request": {"model": MODEL, "max_tokens": 6, "messages": [{"role": "user", "content": "Hello"}]}})
        [delivery] = await receiver.wait_for(1, timeout=60)
    assert verify(made.key.webhook_secret, delivery), "signed with the key's webhook secret"
    body = json.loads(delivery["body"])
    assert body["jobId"] == queued["id"] and body["refId"] == "chat-hook-1" and body["jobState"] == "Completed"
    assert body["result"]["object"] == "chat.completion" and body["result"]["usage"]["completion_tokens"] <= 6


async def _metrics(router: Router, key: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as http, http.get(f"{router.url}/metrics",
                                                         headers={"Authorization": f"Bearer {key}"}) as r:
        text = await r.text()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


async def _timed_stream(client: openai.AsyncOpenAI, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(first content at, last content at, content chunks) of one streamed chat."""
    stream = await client.chat.completions.create(model=MODEL, max_tokens=max_tokens, temperature=0, stream=True,
                                                  messages=[{"role": "user", "content": prompt}])
    first = last = 0.0
    count = 0
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            last = time.monotonic()
            first = first or last
            count += 1
    return first, last, count


async def test_two_chats_on_one_agent_progress_together(client: openai.AsyncOpenAI, router: Router) -> None:
    (first_a, end_a, a), (first_b, end_b, b) = await asyncio.gather(
        _timed_stream(client, LONG, 150), _timed_stream(client, LONG.replace("300", "400"), 150))
    assert a > 20 and b > 20
    assert first_a < end_b and first_b < end_a, "one chat waited for the other to finish"
    assert router.app[SESSIONS].sessions["talker"].capabilities["chat"].slots == 2


async def test_cancel_mid_stream_stops_the_chat(client: openai.AsyncOpenAI, router: Router, key: str) -> None:
    stream = await client.chat.completions.create(model=MODEL, max_tokens=600, temperature=0, stream=True,
                                                  messages=[{"role": "user", "content": LONG}])
    job_id, error = None, None
    try:
        async for chunk in stream:
            if job_id is None and chunk.choices and chunk.choices[0].delta.content:
                job_id = job_id_of(chunk.id)
                await call(router, key, "CancelJob", {"jobId": job_id})
    except openai.APIError as exc:  # the stream ends with OpenAI's error event
        error = exc
    assert error is not None and "cancel" in str(error).lower()
    assert (await chat_status(router, key, job_id))["jobState"] == "Cancelled"
    # a client that leaves its stream cancels the job too
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                             json={"model": MODEL, "max_tokens": 600, "stream": True,
                                   "messages": [{"role": "user", "content": LONG}]}) as r:
            async for line in r.content:
                if b'"content":"' in line and b'"content":""' not in line:
                    left = job_id_of(json.loads(line.decode().removeprefix("data: "))["id"])
                    break
    deadline = time.monotonic() + 30
    while (await chat_status(router, key, left))["jobState"] != "Cancelled":
        assert time.monotonic() < deadline, "leaving the stream did not cancel the chat"
        await asyncio.sleep(0.1)
    # so does a client that stops waiting for an answer it did not ask to stream
    with pytest.raises(TimeoutError):
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.5)) as http:
            await http.post(f"{router.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"},
                            json={"model": MODEL, "max_tokens": 900, "temperature": 0,
                                  "messages": [{"role": "user", "content": LONG}]})
    [gone] = (await call(router, key, "QueryJobs", {"limit": 1}))["jobs"]
    deadline = time.monotonic() + 30
    while (await chat_status(router, key, gone["jobId"]))["jobState"] != "Cancelled":
        assert time.monotonic() < deadline, "a client that stopped waiting did not cancel its chat"
        await asyncio.sleep(0.1)
    answer = await client.chat.completions.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert answer.usage.completion_tokens <= 5  # the slots were freed


async def test_a_killed_llama_server_costs_the_chat_an_attempt_not_its_answer(
        client: openai.AsyncOpenAI, agents: Agents, router: Router, key: str) -> None:
    await client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    [server] = llama_servers(agents)
    stream = await client.chat.completions.create(model=MODEL, max_tokens=150, temperature=0, stream=True,
                                                  messages=[{"role": "user", "content": LONG}])
    pieces, killed = [], False
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            if not killed:
                os.kill(server.pid, signal.SIGKILL)
                killed = True
    final = await chat_status(router, key, job_id_of(chunk.id))
    assert final["jobState"] == "Completed", final
    assert "".join(pieces) == final["result"]["choices"][0]["message"]["content"]  # nothing sent twice
    assert final["result"]["usage"]["completion_tokens"] == 150
    [restarted] = llama_servers(agents)
    assert restarted.pid != server.pid


async def test_bad_input_is_a_400_naming_the_field(client: openai.AsyncOpenAI, router: Router, key: str) -> None:
    async def refused(**request: Any) -> dict[str, Any]:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(**{"model": MODEL, "messages": [{"role": "user", "content": "Hi"}],
                                                    **request})
        return caught.value.body  # type: ignore[return-value]

    unknown = await refused(model="gpt-17-turbo")
    assert unknown["param"] == "model" and "gpt-17-turbo" in unknown["message"]
    assert (await refused(messages=[]))["param"] == "messages"
    assert (await refused(messages=[{"role": "wizard", "content": "Hi"}]))["param"] == "messages[0].role"
    assert (await refused(messages=[{"role": "user", "content": ""}]))["param"] == "messages"
    too_many = await refused(max_tokens=CONTEXT)
    assert too_many["param"] == "max_tokens" and str(CONTEXT) in too_many["message"]
    too_long = await refused(messages=[{"role": "user", "content": "word " * (2 * CONTEXT)}])
    assert too_long["param"] == "messages" and f"context is {CONTEXT} tokens" in too_long["message"]
    streamed = await refused(stream=True, messages=[{"role": "user", "content": "word " * (2 * CONTEXT)}])
    assert streamed["param"] == "messages", "refused before any text: an HTTP 400 for a stream too"
    assert (await refused(logprobs=True))["param"] == "logprobs"
    assert (await refused(temperature=3))["param"] == "temperature"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{router.url}/v1/chat/completions", json={"model": MODEL}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "invalid_api_key"
    refused_queue = await call(router, key, "QueueOpenAiChatCompletion", {"request": {"model": MODEL}}, status=400)
    assert refused_queue["responseStatus"]["errors"][0]["fieldName"] == "request.messages"


async def test_forward_mode_serves_the_models_of_a_running_server(
        router: Router, key: str, agents: Agents, tmp_path: Path) -> None:
    """An agent in front of an OpenAI-compatible server already on the host (a llama-server here)."""
    port = free_port("127.0.0.1")
    [gguf] = packaged().values()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 - closed below
    server = subprocess.Popen([str(server_binary(load_settings(environ={}))), "--model", str(gguf), "--alias",
                               "house-model", "--host", "127.0.0.1", "--port", str(port), "--ctx-size", "1024",
                               "--threads", "1", "--no-webui"], stdout=log, stderr=subprocess.STDOUT)
    try:
        agents.start("forwarder", 4.0, [], GPUGATE_AGENT__RUNNERS='["chat"]',
                     GPUGATE_CHAT__OPENAI_URL=f"http://127.0.0.1:{port}")
        await router.wait_for_agents("forwarder", timeout=120)
        deadline = time.monotonic() + 60
        while "house-model" not in (await call(router, key, "ActiveAiModels", {}))["results"]:
            assert time.monotonic() < deadline, "the forwarding agent never listed the server's model"
            await asyncio.sleep(0.5)
        answer = await call(router, key, "OpenAiChatCompletion", {
            "model": "house-model", "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}], "refId": "fwd-1"})
        assert answer["choices"][0]["message"]["content"]
        [job] = (await call(router, key, "QueryJobs", {"refId": "fwd-1"}))["jobs"]
        assert job["agent"] == "forwarder"
    finally:
        forwarder = agents.procs.pop("forwarder")
        forwarder.terminate()
        forwarder.wait(30)
        server.terminate()
        server.wait(10)
        log.close()


async def test_the_least_recently_used_model_is_unloaded_to_make_room(
        client: openai.AsyncOpenAI, agents: Agents, router: Router) -> None:
    [gguf] = packaged().values()
    folder = agents.root / "talker" / "models" / "llm"
    folder.mkdir(exist_ok=True)
    (folder / "second.gguf").symlink_to(gguf)  # another model file (the same weights: it only needs to load)
    session = router.app[SESSIONS].sessions["talker"]
    deadline = time.monotonic() + 30
    while not any(m.name == "second.gguf" for m in session.models):  # listed at the next heartbeat
        assert time.monotonic() < deadline, "the new model file was never listed"
        await asyncio.sleep(0.2)
    await client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
    first = {p.pid for p in llama_servers(agents)}
    answer = await client.chat.completions.create(model="second.gguf", max_tokens=2,
                                                  messages=[{"role": "user", "content": "Hi"}])
    assert answer.model == "second.gguf"
    [now] = llama_servers(agents)
    assert now.pid not in first and "second.gguf" in " ".join(now.cmdline()), "the older model was stopped"
    deadline = time.monotonic() + 30
    while session.loaded != {"second.gguf"}:
        assert time.monotonic() < deadline, f"the agent reports {session.loaded} loaded"
        await asyncio.sleep(0.2)


async def test_a_key_may_chat_only_if_it_may_call_openaichatcompletion(router: Router, agents: Agents) -> None:
    images_only = create_key(router.app[STORE], "images only", apis=("TextToImage",)).token
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {images_only}"}) as http:
        async with http.post(f"{router.url}/v1/chat/completions",
                             json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}) as r:
            assert r.status == 403
            assert (await r.json())["error"] == {"message": "this key may not call OpenAiChatCompletion",
                                                 "type": "invalid_request_error", "param": None, "code": "Forbidden"}


def test_a_retried_stream_sends_only_what_the_client_lacks() -> None:
    text = SentText()
    assert text.add(1, 0, "Hello") == "Hello" and text.add(1, 5, " wor") == " wor"
    assert text.add(2, 0, "Hel") == "" and text.add(2, 3, "lo wor") == "" and text.add(2, 9, "ld") == "ld"
    assert text.rest("Hello world!") == "!"
    diverged = SentText()
    diverged.add(1, 0, "abc")
    assert diverged.add(2, 0, "xyz") == "" and diverged.add(2, 3, "w") == "" and diverged.rest("xyzw") is None


def test_a_gap_in_the_streamed_text_is_filled_from_the_final_answer() -> None:
    text = SentText()
    assert text.add(1, 0, "One, ") == "One, "
    assert text.add(1, 10, "three") == "", "the deltas at 5..10 were lost (the agent was reconnecting)"
    assert text.add(1, 15, ", four") == ""
    assert text.rest("One, two, three, four") == "two, three, four"
