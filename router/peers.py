"""Several routers serving one PostgreSQL and one file store at once (``router.shared``), behind a
load balancer: any of them answers any call for any job.

What they share, and how:
- The jobs are the store's: each router keeps a cache of every live job (router/queue.py), told of
  other routers' changes by notices (router/bus.py) and following them by reading the store.
  Each hands queued jobs to its own agents; the store's conditional claim gives a job to one.
- Watchers (sync calls, event streams, chat streams) of a job whose agent is on another router get
  its progress and text by notice, and its end from the store.
- A cancel through any router ends the job in the store; the router whose agent runs it stops it
  there (router/outcomes.py ``changed_elsewhere``).
- What agents reported is shared: every second each router writes its sessions' reports to
  ``agent_reports`` and reads the others', so every router knows every agent (models, why a job
  waits, whether it can ever run). An agent name is one session across routers: a second process
  under a connected name is refused by whichever router it reaches.
- Each router writes when it was last seen (``routers``). A router silent past
  ``router.peer_timeout_s`` is gone: the leases its agents' sessions held start their clock
  (``lease_grace_s``) for the agents to come back through another router, then are lost like any.
- ReplyTo callbacks are leased one attempt at a time in the store (router/callbacks.py): each is
  delivered by one router. Metrics are each router's own: scrape every router and sum.
"""

from __future__ import annotations

import asyncio
import logging
import time

from gpugate.settings import Router as RouterSettings

from .bus import Bus, Kind, Notice
from .outcomes import Outcomes
from .queue import JobQueue
from .retry import Decision
from .sessions import AgentSession, SessionRegistry, is_local_worker, router_of
from .store.postgres import PostgresStore

log = logging.getLogger(__name__)
BEAT_S = 1.0  # how often a router says it is alive and exchanges agent reports
RESYNC_S = 30.0  # how often a router reads every live job again anyway (a notice lost with a router that died)
DRAIN_S = 2.0  # a stopping router's last notices


class Peers:
    def __init__(self, store: PostgresStore, settings: RouterSettings, queue: JobQueue, sessions: SessionRegistry,
                 outcomes: Outcomes) -> None:
        self.store, self.settings, self.queue, self.sessions, self.outcomes = store, settings, queue, sessions, outcomes
        self.me = sessions.router_id
        self.url = settings.public_base_url or settings.local_url
        self.live: frozenset[str] = frozenset()  # the other routers heard from lately
        self.bus = Bus(store.url, self.me, self._apply, self._connected)
        self._resynced = time.monotonic()
        queue.announce = self.bus.publish

    def join(self) -> frozenset[str]:
        """Say this router is here and learn the others' agents; the other routers alive now (before
        the queue recovers: their agents' leases are theirs)."""
        alive, _ = self._talk({})
        log.info("router joined the routers sharing the database", extra={"router": self.me, "peers": sorted(self.live)})
        return alive

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(self.bus.run())
                tasks.create_task(self._beat())
        finally:  # stopping: the others learn its last changes, and need not wait for it to fall silent
            await self.bus.drain(DRAIN_S)
            await asyncio.to_thread(self.store.forget_router, self.me)

    # ---- agents ----------------------------------------------------------------------------------

    async def admit(self, session: AgentSession) -> bool:
        """Record a new session as its agent's one session across routers; False if another process
        under its name is connected to a router (the caller refuses it)."""
        return await asyncio.to_thread(self.store.admit_agent, session.name, session.instance, session.id, self.me,
                                       session.report(0), self.settings.peer_timeout_s)

    async def left(self, session: AgentSession) -> None:
        await asyncio.to_thread(self.store.agent_left, session.id)

    # ---- every second ----------------------------------------------------------------------------

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(BEAT_S)
            try:
                await self._exchange()
            except Exception:  # the database away for a while: the next beat tries again
                log.exception("exchange with the other routers failed")

    async def _exchange(self) -> None:
        running = self.queue.running_by_session()
        reports = {s.id: (s.name, s.instance, s.report(running.get(s.id, 0)))
                   for s in self.sessions.sessions.values() if not is_local_worker(s.name)}
        _, gone = await asyncio.to_thread(self._talk, reports)
        await self._take_back_leases()
        await self._start_clocks_of_gone()
        if gone or time.monotonic() - self._resynced > RESYNC_S:  # a router that died may not have told all
            self._resynced = time.monotonic()
            await self.queue.resync()
        for router in gone:
            log.warning("router gone silent; its agents' jobs wait for them to reconnect elsewhere",
                        extra={"router": router})
            await asyncio.to_thread(self.store.forget_router, router, self.settings.peer_timeout_s)

    def _talk(self, reports: dict[str, tuple[str, str, str]]) -> tuple[frozenset[str], set[str]]:
        """One exchange with the database (in a worker thread): this router's beat and its agents'
        reports out; the routers alive and gone, and the other routers' agents, in."""
        timeout = self.settings.peer_timeout_s
        self.store.router_seen(self.me, self.url)
        self.store.report_agents(self.me, reports)
        alive, silent = self.store.silent_routers(timeout)
        self.live = frozenset(alive - {self.me})
        peers = {}
        for row in self.store.agent_reports(timeout):
            if row["router"] not in self.live:
                continue
            try:
                peers[row["name"]] = AgentSession.of_report(row["report"])
            except (ValueError, KeyError, TypeError) as exc:  # another version's report, say: that agent is unknown here
                log.warning("agent report not understood; skipped", extra={"agent": row["name"], "error": str(exc)[:200]})
        self.sessions.peers = peers
        return self.live, silent - {self.me}

    async def _start_clocks_of_gone(self) -> None:
        """Leases held by sessions of routers that are gone (or unknown) start their clock; jobs that
        a gone router's own worker ran are queued again at once, at no attempt's cost."""
        gone = [j for j in self.queue.running() if j.lease_expires is None and router_of(j.session) not in (self.live | {self.me})]
        for job in [j for j in gone if is_local_worker(j.agent)]:
            await self.queue.requeue(job, Decision(True, charged=False))
        if leases := [j for j in gone if not is_local_worker(j.agent)]:
            await self.queue.start_lease_clocks(leases, time.time() + self.settings.lease_grace_s)

    async def _take_back_leases(self) -> None:
        """A lease of a session here that another router started the clock of (this router was
        silent too long: paused, or cut off) is this router's again."""
        if taken := [j for j in self.queue.running() if j.lease_expires is not None and self.sessions.by_id(j.session)]:
            await self.queue.start_lease_clocks(taken, None)

    # ---- notices from the other routers ------------------------------------------------------------

    async def _apply(self, notices: list[Notice]) -> None:
        """Notices in the order they came: the job changes among them are followed together, up to
        each progress or text notice (which needs the job as it is by then)."""
        changed: list[int] = []
        for notice in notices:
            if notice.kind == Kind.JOB:
                if notice.job_id not in changed:
                    changed.append(notice.job_id)
                continue
            if changed:
                await self.outcomes.changed_elsewhere(changed)
                changed = []
            job = self.queue.live.get(notice.job_id)
            if job is None or notice.event is None or notice.event.attempt != job.attempt:
                continue
            if notice.kind == Kind.PROGRESS:
                self.queue.set_progress(job, notice.event, here=False)  # type: ignore[arg-type]
            else:
                self.queue.stream(job, notice.event, here=False)  # type: ignore[arg-type]
        if changed:
            await self.outcomes.changed_elsewhere(changed)

    async def _connected(self) -> None:
        """The listener (re)connected: notices may have been missed meanwhile; read every live job again."""
        self._resynced = time.monotonic()
        await self.queue.resync()
