"""The agent process: start its engines, serve until told to stop, shut down in order.

Until the router exists (the next step of the plan) the agent runs its supervised ComfyUI and
reports what it can serve; the router link will pull jobs into the same engine.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from gpugate.settings import Settings

from .comfy.engine import ComfyEngine
from .gpu import list_gpus

log = logging.getLogger(__name__)


async def serve(settings: Settings, stop: asyncio.Event | None = None) -> None:
    """Run until SIGINT/SIGTERM (or ``stop`` is set), then stop ComfyUI and return."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        gpus = list_gpus()
        log.info("agent starting", extra={"gpus": [f"{g.index}:{g.name}" for g in gpus] or "cpu-only"})
        async with ComfyEngine(settings) as engine:
            models = await engine.models()
            workflows, problems = engine.library.scan()
            for problem in problems:
                log.error("workflow not loaded", extra={"problem": problem})
            log.info("agent ready", extra={
                "comfyui": engine.url,
                "workflows": ",".join(w.name for w in workflows),
                "models": ",".join(f"{m.kind}/{m.name}" for m in models) or "none",
            })
            print(f"gpugate agent ready: ComfyUI at {engine.url}; Ctrl-C to stop", flush=True)
            await stop.wait()
            log.info("agent stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
