"""The router process, and `gpugate up`: a router and a local agent in one process."""

from __future__ import annotations

import asyncio
import logging
import secrets
import signal

from aiohttp import web

from gpugate.settings import Settings

from .app import create_app
from .keys import authenticate, create_key, read_or_make
from .store.sqlite import SqliteStore

log = logging.getLogger(__name__)


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
    await runner.setup()
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
    store = SqliteStore(settings.router_db)
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


async def up(settings: Settings) -> None:
    from agent.main import serve as serve_agent

    local, admin = local_secrets(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"gpugate router: {router_url(local)}\nadmin key: {admin}\n"
          f"try: curl -H 'Authorization: Bearer {admin}' -H 'Content-Type: application/json' "
          f"-d '{{\"positivePrompt\": \"a lighthouse\"}}' {router_url(local)}/api/TextToImage", flush=True)
    router = asyncio.create_task(serve(local, stop, handle_signals=False), name="router")
    try:
        await serve_agent(local, stop)
    finally:
        stop.set()
        await router
