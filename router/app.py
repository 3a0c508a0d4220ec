"""The router's aiohttp application: routes, middlewares, and the lifetime of its parts.

Open (in order): the store, the queue (recovering unfinished jobs), the dispatcher and the agent
watchdog. Close in reverse: stop the tasks, close agent connections, close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from aiohttp import web

from gpugate.settings import Settings

from .agents import AgentRegistry
from .api import agents as agent_api
from .api import public
from .api.auth import auth_middleware
from .api.errors import error_middleware
from .artifacts import ArtifactStore
from .catalog import Catalog
from .local import NAME as LOCAL_WORKER
from .local import local_worker
from .queue import JobQueue
from .state import AGENTS, ARTIFACTS, CATALOG, QUEUE, SETTINGS, STORE
from .store import Store
from .store.sqlite import SqliteStore

log = logging.getLogger(__name__)


def create_app(settings: Settings, store: Store | None = None) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware],
                          client_max_size=int(settings.router.max_upload_mb * 2**20) * 3)
    app[SETTINGS] = settings
    app[CATALOG] = Catalog.load(settings.router.catalog)
    app[ARTIFACTS] = ArtifactStore(settings.artifacts_dir)
    app[AGENTS] = AgentRegistry()
    app.add_routes([web.get("/health", health), *public.routes(settings.router.echo_api), *agent_api.routes()])
    app.cleanup_ctx.append(_store(store))
    app.cleanup_ctx.append(_queue)
    return app


async def health(request: web.Request) -> web.Response:
    remote = [name for name in request.app[AGENTS].agents if name != LOCAL_WORKER]
    return web.json_response({"status": "ok", "agents": len(remote)})


def _store(given: Store | None):  # noqa: ANN202 - a cleanup context
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[STORE] = given or SqliteStore(app[SETTINGS].router_db)
        yield
        app[STORE].close()

    return ctx


async def _queue(app: web.Application) -> AsyncIterator[None]:
    queue = app[QUEUE] = JobQueue(app[STORE], app[AGENTS])
    queue.recover()
    tasks = [asyncio.create_task(queue.run(), name="dispatcher"),
             asyncio.create_task(_watchdog(app), name="agent-watchdog")]
    for task in tasks:
        task.add_done_callback(_crash_if_failed)
    async with local_worker(app[AGENTS], queue, app[ARTIFACTS]):
        yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _watchdog(app: web.Application) -> None:
    """An agent silent past the heartbeat timeout is lost (a half-open connection): its jobs go back."""
    timeout = app[SETTINGS].router.heartbeat_timeout_s
    while True:
        await asyncio.sleep(timeout / 3)
        for agent in app[AGENTS].silent_since(time.monotonic() - timeout):
            log.warning("agent silent, closing its connection", extra={"agent": agent.name})
            await agent.disconnect()  # its socket handler then requeues what it held


def _crash_if_failed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("router task died", extra={"task": task.get_name()}, exc_info=task.exception())
