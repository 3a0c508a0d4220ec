"""The agent process: start its engines, join the router (when one is configured), serve until
told to stop, and shut down in order: leave the router, stop ComfyUI."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator

from gpugate.settings import Settings

from .comfy.engine import ComfyEngine
from .gpu import plan_workers, report_devices
from .link import RouterLink
from .runners import Runner
from .runners.chat import ChatRunner
from .runners.comfy import ComfyRunner
from .runners.echo import EchoRunner
from .runners.media import MediaRunner
from .runners.speech import PiperRunner, WhisperRunner

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def runners(settings: Settings) -> AsyncIterator[list[Runner]]:
    """The capabilities this agent offers (``agent.runners``), started, and stopped on exit.
    Speech models are loaded while ComfyUI starts, so both are warm when the agent joins; chat
    models load on their first chat (or by ``agent.warm_models``)."""
    chosen = settings.agent.runners
    out: list[Runner] = [EchoRunner()] if "echo" in chosen else []
    if "media" in chosen:
        out.append(MediaRunner(settings))
    chat = ChatRunner(settings) if "chat" in chosen else None
    if chat is not None:
        out.append(chat)
    warming = []
    if "speech" in chosen:
        speech = [WhisperRunner(settings), PiperRunner(settings)]
        out += speech
        warming = [asyncio.create_task(r.warm(), name=f"warm-{type(r).__name__}") for r in speech]
    try:
        if "comfy" not in chosen:
            await asyncio.gather(*warming)
            yield out
            return
        async with ComfyEngine(settings) as engine:
            await asyncio.gather(*warming)
            workflows, problems = engine.library.scan()
            for problem in problems:
                log.error("workflow not loaded", extra={"problem": problem})
            log.info("ComfyUI engine ready", extra={"comfyui": engine.url, "workflows": ",".join(w.name for w in workflows)})
            yield [*out, ComfyRunner(engine)]
    finally:
        for task in warming:
            task.cancel()
        await asyncio.gather(*warming, return_exceptions=True)
        if chat is not None:
            await chat.close()


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or ``stop`` is set), then stop everything and return. On a host with
    several GPUs, one worker per GPU (agent/gpu.py plan_workers), each with its own link."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        cpu_only, devices = report_devices(settings)
        workers = plan_workers(settings, [] if cpu_only else devices, socket.gethostname())
        log.info("agent starting", extra={"devices": ",".join(f"{d.index}:{d.name}" for d in devices),
                                          "cpu_only": cpu_only, "workers": len(workers)})
        async with contextlib.AsyncExitStack() as stack:
            started = await asyncio.gather(*(stack.enter_async_context(runners(w)) for w in workers),
                                           return_exceptions=True)  # all settle first: the stack stops those that started
            if failed := [e for e in started if isinstance(e, BaseException)]:
                raise failed[0]
            offered: list[list[Runner]] = started  # type: ignore[assignment]
            models = sorted({f"{m.kind}/{m.name}" for rs in offered for r in rs for m in await r.models()})
            log.info("agent ready", extra={"models": ",".join(models) or "none"})
            if settings.agent.router_url:
                print(f"gpugate agent ready, joining {settings.agent.router_url}; Ctrl-C to stop", flush=True)
                await asyncio.gather(*(RouterLink(w, rs).run(stop) for w, rs in zip(workers, offered)))
            else:
                print("gpugate agent ready (no router configured); Ctrl-C to stop", flush=True)
                await stop.wait()
            log.info("agent stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
