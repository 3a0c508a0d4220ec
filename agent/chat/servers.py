"""Loaded chat models: one supervised llama-server per model, within a memory budget.

A model is loaded on its first chat (or at warm-up) as a llama-server child on a free loopback
port, with ``chat.parallel`` slots (continuous batching) and every layer on the GPU when there is
one. It stays loaded while chats use it; when loading another would pass the budget, the models
unused longest that no chat is using are stopped first. A server that dies is restarted by its
supervisor (agent/supervised.py); the chats it was serving lose their connection and are run
again by the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from gpugate.errors import EngineUnavailable, InfrastructureFault, OutOfMemory
from gpugate.settings import Chat

from ..comfy.launch import free_port
from ..supervised import SupervisedServer

log = logging.getLogger(__name__)
GB = 2**30


@dataclass
class _Loaded:
    name: str
    server: SupervisedServer
    memory: int
    active: int = 0  # chats using it, and a load under way
    last_used: float = field(default_factory=time.monotonic)


class LlamaServers:
    """``gpu``: whether there is a GPU to offload to; ``pin``: the one GPU its servers may use (a
    per-GPU worker's, as CUDA_VISIBLE_DEVICES), or None for all."""

    def __init__(self, settings: Chat, binary: Path, budget: int, gpu: bool, pin: int | None = None) -> None:
        self.settings, self.binary, self.budget, self.gpu, self.pin = settings, binary, budget, gpu, pin
        self._loaded: dict[str, _Loaded] = {}
        self._loading: dict[str, asyncio.Lock] = {}  # per model: one load at a time
        self._room = asyncio.Lock()  # evictions and reservations, one at a time (never held while loading)
        self._released = asyncio.Condition()

    def loaded(self) -> list[str]:
        return list(self._loaded)

    def pid(self, name: str) -> int | None:
        loaded = self._loaded.get(name)
        return loaded.server.pid if loaded else None

    @contextlib.asynccontextmanager
    async def use(self, name: str, path: Path, context: int, memory: int) -> AsyncIterator[str]:
        """The base URL of ``name``'s server for one chat, loading it first if need be (other
        models' chats go on meanwhile)."""
        loaded = await self._get(name, path, context, memory)  # counted as in use from here
        try:
            await loaded.server.wait_ready(self.settings.startup_timeout_s)  # a restart may be under way
            yield loaded.server.url
        finally:
            await self._release(loaded)

    async def _release(self, loaded: _Loaded) -> None:
        loaded.active -= 1
        loaded.last_used = time.monotonic()
        async with self._released:
            self._released.notify_all()

    async def _get(self, name: str, path: Path, context: int, memory: int) -> _Loaded:
        if (loaded := self._loaded.get(name)) is not None:
            loaded.active += 1
            return loaded
        async with self._loading.setdefault(name, asyncio.Lock()):
            if (loaded := self._loaded.get(name)) is not None:
                loaded.active += 1
                return loaded
            server = self._server(name, path, context)
            async with self._room:
                await self._make_room(name, memory)
                loaded = self._loaded[name] = _Loaded(name, server, memory, active=1)  # reserved: never evicted
            try:
                await server.start()
            except BaseException as exc:  # failed, or the chat was cancelled meanwhile: no child left behind
                self._loaded.pop(name, None)
                await asyncio.shield(server.stop())
                await self._release(loaded)
                if isinstance(exc, EngineUnavailable):
                    raise InfrastructureFault(f"chat model {name} did not load: {exc}") from exc
                raise
            log.info("chat model loaded", extra={"model": name, "pid": server.pid, "memory_mb": memory // 2**20})
            return loaded

    async def _make_room(self, name: str, memory: int) -> None:
        """Stop idle models, least recently used first, until ``memory`` fits; wait for busy ones."""
        deadline = time.monotonic() + self.settings.request_timeout_s
        while sum(m.memory for m in self._loaded.values()) + memory > self.budget:
            idle = sorted((m for m in self._loaded.values() if m.active == 0), key=lambda m: m.last_used)
            if idle:
                await self.unload(idle[0].name)
                continue
            async with self._released:
                try:
                    await asyncio.wait_for(self._released.wait(), max(deadline - time.monotonic(), 0.001))
                except TimeoutError:
                    raise OutOfMemory(f"model {name} does not fit beside the loaded models, all in use") from None

    async def unload(self, name: str) -> None:
        loaded = self._loaded.pop(name, None)
        if loaded is not None:
            await asyncio.shield(loaded.server.stop())  # even if the caller is cancelled: no child left behind
            log.info("chat model unloaded", extra={"model": name})

    async def close(self) -> None:
        for name in list(self._loaded):
            await self.unload(name)

    def _server(self, name: str, path: Path, context: int) -> SupervisedServer:
        port = free_port("127.0.0.1")
        layers = self.settings.gpu_layers if self.settings.gpu_layers is not None else (999 if self.gpu else 0)
        command = [str(self.binary), "--model", str(path), "--alias", name, "--host", "127.0.0.1", "--port", str(port),
                   "--parallel", str(self.settings.parallel), "--ctx-size", str(context * self.settings.parallel),
                   "--n-gpu-layers", str(layers), "--no-webui", "--jinja", "--no-kv-unified"]
        if self.settings.threads:
            command += ["--threads", str(self.settings.threads)]
        env = {} if self.pin is None else {"CUDA_VISIBLE_DEVICES": str(self.pin)}  # this worker's GPU only
        return SupervisedServer(command, url=f"http://127.0.0.1:{port}", cwd=path.parent, env=env,
                                startup_timeout_s=self.settings.startup_timeout_s,
                                backoff_s=self.settings.restart_backoff_s, backoff_max_s=self.settings.restart_backoff_max_s,
                                liveness_timeout_s=60.0, liveness_every_s=10.0,
                                label=f"llama-server {name}", health_path="/health", logger="llama-server")
