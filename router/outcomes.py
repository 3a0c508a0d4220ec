"""What agents' answers and absences do to jobs: the lease-holder's answers, resumed and lost
leases, cancels. Each decision is router/retry.py's; the change is router/queue.py's.

- An answer counts only from the session that holds the job's lease on that attempt; any other
  (a replaced session, an attempt queued again meanwhile, a cancelled job) changes nothing, and
  the files it names that no job owns are deleted at once.
- A closed connection is not yet a lost job: its leases get ``lease_grace_s`` for the agent to
  come back (a router restart, a network blip) and list them in its hello. A lease that runs out,
  or that an agent restarted without (a new process under the same name), is a lost attempt.
- An agent's record (router/sessions.py AgentHealth) counts infrastructure failures in a row.
- On routers that share a database, another router may end a job an agent of this one runs (a
  cancel through it): the agent is told to stop, as for a cancel here.
"""

from __future__ import annotations

import logging
import time

from gpugate.errors import FailureKind
from gpugate.wire import Delta, Done, Failed, Failure, HeldJob, Progress, StopJob

from .queue import JobQueue
from .retention import Retention
from .retry import after_failure
from .sessions import AgentSession, SessionRegistry, is_local_worker, router_of
from .store import Job, JobState

log = logging.getLogger(__name__)


class Outcomes:
    def __init__(self, queue: JobQueue, sessions: SessionRegistry, retention: Retention, lease_grace_s: float) -> None:
        self.queue, self.sessions, self.retention = queue, sessions, retention
        self.lease_grace_s = lease_grace_s

    # ---- answers from the session holding the lease ---------------------------------------------

    def progress(self, session: AgentSession, message: Progress | Delta) -> None:
        """A running job's progress, or the text it streamed: to its watchers, if the sender holds it."""
        job = self.queue.held(session.id, message.job_id, message.attempt)
        if job is None:
            return
        if isinstance(message, Delta):
            self.queue.stream(job, message)
        else:
            self.queue.set_progress(job, message)

    async def done(self, session: AgentSession, message: Done) -> None:
        job = self.queue.held(session.id, message.job_id, message.attempt)
        if job is None:
            self._stale(session, message.job_id, message.attempt)
            current = self.queue.live.get(message.job_id)
            if current is None or current.attempt != message.attempt or current.agent != session.name:
                # no lease can bring this answer back: its files are orphans now (else the same
                # agent may send it again on its newer connection, with the same files)
                await self.retention.discard_unowned([a.name for a in message.artifacts])
            return
        if missing := self.retention.missing([a.name for a in message.artifacts]):
            await self.failed(session, Failed(job_id=job.id, attempt=job.attempt, failure=Failure(
                kind=FailureKind.INFRASTRUCTURE, message=f"outputs missing from the router's file store: {missing}")))
            return
        self.sessions.record(session.name, None, "", time.time())
        await self.queue.finish(job, JobState.COMPLETED, results={
            "artifacts": [a.model_dump() for a in message.artifacts], "texts": message.texts, "details": message.details})

    async def failed(self, session: AgentSession, message: Failed) -> None:
        job = self.queue.held(session.id, message.job_id, message.attempt)
        if job is None:
            self._stale(session, message.job_id, message.attempt)
            return
        self.sessions.record(session.name, message.failure.kind, message.failure.message, time.time(), job.started)
        await self._after(job, message.failure, session.free_vram)

    def _stale(self, session: AgentSession, job_id: int, attempt: int) -> None:
        log.info("answer from a session that does not hold the job; ignored",
                 extra={"job": job_id, "attempt": attempt, "agent": session.name})

    # ---- sessions coming and going ---------------------------------------------------------------

    async def resume(self, session: AgentSession, held: list[HeldJob]) -> tuple[list[int], list[int]]:
        """A (re)connected agent's held jobs: (resumed, dropped). A lease still held by the session it
        names moves to this one; any other is dropped (the job ended or went elsewhere meanwhile).
        Jobs an earlier session of this agent held that it did not list are lost with that session."""
        resumed, dropped = [], []
        for h in held:
            job = self.queue.live.get(h.job_id)
            if job is not None and self._still_its(job, session, h) and await self.queue.move_lease(job, session.id):
                resumed.append(h.job_id)
            else:
                dropped.append(h.job_id)
        orphaned = [j for j in self.queue.live.values() if j.state == JobState.STARTED and j.agent == session.name
                    and j.session != session.id and self.sessions.by_id(j.session) is None]
        for job in orphaned:
            await self.lost(job, f"agent {session.name} reconnected without it (it restarted)")
        if resumed or dropped:
            log.info("agent resumed its jobs", extra={"agent": session.name, "resumed": resumed, "dropped": dropped})
        return resumed, dropped

    def _still_its(self, job: Job, session: AgentSession, held: HeldJob) -> bool:
        """Whether the lease on this attempt still stands for the agent that holds it: the job runs that
        attempt, under this agent's name, and its lease is the session the agent names or one that is
        gone (a welcome the agent never got named a session it does not know of). Names are unique
        among live sessions, and only the agent that was offered an attempt can hold it."""
        if job.state != JobState.STARTED or job.attempt != held.attempt or job.agent != session.name:
            return False
        return job.session == held.session or self.sessions.by_id(job.session) is None

    async def session_closed(self, session: AgentSession) -> None:
        """The connection ended: its leases wait ``lease_grace_s`` for the agent to come back."""
        if held := await self.queue.start_lease_clock(session.id, time.time() + self.lease_grace_s):
            log.warning("agent disconnected holding jobs; waiting for it to come back",
                        extra={"agent": session.name, "jobs": held, "grace_s": self.lease_grace_s})

    async def expire_leases(self, now: float) -> None:
        for job in self.queue.expired_leases(now):
            if job.state == JobState.STARTED and job.lease_expires is not None and job.lease_expires <= now:  # still
                await self.lost(job, f"agent {job.agent} did not come back within {self.lease_grace_s:.0f}s")

    async def start_orphaned_clocks(self, now: float) -> None:
        """Leases of sessions of this router that are gone but whose clock never started (a store
        call that failed as the session ended, say) start it now: no lease is anybody's forever."""
        if orphans := [j for j in self.queue.running() if j.lease_expires is None and not is_local_worker(j.agent)
                       and router_of(j.session) == self.sessions.router_id and self.sessions.by_id(j.session) is None]:
            log.warning("leases of gone sessions without a clock; started", extra={"jobs": [j.id for j in orphans]})
            await self.queue.start_lease_clocks(orphans, now + self.lease_grace_s)

    async def lost(self, job: Job, why: str) -> None:
        log.warning("job lost with its agent", extra={"job": job.id, "agent": job.agent, "error": why})
        await self._after(job, Failure(kind=FailureKind.WORKER_LOST, message=why), 0)

    # ---- clients ---------------------------------------------------------------------------------

    async def cancel(self, job: Job, reason: str) -> bool:
        """End a live job as Cancelled: a queued one is dropped, a running one is stopped on its agent
        (which answers ``interrupted``, stale by then: the job is already over)."""
        was_live, job = await self.queue.cancel(job, reason)
        if was_live and job.attempt:
            await self._stop(job, job.session)
        return was_live

    async def changed_elsewhere(self, job_ids: list[int]) -> None:
        """Other routers changed these jobs: follow them; if a session here ran one and no longer
        does (a cancel through that router; or its lease was given up while this router was cut
        off), stop it there."""
        for job_id, before in zip(job_ids, await self.queue.follow_many(job_ids), strict=True):
            if before is None or before.state != JobState.STARTED:
                continue
            after = self.queue.live.get(job_id)
            if after is None or (after.state, after.attempt, after.session) != (JobState.STARTED, before.attempt,
                                                                                 before.session):
                await self._stop(before, before.session)

    async def _stop(self, job: Job, session: str | None) -> None:
        holder = self.sessions.by_id(session)
        if holder is None:
            return
        try:
            await holder.send(StopJob(job_id=job.id, attempt=job.attempt))
        except (ConnectionError, RuntimeError) as exc:  # it is leaving anyway
            log.warning("stop not sent", extra={"job": job.id, "agent": holder.name, "error": str(exc)})

    async def _after(self, job: Job, failure: Failure, free_vram: int) -> None:
        decision = after_failure(job, failure.kind, free_vram)
        log.warning("attempt failed", extra={"job": job.id, "agent": job.agent, "kind": failure.kind.value,
                                             "retry": decision.again, "error": failure.message})
        if decision.again:
            await self.queue.requeue(job, decision)
        else:
            await self.queue.finish(job, decision.state, failure, charged=decision.charged)
