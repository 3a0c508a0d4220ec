"""Routers that share a database tell each other what changed, through PostgreSQL's LISTEN/NOTIFY
(channel ``gpugate``): a job changed (the others read it again from the store), a running job's
progress, or the text it streamed (both only for watchers, never stored).

Notices go out in order on a connection of their own, each after the change it names was written.
A job's notice that could not be sent (the connection broke) is sent once the connection is back;
progress and text are best effort (a watcher whose router missed some still gets the finished
job). The listener reads the other routers' notices on another connection; each time it
(re)connects, the router reads every live job again (``on_connected``): it may have missed some.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import psycopg
from pydantic import ValidationError

from gpugate.wire import Delta, Progress

log = logging.getLogger(__name__)
CHANNEL = "gpugate"
PAYLOAD_MAX = 7000  # bytes of one notice (PostgreSQL refuses 8,000); longer text goes in pieces
QUEUE_MAX = 10_000  # notices waiting to go out; progress and text beyond it are dropped, job changes never
CHECK_S = 5.0  # a listener that heard nothing this long checks its connection
CONNECT_TIMEOUT_S = 10
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 5.0


class Kind(StrEnum):
    JOB = "job"  # changed: read it again
    PROGRESS = "progress"
    DELTA = "delta"


@dataclass(frozen=True)
class Notice:
    router: str  # who sent it (a router ignores its own)
    kind: Kind
    job_id: int
    event: Progress | Delta | None = None

    def encode(self) -> str:
        return json.dumps({"r": self.router, "k": self.kind, "j": self.job_id,
                           "e": self.event.model_dump() if self.event is not None else None}, separators=(",", ":"))

    @classmethod
    def decode(cls, payload: str) -> Notice:
        """Raises ValueError for a payload that is not a notice."""
        try:
            raw: dict[str, Any] = json.loads(payload)
            kind = Kind(raw["k"])
            event = {Kind.PROGRESS: Progress, Kind.DELTA: Delta}.get(kind)
            return cls(str(raw["r"]), kind, int(raw["j"]), event.model_validate(raw["e"]) if event else None)
        except (KeyError, TypeError, ValidationError, json.JSONDecodeError) as exc:
            raise ValueError(f"not a notice: {payload[:200]!r}") from exc


def notices_of(router: str, job_id: int, event: Progress | Delta | None) -> list[Notice]:
    """The notices for one change, each within PAYLOAD_MAX bytes encoded: streamed text that is
    longer goes in pieces (halved until each fits); progress that does not fit is not sent."""
    kind = Kind.JOB if event is None else Kind.PROGRESS if isinstance(event, Progress) else Kind.DELTA
    notice = Notice(router, kind, job_id, event)
    if len(notice.encode().encode()) <= PAYLOAD_MAX:
        return [notice]
    if not isinstance(event, Delta) or len(event.text) < 2:
        return []
    half = len(event.text) // 2
    return [*notices_of(router, job_id, event.model_copy(update={"text": event.text[:half]})),
            *notices_of(router, job_id, event.model_copy(update={"offset": event.offset + half, "text": event.text[half:]}))]


class Bus:
    def __init__(self, url: str, router: str, on_notices: Callable[[list[Notice]], Awaitable[None]],
                 on_connected: Callable[[], Awaitable[None]]) -> None:
        self.url, self.router = url, router
        self._on_notices, self._on_connected = on_notices, on_connected
        self._out: deque[Notice] = deque()
        self._ready = asyncio.Event()
        self._in: deque[Notice] = deque()  # heard, not yet applied
        self._heard = asyncio.Event()
        self.dropped = 0  # progress and text notices not sent (too many waiting)

    def publish(self, job_id: int, event: Progress | Delta | None = None) -> None:
        """Tell the other routers (never blocks: ``run`` sends it)."""
        for notice in notices_of(self.router, job_id, event):
            if notice.kind != Kind.JOB and len(self._out) >= QUEUE_MAX:
                if self.dropped % 1000 == 0:  # the first of a run, and every thousandth after it
                    log.warning("progress and text notices dropped: too many waiting to go out",
                                extra={"job": notice.job_id, "dropped": self.dropped + 1})
                self.dropped += 1
                continue
            self._out.append(notice)
        self._ready.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._connected("sender", self._send))
            tasks.create_task(self._connected("listener", self._listen))
            tasks.create_task(self._deliver())

    async def _send(self, db: psycopg.AsyncConnection[Any]) -> None:
        while True:
            await self._ready.wait()
            while self._out:
                try:
                    await db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._out[0].encode()))
                except psycopg.OperationalError:
                    raise  # the connection broke: the notice goes out on the next one
                except psycopg.Error as exc:  # refused for itself: the others must still go
                    log.error("notice refused by the database; dropped", extra={"job": self._out[0].job_id,
                                                                                 "error": str(exc)[:200]})
                self._out.popleft()
            self._ready.clear()

    async def drain(self, timeout: float) -> None:
        """Send the job changes still waiting (this router is stopping), for at most ``timeout`` seconds."""
        self._out = deque(n for n in self._out if n.kind == Kind.JOB)
        if not self._out:
            return
        try:
            async with asyncio.timeout(timeout), await self._connect() as db:
                while self._out:
                    await db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, self._out[0].encode()))
                    self._out.popleft()
        except (TimeoutError, psycopg.Error) as exc:
            log.warning("notices not sent before stopping; the other routers find the changes when they read the "
                        "store again", extra={"left": len(self._out), "error": str(exc)[:200]})

    async def _listen(self, db: psycopg.AsyncConnection[Any]) -> None:
        await db.execute(f"LISTEN {CHANNEL}")
        await self._on_connected()
        while True:
            async for message in db.notifies(timeout=CHECK_S):
                try:
                    notice = Notice.decode(message.payload)
                except ValueError as exc:
                    log.warning("bad notice ignored", extra={"error": str(exc)})
                    continue
                if notice.router != self.router:
                    self._in.append(notice)
                    self._heard.set()
            await db.execute("SELECT 1")  # quiet for a while: is the connection still there?

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S,
                                                     keepalives=1, keepalives_idle=10, keepalives_interval=5,
                                                     keepalives_count=3)

    async def _deliver(self) -> None:
        """Hand what was heard to the router, in order, as many notices at once as have come (under
        load, many job changes are followed with one read of the store)."""
        while True:
            await self._heard.wait()
            self._heard.clear()
            batch = list(self._in)
            self._in.clear()
            try:
                await self._on_notices(batch)
            except Exception:  # notices that cannot be applied must not stop the ones after them
                log.exception("notices not applied; reading every live job again",
                              extra={"jobs": sorted({n.job_id for n in batch})[:20]})
                try:
                    await self._on_connected()
                except Exception:
                    log.exception("live jobs not read again; the next periodic read will")

    async def _connected(self, role: str, work: Callable[[psycopg.AsyncConnection[Any]], Awaitable[None]]) -> None:
        """Run ``work`` on a connection of its own, on a new one whenever the last broke."""
        delay = BACKOFF_MIN_S
        while True:
            try:
                async with await self._connect() as db:
                    delay = BACKOFF_MIN_S
                    await work(db)
            except psycopg.OperationalError as exc:
                log.warning("bus connection lost; reconnecting", extra={"role": role, "error": str(exc)[:200], "in_s": delay})
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
