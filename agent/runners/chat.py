"""Chat (LLMs) on the agent: OpenAI-style chat completions, streamed token by token.

Two ways to serve them (``chat.openai_url``):
- local (the default): GGUF models from models/llm/ (plus the packaged SmolLM2-135M), each run by
  its own supervised llama-server (agent/chat/servers.py) with ``chat.parallel`` slots;
- forward: an OpenAI-compatible server already on the host (Ollama, vLLM, llama-server); the agent
  offers the models it lists and passes each chat on.

Either way the capability ``chat`` has slots of its own (``chat.parallel`` chats at once, apart
from ``agent.concurrency``), each piece of text goes to the router as it comes (JobProgress.text),
and the answer's usage and timings come back as the job's details.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp
import psutil

from gpugate.errors import FieldError, InvalidRequest
from gpugate.settings import Settings
from gpugate.wire import Capability, Model

from ..chat.build import server_binary
from ..chat.models import ModelFiles
from ..chat.servers import LlamaServers
from ..chat.stream import stream_chat
from ..gpu import list_gpus
from . import JobProgress, RunResult

log = logging.getLogger(__name__)
KIND = "llm"
LIST_TIMEOUT = aiohttp.ClientTimeout(total=10)
# what the router passes on from the request (router/chat.py checks each)
SAMPLING = ("max_tokens", "temperature", "top_p", "seed", "stop", "response_format", "frequency_penalty",
            "presence_penalty", "logit_bias")


class ChatRunner:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings.chat
        self.files = ModelFiles(settings.paths.models_dir / "llm")
        gpus = list_gpus()
        pin = settings.agent.gpu  # a per-GPU worker's own GPU
        mine = [g for g in gpus if pin is None or g.index == pin]
        self.forward = self.settings.openai_url.rstrip("/") if self.settings.openai_url else None
        self._forwarded: list[str] = []  # what the forward server listed last
        budget = self.settings.memory_budget_mb
        if budget is None:
            budget = (mine[0].vram_total if mine else psutil.virtual_memory().total // 2) / 2**20
        self.budget = int(budget * 2**20)
        binary = server_binary(settings)
        self.servers = LlamaServers(self.settings, binary, self.budget, gpu=bool(mine), pin=pin if mine else None)
        self.available = self.forward is not None or binary.exists()
        if not self.available:
            log.warning("chat is off: llama-server is missing (run `gpugate llm provision`, or set chat.server "
                        "or chat.openai_url)", extra={"path": str(binary)})
        self._timeout = aiohttp.ClientTimeout(total=self.settings.request_timeout_s, sock_connect=10)

    def capabilities(self) -> list[Capability]:
        if not self.available:
            return []
        return [Capability(name="chat", model_kind=KIND, vram_base=0, vram_per_megapixel=0, slots=self.settings.parallel,
                           description="OpenAI chat completions (llama.cpp)")]

    async def models(self) -> list[Model]:
        if not self.available:
            return []
        if self.forward is not None:
            return [Model(kind=KIND, name=name) for name in await self._list_forwarded()]
        out = []
        for name, path in (await asyncio.to_thread(self.files.scan)).items():
            try:
                context = await asyncio.to_thread(self.files.context, path, self.settings.context)
                memory = await asyncio.to_thread(self.files.memory, path, context, self.settings.parallel)
            except Exception as exc:  # a broken or foreign file must not hide the others
                log.warning("not a usable GGUF model", extra={"model": name, "error": f"{type(exc).__name__}: {exc}"})
                continue
            if memory > self.budget:  # never offered: the router sends it to an agent that can hold it
                log.warning("chat model larger than this agent's budget (chat.memory_budget_mb); not offered",
                            extra={"model": name, "memory_mb": memory // 2**20, "budget_mb": self.budget // 2**20})
                continue
            out.append(Model(kind=KIND, name=name, size=path.stat().st_size, vram=memory, context=context))
        return out

    def loaded(self) -> list[str]:
        return self.servers.loaded()  # a forward server loads what it likes: nothing is known to be loaded

    async def warm(self, model: str) -> bool:
        if not self.available or self.forward is not None:
            return False
        if model not in await asyncio.to_thread(self.files.scan):
            return False
        await self.run("chat", f"warm-{model}", {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                                 "max_tokens": 1}, lambda p: None)
        return True

    async def close(self) -> None:
        await self.servers.close()

    async def run(self, capability: str, job_id: str, params: dict[str, Any],
                  on_progress: Callable[[JobProgress], None]) -> RunResult:
        name = params.get("model") or self.settings.default_model
        body: dict[str, Any] = {"model": name, "messages": params["messages"],
                                **{k: params[k] for k in SAMPLING if params.get(k) is not None}}

        def on_text(text: str) -> None:
            on_progress(JobProgress(text=text))

        async with aiohttp.ClientSession(timeout=self._timeout) as http:
            if self.forward is not None:
                headers = {"Authorization": f"Bearer {self.settings.openai_key}"} if self.settings.openai_key else None
                answer = await stream_chat(http, f"{self.forward}/v1/chat/completions", body, on_text, headers)
            else:
                path = (await asyncio.to_thread(self.files.scan)).get(name)
                if path is None:
                    known = ", ".join(sorted(self.files.paths)) or "none"
                    raise InvalidRequest(FieldError("model", f"{name!r} is not installed here; installed: {known}",
                                                    "not_installed"))
                context = await asyncio.to_thread(self.files.context, path, self.settings.context)
                memory = await asyncio.to_thread(self.files.memory, path, context, self.settings.parallel)
                async with self.servers.use(name, path, context, memory) as url:
                    answer = await stream_chat(http, f"{url}/v1/chat/completions", body, on_text)
        log.info("chat done", extra={"job": job_id, "model": name, **{k: v for k, v in answer.usage.items()}})
        return RunResult(texts=[answer.content], details=answer.details())

    async def _list_forwarded(self) -> list[str]:
        headers = {"Authorization": f"Bearer {self.settings.openai_key}"} if self.settings.openai_key else None
        try:
            async with aiohttp.ClientSession(timeout=LIST_TIMEOUT) as http, \
                    http.get(f"{self.forward}/v1/models", headers=headers) as response:
                response.raise_for_status()
                self._forwarded = sorted(m["id"] for m in (await response.json()).get("data", []))
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            log.warning("the chat server did not list its models", extra={"url": self.forward, "error": str(exc)})
        return self._forwarded
