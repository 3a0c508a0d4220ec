"""The router process, and `gpugate up`: a router, and a local agent as its supervised child."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import time
from pathlib import Path

from aiohttp import web

from gpugate.children import die_with_parent

from gpugate.settings import Settings

from .app import GIVE_UP, create_app
from .keys import authenticate, create_key, read_or_make
from .store.backends import open_store

log = logging.getLogger(__name__)
AGENT_RESTART_MIN_S, AGENT_RESTART_MAX_S = 1.0, 60.0
AGENT_STOP_MARGIN_S = 30.0  # beyond its shutdown grace period, before the local agent is killed


def router_url(settings: Settings) -> str:
    return settings.router.local_url


async def serve(settings: Settings, stop: asyncio.Event | None = None, *, handle_signals: bool = True) -> None:
    """Serve the router until SIGINT/SIGTERM or ``stop``; then close connections and the store."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(create_app(settings), handle_signals=False, shutdown_timeout=5)
    setup, stopped = asyncio.ensure_future(runner.setup()), asyncio.ensure_future(stop.wait())
    await asyncio.wait({setup, stopped}, return_when=asyncio.FIRST_COMPLETED)
    stopped.cancel()
    if not setup.done():  # told to stop while it starts (a standby waiting for the active router)
        runner.app[GIVE_UP].set()
        with contextlib.suppress(Exception):
            await setup
        with contextlib.suppress(Exception):
            await runner.cleanup()
        return
    setup.result()  # a failed start raises here
    try:
        await web.TCPSite(runner, settings.router.listen, settings.router.port).start()
        log.info("router listening", extra={"url": router_url(settings)})
        await stop.wait()
    finally:
        await runner.cleanup()
        if handle_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)


def local_secrets(settings: Settings) -> tuple[Settings, str]:
    """For `gpugate up`: an agent token and an admin key, made on first use and kept in the data folder."""
    data = settings.paths.data_dir
    data.mkdir(parents=True, exist_ok=True)
    token = settings.router.agent_token or read_or_make(data / "agent_token", lambda: secrets.token_urlsafe(32))
    store = open_store(settings)
    try:
        def new_admin() -> str:
            return create_key(store, "admin (gpugate up)", admin=True).token

        admin = read_or_make(data / "admin_key", new_admin)
        if authenticate(store, f"Bearer {admin}") is None:  # revoked meanwhile: make another
            (data / "admin_key").unlink()
            admin = read_or_make(data / "admin_key", new_admin)
    finally:
        store.close()
    local = settings.model_copy(update={
        "router": settings.router.model_copy(update={"agent_token": token}),
        "agent": settings.agent.model_copy(update={"router_url": router_url(settings), "token": token}),
    })
    return local, admin


async def up(settings: Settings, config: Path | None = None, log_level: str = "INFO") -> None:
    """A router, and a local agent joining it. The agent runs as a child process: whatever happens
    to it (a crash, a kill by the OOM killer) the router stays up, and the agent is started again
    with backoff. On SIGINT/SIGTERM the agent drains first (its jobs finish and answer), then the
    router stops."""
    local, admin = local_secrets(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"gpugate router: {router_url(local)}\nadmin key: {admin}\n"
          f"try: curl -H 'Authorization: Bearer {admin}' -H 'Content-Type: application/json' "
          f"-d '{{\"positivePrompt\": \"a lighthouse\"}}' {router_url(local)}/api/TextToImage", flush=True)
    router_stop = asyncio.Event()
    router = asyncio.create_task(serve(local, router_stop, handle_signals=False), name="router")
    agent = asyncio.create_task(_local_agent(local, config, log_level, stop), name="local-agent")
    try:
        await asyncio.wait({router, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.set()
        await agent
        router_stop.set()
        await router  # raises what stopped it, if it failed (a port in use, say)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _local_agent(settings: Settings, config: Path | None, log_level: str, stop: asyncio.Event) -> None:
    """Run `gpugate agent` for this router until ``stop``; start it again whenever it exits."""
    command = [sys.executable, "-m", "gpugate.cli", "--log-level", log_level,
               *(["--config", str(config)] if config else []), "agent"]
    env = {**os.environ, "GPUGATE_AGENT__ROUTER_URL": settings.agent.router_url or "",
           "GPUGATE_AGENT__TOKEN": settings.agent.token or ""}
    delay = AGENT_RESTART_MIN_S
    while not stop.is_set():
        started = time.monotonic()
        proc = await asyncio.create_subprocess_exec(*command, env=env, stdin=asyncio.subprocess.DEVNULL,
                                                    preexec_fn=die_with_parent)
        stopping = asyncio.create_task(stop.wait())
        exited = asyncio.create_task(proc.wait())
        await asyncio.wait({stopping, exited}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not exited.done():  # stopping: let it drain, within its grace period
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(exited, settings.agent.shutdown_grace_s + AGENT_STOP_MARGIN_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            return
        if time.monotonic() - started > AGENT_RESTART_MAX_S:
            delay = AGENT_RESTART_MIN_S
        log.error("local agent exited; starting it again", extra={"returncode": proc.returncode, "pid": proc.pid,
                                                                   "in_s": delay})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        delay = min(delay * 2, AGENT_RESTART_MAX_S)
