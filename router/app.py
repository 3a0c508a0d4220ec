"""The router's aiohttp application: routes, middlewares, and the lifetime of its parts.

Open (in order): the store, the queue (recovering unfinished jobs) and its tasks: the dispatcher,
the agent watchdog, the callback sender and the archiver. Close in reverse: stop the tasks, close
agent connections, close the store.
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
from .api import admin, jobs, openapi, pages, public
from .api import agents as agent_api
from .api.requests import APIS
from .archive import JobArchive, keep_archiving
from .api.auth import auth_middleware
from .api.errors import error_middleware
from .artifacts import ArtifactStore
from .callbacks import CallbackSender
from gpugate.catalog import Catalog
from .keys import new_webhook_secret, read_or_make
from .local import local_worker
from .metrics import Metrics
from .queue import JobQueue
from .state import AGENTS, ARCHIVE, ARTIFACTS, CALLBACKS, CATALOG, METRICS, QUEUE, SETTINGS, STORE
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
    app[ARCHIVE] = JobArchive(settings.archive_dir)
    app[METRICS] = Metrics()
    app.add_routes([web.get("/health", health), *public.routes(settings.router.echo_api), *jobs.routes(),
                    *admin.routes(), *openapi.routes(), *pages.routes(), *agent_api.routes()])
    app.cleanup_ctx.append(_store(store))
    app.cleanup_ctx.append(_queue)
    return app


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "agents": len(request.app[AGENTS].remote())})


def _store(given: Store | None):  # noqa: ANN202 - a cleanup context
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        app[STORE] = given or SqliteStore(app[SETTINGS].router_db)
        yield
        app[STORE].close()

    return ctx


async def _queue(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    secret = settings.router.webhook_secret or read_or_make(settings.paths.data_dir / "webhook_secret", new_webhook_secret)
    callbacks = app[CALLBACKS] = CallbackSender(app[STORE], settings.router, secret,
                                                lambda api: APIS[api].field_names if api in APIS else {})
    queue = app[QUEUE] = JobQueue(app[STORE], app[AGENTS], app[ARCHIVE], callbacks.delivery_for,
                                  app[METRICS].job_finished)
    queue.recover()
    tasks = [asyncio.create_task(queue.run(), name="dispatcher"),
             asyncio.create_task(_watchdog(app), name="agent-watchdog"),
             asyncio.create_task(callbacks.run(), name="callbacks"),
             asyncio.create_task(keep_archiving(app[STORE], app[ARCHIVE], settings.router.archive_after_s,
                                                settings.router.archive_every_s), name="archiver")]
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
