"""The live jobs and every change of their state: accept, claim, requeue, finish, and the leases.

The store is the durable copy, written first on every change (each a conditional statement, so a
stale change does nothing); ``live`` is its cache of queued and running jobs, for dispatch and
status. A restarted router reloads it: queued jobs stay queued; running jobs stay running, their
leases given ``lease_grace_s`` for their agents to reconnect and claim them again (wire.Hello.held),
after which router/outcomes.py queues them again.

Routers that share a database (router.shared) each keep this cache of every live job: each change
made here is ``announce``d to the others (router/peers.py, through PostgreSQL), and a change
another router announced is followed by reading the job again from the store (``follow``).

Who decides what: router/dispatch.py picks agents and claims, router/outcomes.py turns agents'
answers and losses into requeue/finish through router/retry.py; this module only applies them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from gpugate.errors import FailureKind
from gpugate.wire import Delta, Failure, Progress

from .api.responses import status_text
from .backlog import Backlog
from .events import JobEvents
from .retry import Decision
from .sessions import is_local_worker, router_of
from .store import Delivery, Job, JobState, Store, store_call

log = logging.getLogger(__name__)

CallbackFor = Callable[[Job], Delivery | None]  # the ReplyTo delivery a finished job owes, if any
Announce = Callable[[int, Progress | Delta | None], None]  # a job changed (None) or made progress: tell other routers
LIVE = (JobState.QUEUED, JobState.STARTED)
R = TypeVar("R")


class JobQueue:
    def __init__(self, store: Store, events: JobEvents, callback_for: CallbackFor | None = None,
                 on_finished: Callable[[Job], None] | None = None, on_change: Callable[[], None] | None = None) -> None:
        self.store = store
        self.events = events
        self.live: dict[int, Job] = {}
        self.backlog = Backlog(self.live)  # the queued ones, indexed for dispatch
        self._started: set[int] = set()  # ids of running jobs (and some that no longer run: dropped when met)
        self._changes: dict[int, int] = {}  # job -> changes made here: a read of the store older than one is read again
        self.explain: Callable[[Job], str | None] = lambda job: None  # why a queued job waits (the dispatcher's)
        self.progress: dict[int, Progress] = {}
        self._callback_for = callback_for or (lambda job: None)
        self._on_finished = on_finished or (lambda job: None)
        self.on_change = on_change or (lambda: None)  # wakes the dispatcher
        self.announce: Announce = lambda job_id, event: None  # router/peers.py, on routers that share a database

    async def _io(self, call: Callable[..., R], *args: Any) -> R:
        return await store_call(self.store, call, *args)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def recover(self, now: float, lease_grace_s: float, live_routers: frozenset[str] = frozenset()) -> None:
        """Load every unfinished job. The sessions that held running jobs ended with the last router,
        so each lease gets ``lease_grace_s`` for its agent to reconnect and take it back. Jobs a
        router's own worker was running ended with it: they are queued again at once, at no
        attempt's cost (the router stopping is not the job's fault). Leases of sessions of
        ``live_routers`` (other routers serving the same database) are theirs, and left alone."""
        for job in await self._io(self.store.unfinished_jobs):
            self.live[job.id] = job
            self._track(job)
            if job.state != JobState.STARTED or router_of(job.session) in live_routers:
                continue
            if is_local_worker(job.agent):
                await self.requeue(job, Decision(True, charged=False))
            elif job.lease_expires is None or job.lease_expires < now + lease_grace_s:
                job.lease_expires = now + lease_grace_s
                if await self._io(self.store.set_lease_expiry, job, job.lease_expires):
                    self.announce(job.id, None)
        log.info("queue recovered", extra={"jobs": len(self.live)})
        self.on_change()

    async def follow(self, job_id: int) -> Job | None:
        """Another router changed this job (or queued it): the cache follows the store. The job as
        cached before (None if it was not), so the caller can see what it was."""
        return (await self.follow_many([job_id]))[0]

    async def follow_many(self, job_ids: list[int]) -> list[Job | None]:
        """``follow`` for several jobs, read from the store at once."""
        if not job_ids:
            return []
        for attempt in range(2):
            changes = {job_id: self._changes.get(job_id, 0) for job_id in job_ids}
            stored = {job.id: job for job in await self._io(self.store.get_jobs, job_ids)}
            if attempt == 1 or all(self._changes.get(j, 0) == n for j, n in changes.items()):
                break  # (read again once if this router changed one of them during the read)
        return [self._follow(job_id, stored.get(job_id)) for job_id in job_ids]

    def _follow(self, job_id: int, stored: Job | None) -> Job | None:
        cached = self.live.get(job_id)
        if cached is None:
            if stored is not None and stored.state in LIVE:
                self.live[job_id] = stored
                self._track(stored)
                self.on_change()
            elif stored is not None:  # over before this router had it: a watcher may wait on it still
                self.events.notify(job_id, stored)
            return None
        before = dataclasses.replace(cached)
        if stored is None:
            self.live.pop(job_id, None)
            return before
        _update(cached, stored)
        if stored.state not in LIVE:
            self._ended(cached, here=False)
        elif (stored.state, stored.attempt) != (before.state, before.attempt):
            if stored.state == JobState.QUEUED:
                self.progress.pop(job_id, None)
            self._track(cached)
            self.on_change()
        return before

    async def resync(self) -> None:
        """Follow the store's live jobs after this router may have missed other routers' news. A job
        the read shows otherwise than the cache is read again (this router may have changed it
        during the read)."""
        changes = dict(self._changes)
        stored = {job.id: job for job in await self._io(self.store.unfinished_jobs)}
        again = []
        for job_id in set(self.live) | set(stored):
            cached, fresh = self.live.get(job_id), stored.get(job_id)
            if self._changes.get(job_id, 0) != changes.get(job_id, 0):
                again.append(job_id)  # changed here during the read
            elif cached is None and fresh is not None:
                self.live[job_id] = fresh  # neither cached nor changed here
                self._track(fresh)
            elif fresh is None or _lease(cached) != _lease(fresh):
                again.append(job_id)
        await self.follow_many(again)
        for job_id in [j for j in self._changes if j not in self.live]:
            del self._changes[job_id]
        self.on_change()

    # ---- clients -------------------------------------------------------------------------------

    async def submit(self, job: Job) -> Job:
        job.created = time.time()
        await self._io(self.store.add_job, job)
        self.live[job.id] = job
        self._track(job)
        self.announce(job.id, None)
        log.info("job queued", extra={"job": job.id, "api": job.api})
        self.on_change()
        return job

    async def wait_finished(self, job: Job, timeout: float) -> Job | None:
        """The job once finished (at once if it already is), or None if it is still live after
        ``timeout`` seconds or the router is stopping."""
        if job.id not in self.live:
            return await self._io(self.store.get_job, job.id) or job
        return await self.events.wait_finished(job.id, timeout)

    async def cancel(self, job: Job, reason: str) -> tuple[bool, Job]:
        """End a live job as Cancelled; (whether it was live, the job). A running job's session is
        left in ``job.session`` for the caller to stop it there."""
        job = self.live.get(job.id, job)
        for _ in range(2):  # again once if the cache was behind the store (another router changed the job)
            if job.id not in self.live:
                return False, job
            await self.finish(job, JobState.CANCELLED, Failure(kind=FailureKind.INTERRUPTED, message=reason))
            if job.state == JobState.CANCELLED:
                return True, job
        return False, job

    def status_text(self, job: Job) -> str:
        return status_text(job, self.explain(job) if job.state == JobState.QUEUED else None, self.progress.get(job.id))

    # ---- state changes (dispatch and outcomes) -------------------------------------------------------

    def queued(self) -> list[Job]:
        return [j for j in self.live.values() if j.state == JobState.QUEUED]

    def running(self) -> list[Job]:
        """The running jobs (the cost of their number, not the queue's)."""
        jobs = []
        for job_id in list(self._started):
            job = self.live.get(job_id)
            if job is None or job.state != JobState.STARTED:
                self._started.discard(job_id)
            else:
                jobs.append(job)
        return jobs

    def running_by_session(self) -> Counter[str]:
        return Counter(j.session for j in self.running() if j.session)

    def _changed(self, job: Job) -> None:
        """This router changed the job (after the store took it)."""
        self._changes[job.id] = self._changes.get(job.id, 0) + 1

    def _track(self, job: Job) -> None:
        """Index a job that is now queued or running (router/backlog.py; ``running``)."""
        if job.state == JobState.STARTED:
            self._started.add(job.id)
        else:
            self.backlog.add(job)

    async def claim(self, job: Job, agent: str, session: str) -> bool:
        """Start the job's next attempt under ``session``'s lease; False if it is no longer queued."""
        now, seen = time.time(), dataclasses.replace(job)  # the store is asked about the job as seen now
        if not await self._io(self.store.claim, seen, agent, session, now):
            await self._reload(job)  # it changed under us: follow the store
            return False
        self._changed(job)
        job.state, job.agent, job.session, job.lease_expires = JobState.STARTED, agent, session, None
        self._started.add(job.id)
        job.attempt = seen.attempt + 1
        job.started = now
        self.announce(job.id, None)
        return True

    def held(self, session: str, job_id: int, attempt: int) -> Job | None:
        """The job, if ``session`` holds the lease on this attempt of it."""
        job = self.live.get(job_id)
        if job is None or job.state != JobState.STARTED or job.attempt != attempt or job.session != session:
            return None
        return job

    def leases_of(self, sessions: Iterable[str]) -> list[Job]:
        wanted = set(sessions)
        return [j for j in self.running() if j.session in wanted]

    def set_progress(self, job: Job, progress: Progress, here: bool = True) -> None:
        """A running job's progress: for its status and its watchers (and other routers' if ``here``)."""
        self.progress[job.id] = progress
        self.events.notify(job.id, progress)
        if here:
            self.announce(job.id, progress)

    def stream(self, job: Job, delta: Delta, here: bool = True) -> None:
        """Text a running job produced: to its watchers (and other routers' if ``here``)."""
        self.events.notify(job.id, delta)
        if here:
            self.announce(job.id, delta)

    async def requeue(self, job: Job, decision: Decision) -> None:
        """Queue a running job again, as the retry policy decided."""
        avoid = [*job.avoid, job.agent] if decision.avoid_agent and job.agent and job.agent not in job.avoid else job.avoid
        again = dataclasses.replace(job, avoid=avoid, min_free_vram=decision.min_free_vram or job.min_free_vram,
                                    failures=job.failures + decision.charged)
        if not await self._io(self.store.requeue, again):
            await self._reload(job)
            return
        self._changed(job)
        _update(job, again, state=JobState.QUEUED, agent=None, session=None, lease_expires=None)
        self._track(job)
        self.progress.pop(job.id, None)
        self.announce(job.id, None)
        log.info("job queued again", extra={"job": job.id, "attempt": job.attempt, "failures": job.failures})
        self.on_change()

    async def finish(self, job: Job, state: JobState, failure: Failure | None = None, charged: bool = False,
               results: dict[str, Any] | None = None) -> None:
        """End a live job. The store is written first; the cache follows only what the store took."""
        ended = dataclasses.replace(job, state=state, finished=time.time(), failures=job.failures + charged,
                                    results=results if results is not None else job.results,
                                    error=failure.model_dump(exclude_none=True) if failure is not None else job.error)
        if not await self._io(self.store.finish, ended, ended.finished or 0.0, self._callback_for(ended)):
            await self._reload(job)
            return
        self._changed(job)
        _update(job, ended)
        self.announce(job.id, None)
        self._ended(job)

    def _ended(self, job: Job, here: bool = True) -> None:
        """The job is over (``here``: by this router, which counts it in its metrics)."""
        self.live.pop(job.id, None)
        self.progress.pop(job.id, None)
        self.events.notify(job.id, job)
        if here:
            self._on_finished(job)
        log.info("job finished", extra={"job": job.id, "state": job.state, "agent": job.agent})
        self.on_change()

    async def _reload(self, job: Job) -> None:
        """The store did not take a change the cache expected: the store is right; follow it."""
        stored = await self._io(self.store.get_job, job.id)
        log.warning("job changed under the queue; reloaded", extra={"job": job.id, "state": stored and stored.state})
        if stored is None:
            self.live.pop(job.id, None)
            return
        _update(job, stored)
        self._track(job)
        if stored.state not in LIVE:
            self._ended(job, here=False)

    async def move_lease(self, job: Job, session: str) -> bool:
        """The agent holding ``job`` came back as ``session``: its lease goes along."""
        seen = dataclasses.replace(job)
        if not await self._io(self.store.move_lease, seen, session):
            await self._reload(job)
            return False
        self._changed(job)
        job.session, job.lease_expires = session, None
        self.announce(job.id, None)
        return True

    async def start_lease_clock(self, session: str, expires: float) -> int:
        """``session`` is gone: its leases expire at ``expires`` unless its agent comes back."""
        return await self.start_lease_clocks(self.leases_of([session]), expires)

    async def start_lease_clocks(self, jobs: list[Job], expires: float | None) -> int:
        """Set the given leases' expiry (None: their session is here after all), each as it stands
        now: a lease that moved meanwhile (its agent came back) is left to its new session."""
        seen = [dataclasses.replace(job) for job in jobs]
        for job, then in zip(jobs, seen, strict=True):
            done = await self._io(self.store.set_lease_expiry, then, expires)
            if done and (job.session, job.attempt) == (then.session, then.attempt):
                self._changed(job)
                job.lease_expires = expires
                self.announce(job.id, None)
            else:
                await self._reload(job)
        return len(jobs)

    def expired_leases(self, now: float) -> list[Job]:
        return [j for j in self.running() if j.lease_expires is not None and j.lease_expires <= now]


def _lease(job: Job | None) -> tuple[Any, ...]:
    return (job.state, job.attempt, job.session, job.lease_expires) if job is not None else ()


def _update(job: Job, source: Job, **changes: Any) -> None:
    """Make the cached ``job`` (which handlers and watchers hold) say what ``source`` says."""
    for f in dataclasses.fields(Job):
        setattr(job, f.name, changes.get(f.name, getattr(source, f.name)))
