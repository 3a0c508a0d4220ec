"""The router's durable state behind a narrow interface: jobs and their leases, the files they
own, refIds, callback deliveries and API keys.

Only :mod:`router.queue` (jobs), :mod:`router.retention` (files), :mod:`router.callbacks`
(deliveries), :mod:`router.archive` (moving finished jobs out) and :mod:`router.keys` (keys) call
it. Every state change of a job is one conditional statement (``WHERE state = ... AND attempt =
...``), so a claim is atomic and a late answer from an agent that lost its claim changes nothing.

Who runs a job is one fact, its lease: ``(attempt, session, lease_expires)`` on the job's row. The
session is the agent connection that holds it; ``lease_expires`` is None while that connection is
up, and set when it closes (or when the router starts), so the agent has until then to come back
and claim the job again (wire.Hello.held). :mod:`.sqlite` is the default backend; another
(PostgreSQL) implements the same protocol.

The methods block; the router's services make their calls through ``store_call``, which keeps a
store across the network (PostgreSQL) off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar


class JobState(StrEnum):
    """AI Server's job states (``jobState`` on the wire)."""

    QUEUED = "Queued"
    STARTED = "Started"
    COMPLETED = "Completed"
    FAILED = "Failed"
    CANCELLED = "Cancelled"


@dataclass
class Job:
    id: int
    api: str  # the public API it came through: TextToImage, ...
    capability: str  # what an agent runs: txt2img, ...
    params: dict[str, Any]
    inputs: dict[str, str]  # parameter -> the stored name of an uploaded file
    model: str | None
    megapixels: float
    max_attempts: int
    key_id: int | None = None
    ref_id: str | None = None
    tag: str | None = None
    reply_to: str | None = None
    base_url: str | None = None  # where the client reached the router: its callback's URLs use it
    state: JobState = JobState.QUEUED
    attempt: int = 0  # claims so far: the lease's attempt number
    failures: int = 0  # failed attempts that counted against max_attempts
    agent: str | None = None  # the name of the agent that runs (or ran) it
    session: str | None = None  # the agent session holding the lease while Started
    lease_expires: float | None = None  # when a lease whose session is gone is given up
    avoid: list[str] = field(default_factory=list)  # agents that lost it: preferred last, never banned
    min_free_vram: int = 0
    notes: list[str] = field(default_factory=list)  # what the router decided for the client (family defaults, ...)
    results: dict[str, Any] | None = None  # {"artifacts": [...], "texts": [...]}
    error: dict[str, Any] | None = None
    created: float = 0.0
    started: float | None = None
    finished: float | None = None


@dataclass
class Delivery:
    """A job's final status on its way to the job's replyTo URL (the persisted outbox)."""

    id: int
    job_id: int
    key_id: int | None  # whose webhook secret signs it
    url: str
    webhook_id: str  # the same on every attempt: receivers drop duplicates by it
    body: str  # JSON, fixed when the job finished
    created: float
    attempts: int = 0
    next_at: float = 0.0
    state: str = "pending"  # then "delivered" or "failed" (gave up)
    last_error: str | None = None


@dataclass(frozen=True)
class JobQuery:
    """A search over jobs, live or archived; every given field must match."""

    ref_id: str | None = None
    tag: str | None = None
    key_id: int | None = None
    state: str | None = None
    since: float | None = None  # created at or after (unix time)
    until: float | None = None  # created before
    limit: int = 100


@dataclass(frozen=True)
class Key:
    id: int
    name: str
    prefix: str  # the first characters, to recognise a key in listings
    apis: tuple[str, ...] | None  # None: every API
    admin: bool
    created: float
    revoked: bool
    webhook_secret: str | None = None  # signs this key's callbacks (else the server's secret)
    limits: KeyLimits = field(default_factory=lambda: KeyLimits())


@dataclass(frozen=True)
class KeyLimits:
    """What a key may ask of the queue: its share when keys take turns (``weight`` jobs a turn),
    how many of its jobs may wait at once, and how many it may submit a minute (None: no limit)."""

    weight: int = 1
    max_queued: int | None = None
    per_minute: int | None = None


@dataclass(frozen=True)
class StoredFile:
    """A file of the store and whose it is: the job (and so the key) it came with or from."""

    name: str
    job_id: int
    key_id: int | None
    label: str | None  # a readable file name, for downloads


def query_sql(table: str, query: JobQuery, mark: str) -> tuple[str, list[Any]]:
    """The SELECT for ``query`` on ``table`` (newest first), with ``mark`` as the driver's
    placeholder (SQLite's ``?``, psycopg's ``%s``), and its arguments."""
    where, args = [], []
    for column, value in (("ref_id", query.ref_id), ("tag", query.tag), ("key_id", query.key_id),
                          ("state", query.state)):
        if value is not None:
            where.append(f"{column} = {mark}")
            args.append(value)
    if query.since is not None:
        where.append(f"created >= {mark}")
        args.append(query.since)
    if query.until is not None:
        where.append(f"created < {mark}")
        args.append(query.until)
    sql = f"SELECT * FROM {table}" + (f" WHERE {' AND '.join(where)}" if where else "") + f" ORDER BY id DESC LIMIT {mark}"
    return sql, [*args, query.limit]


R = TypeVar("R")


async def store_call(store: Store, call: Callable[..., R], *args: Any) -> R:
    """``call`` (a method of ``store``) without holding up the event loop. SQLite: on this thread
    (its connection belongs to the thread that opened it; a call takes tens of microseconds). A
    store across the network once its async connections are open (PostgreSQL, ``async_ready``):
    the method's async twin (``async_<name>``) for the hot calls, a worker thread for the rest."""
    if not getattr(store, "async_ready", False):
        return call(*args)
    twin = getattr(store, f"async_{getattr(call, '__name__', '')}", None)
    if twin is not None:
        return await twin(*args)  # type: ignore[no-any-return]
    return await asyncio.to_thread(call, *args)


class DuplicateRefId(Exception):
    """A key used a refId it already used."""


class Store(Protocol):
    # jobs and their leases
    def add_job(self, job: Job) -> Job: ...
    def get_job(self, job_id: int) -> Job | None: ...
    def get_jobs(self, job_ids: list[int]) -> list[Job]: ...
    def job_id_by_ref(self, key_id: int | None, ref_id: str) -> int | None: ...
    def unfinished_jobs(self) -> list[Job]: ...
    def claim(self, job: Job, agent: str, session: str, now: float) -> bool: ...
    def requeue(self, job: Job) -> bool: ...
    def finish(self, job: Job, now: float, delivery: Delivery | None = None) -> bool: ...
    def set_lease_expiry(self, job: Job, expires: float | None) -> bool: ...
    def move_lease(self, job: Job, session: str) -> bool: ...
    def find_jobs(self, query: JobQuery) -> list[Job]: ...
    def finished_before(self, when: float, limit: int) -> list[Job]: ...
    def forget_jobs(self, job_ids: list[int]) -> None: ...
    # refIds outlive the jobs (archived or not) they name
    def needs_backfill(self) -> bool: ...
    def backfill(self, jobs: list[Job]) -> None: ...
    def mark_current(self) -> None: ...
    # files the jobs own (inputs and outputs), for retention
    def file(self, name: str) -> StoredFile | None: ...
    def owned_files(self, names: list[str]) -> set[str]: ...
    def expired_files(self, finished_before: float, limit: int) -> list[str]: ...
    def forget_files(self, names: list[str]) -> None: ...
    def due_deliveries(self, now: float, limit: int) -> list[Delivery]: ...
    def next_delivery_at(self) -> float | None: ...
    def claim_delivery(self, delivery: Delivery, until: float) -> bool: ...
    def update_delivery(self, delivery: Delivery) -> None: ...
    def forget_deliveries(self, before: float) -> int: ...
    def add_key(self, name: str, digest: str, prefix: str, apis: tuple[str, ...] | None, admin: bool, now: float,
                webhook_secret: str | None = None, limits: KeyLimits = KeyLimits()) -> Key: ...
    def set_key_limits(self, key_id: int, limits: KeyLimits) -> bool: ...
    def key_by_digest(self, digest: str) -> Key | None: ...
    def get_key(self, key_id: int) -> Key | None: ...
    def list_keys(self) -> list[Key]: ...
    def revoke_key(self, key_id: int) -> bool: ...
    def close(self) -> None: ...
