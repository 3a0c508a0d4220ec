"""The router's aiohttp application: routes, middlewares, and the lifetime of its parts.

Open (in order): the store, then the job machinery (queue, dispatcher, outcomes, sessions,
retention, callbacks), the queue recovering unfinished jobs, and its background tasks, each
supervised (restarted with backoff if it ever dies). On shutdown: first every waiting sync call
answers with its job's reference and agents' sockets close (their jobs keep running and come back
to the next router), then the tasks stop in reverse order, the router's own worker finishes its
jobs, and the store closes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from gpugate.catalog import Catalog
from gpugate.settings import Settings

from .api import admin, chat, discovery, files, jobs, openapi, pages, public
from .api import agents as agent_api
from .api.auth import auth_middleware
from .api.errors import error_middleware
from .api.requests import APIS
from .archive import bring_up_to_date, keep_archiving
from .artifacts import ArtifactStore
from .callbacks import CallbackSender
from .dispatch import Dispatcher
from .events import JobEvents
from .families import FamilyTable
from .keys import new_webhook_secret, read_or_make
from .limits import KeyLimiter, KeyWeights
from .local import local_worker
from .lookup import JobFinder
from .metrics import Metrics
from .models import ModelBook
from .outcomes import Outcomes
from .peers import Peers
from .queue import JobQueue
from .retention import Retention
from .sessions import LOCAL_WORKER, SessionRegistry
from .state import (
    ARCHIVE, ARTIFACTS, CALLBACKS, CATALOG, DISPATCHER, FINDER, LIMITER, METRICS, MODELS, OUTCOMES, PEERS, QUEUE, RETENTION,
    SESSIONS, SETTINGS, SIGNER, STORE,
)
from .store import Store
from .store.backends import open_archive, open_store
from .urls import UrlSigner

GIVE_UP = web.AppKey("give_up", threading.Event)

log = logging.getLogger(__name__)
RESTART_MIN_S, RESTART_MAX_S = 1.0, 60.0
LOCK_CHECK_S = 2.0  # how often a router on PostgreSQL checks it still holds its database


def create_app(settings: Settings, store: Store | None = None) -> web.Application:
    app = web.Application(middlewares=[error_middleware, auth_middleware],
                          client_max_size=int(settings.router.request_limit_mb * 2**20))
    app[SETTINGS] = settings
    app[CATALOG] = Catalog.load(settings.router.catalog)
    app[ARTIFACTS] = ArtifactStore(settings.artifacts_dir)
    app[SESSIONS] = SessionRegistry(settings.router.agent_failure_limit, settings.router.agent_pause_s)
    app[MODELS] = ModelBook(app[CATALOG], FamilyTable.load(settings.router.families), app[SESSIONS])
    app[METRICS] = Metrics()
    app[SIGNER] = url_signer(settings)
    app[LIMITER] = KeyLimiter()
    app[GIVE_UP] = threading.Event()  # set when the router stops while it stands by (router.standby)
    app[PEERS] = None  # routers sharing a database (router.shared): set once the store is open
    app.add_routes([web.get("/health", health), *public.routes(settings.router.echo_api), *jobs.routes(),
                    *files.routes(), *discovery.routes(), *chat.routes(), *admin.routes(), *openapi.routes(), *pages.routes(), *agent_api.routes()])
    app.cleanup_ctx.append(_store(store))
    app.cleanup_ctx.append(_jobs)
    app.on_shutdown.append(_stop_waiting)
    return app


def url_signer(settings: Settings) -> UrlSigner:
    """The signer of file URLs, with the configured secret or the one kept in the data folder."""
    secret = settings.router.url_secret or read_or_make(settings.paths.data_dir / "url_secret",
                                                        lambda: secrets.token_urlsafe(32))
    return UrlSigner(secret, settings.router.signed_url_ttl_s)


async def health(request: web.Request) -> web.Response:
    problem = request.app[RETENTION].disk_problem()
    return web.json_response({"status": "ok", "agents": len(request.app[SESSIONS].remote()), "problems": [problem] if problem else []})


def _store(given: Store | None):  # noqa: ANN202 - a cleanup context
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        if given is not None:
            app[STORE] = given
        elif settings.router.database_url:  # may wait (a standby): in a thread, so signals are still heard
            app[STORE] = await asyncio.to_thread(open_store, settings, True, app[GIVE_UP])
        else:  # SQLite's connection stays on the thread that made it: this one
            app[STORE] = open_store(settings, router=True)
        if (open_async := getattr(app[STORE], "open_async", None)) is not None:
            await open_async()  # a store across the network: its hot calls on this loop, never blocking it
        app[ARCHIVE] = open_archive(app[SETTINGS], app[STORE])
        await bring_up_to_date(app[STORE], app[ARCHIVE])
        yield
        app[ARCHIVE].close()
        if (close_async := getattr(app[STORE], "close_async", None)) is not None:
            await close_async()
        app[STORE].close()

    return ctx


async def _jobs(app: web.Application) -> AsyncIterator[None]:
    settings, store = app[SETTINGS], app[STORE]
    secret = settings.router.webhook_secret or read_or_make(settings.paths.data_dir / "webhook_secret", new_webhook_secret)
    callbacks = app[CALLBACKS] = CallbackSender(store, settings.router, secret,
                                                lambda api: APIS[api].field_names if api in APIS else {}, app[SIGNER])
    queue = app[QUEUE] = JobQueue(store, JobEvents(), callbacks.delivery_for, app[METRICS].job_finished)
    dispatcher = app[DISPATCHER] = Dispatcher(queue, app[SESSIONS], settings.router.unplaceable_timeout_s, KeyWeights(store))
    queue.on_change = dispatcher.wake
    app[FINDER] = JobFinder(queue.live, store, app[ARCHIVE])
    retention = app[RETENTION] = Retention(store, app[ARTIFACTS], settings.router)
    outcomes = app[OUTCOMES] = Outcomes(queue, app[SESSIONS], retention, settings.router.lease_grace_s)
    peers = app[PEERS] = Peers(store, settings.router, queue, app[SESSIONS], outcomes) \
        if getattr(store, "shared", False) else None  # type: ignore[arg-type]
    others = peers.join() if peers is not None else frozenset()
    await queue.recover(time.time(), settings.router.lease_grace_s, live_routers=others)
    worker = f"{LOCAL_WORKER}@{app[SESSIONS].router_id}" if peers is not None else LOCAL_WORKER  # one per router
    tasks = [*([_supervised("peers", peers.run)] if peers is not None else []),
             _supervised("dispatcher", dispatcher.run),
             _supervised("database-lock", lambda: _keep_database(store)),
             _supervised("agent-watchdog", lambda: _watchdog(app)),
             _supervised("callbacks", callbacks.run),
             _supervised("archiver", lambda: keep_archiving(store, app[ARCHIVE], settings.router.archive_after_s,
                                                            settings.router.archive_every_s)),
             _supervised("retention", retention.run)]
    async with local_worker(app[SESSIONS], outcomes, dispatcher, app[ARTIFACTS], worker):
        yield
    for task in reversed(tasks):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _stop_waiting(app: web.Application) -> None:
    """First thing on shutdown: sync calls answer with their job's reference, agents' sockets close."""
    app[QUEUE].events.close()
    await agent_api.close_all(app)


async def _watchdog(app: web.Application) -> None:
    """Sessions silent past the heartbeat timeout are closed (a half-open connection); leases whose
    agents did not come back in time are given up."""
    timeout = app[SETTINGS].router.heartbeat_timeout_s
    every = min(timeout / 3, 1.0)
    while True:
        await asyncio.sleep(every)
        for session in app[SESSIONS].silent_since(time.monotonic() - timeout):
            log.warning("agent silent, closing its connection", extra={"agent": session.name})
            await session.disconnect()  # its socket handler then starts its leases' clock
        await app[OUTCOMES].expire_leases(time.time())
        await app[OUTCOMES].start_orphaned_clocks(time.time())


async def _keep_database(store: Store) -> None:
    """A router on PostgreSQL serves only while it holds its database (a standby takes over when
    the lock goes): if the lock's connection breaks, the router stops itself (SIGTERM, an orderly
    shutdown), rather than serve beside the standby. Its agents reconnect to the standby."""
    holds = getattr(store, "holds_lock", None)
    if holds is None:
        return
    while True:
        await asyncio.sleep(LOCK_CHECK_S)
        if not await asyncio.to_thread(holds):
            log.critical("this router lost its hold on the database (router.database_url); stopping so that "
                         "the standby serves alone")
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _supervised(name: str, run: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
    """A background task that is restarted (with backoff) if it ever ends by an error."""

    async def supervise() -> None:
        delay = RESTART_MIN_S
        while True:
            started = time.monotonic()
            try:
                await run()
                return
            except Exception:
                log.critical("router task died; restarting it", extra={"task": name, "in_s": delay}, exc_info=True)
            if time.monotonic() - started > RESTART_MAX_S:
                delay = RESTART_MIN_S
            await asyncio.sleep(delay)
            delay = min(delay * 2, RESTART_MAX_S)

    return asyncio.create_task(supervise(), name=name)
