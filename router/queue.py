"""The job queue: accept, dispatch to agents, record outcomes, retry; the only caller of the store
for jobs.

Live jobs (queued or running) are also kept in memory for dispatch and status; the store is the
durable copy, written on every state change, so a restarted router picks up every job it had
accepted: queued ones stay queued, running ones are queued again (their agents' late answers
are refused by the attempt check).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from gpugate.errors import FailureKind
from gpugate.wire import Done, Failed, Failure, JobOffer, Progress, StopJob

from .agents import AgentRegistry, ConnectedAgent
from .api.responses import status_text
from .scheduler import JobNeeds, Unplaceable, choose
from .archive import JobArchive, find_everywhere, get_anywhere
from .store import Delivery, Job, JobQuery, JobState, Store

log = logging.getLogger(__name__)
DISPATCH_RETRY_S = 1.0


@dataclass(frozen=True)
class Retry:
    """What to do after a failure: retry (with what constraint) or finish in ``state``."""

    again: bool
    state: str = JobState.FAILED
    exclude_agent: bool = False
    min_free_vram: int = 0


def after_failure(job: Job, failure: Failure, agent_free_vram: int) -> Retry:
    """The retry policy, pure: infrastructure failures move elsewhere, memory failures to a bigger
    device, request and code failures end the job at once."""
    attempts_left = job.attempt < job.max_attempts
    if failure.kind is FailureKind.INTERRUPTED:
        return Retry(False, JobState.CANCELLED)
    if failure.kind in (FailureKind.WORKER_LOST, FailureKind.TIMEOUT) and attempts_left:
        return Retry(True, exclude_agent=True)
    if failure.kind is FailureKind.OUT_OF_MEMORY and attempts_left:
        return Retry(True, min_free_vram=max(agent_free_vram, job.min_free_vram))
    return Retry(False)


JobEvent = Progress | Job  # what a watcher of a job receives: progress, then the finished job
CallbackFor = Callable[[Job], Delivery | None]  # the ReplyTo delivery a finished job owes, if any


class JobQueue:
    def __init__(self, store: Store, agents: AgentRegistry, archive: JobArchive,
                 callback_for: CallbackFor | None = None, on_finished: Callable[[Job], None] | None = None) -> None:
        self.store = store
        self.agents = agents
        self.archive = archive
        self.live: dict[int, Job] = {}
        self.waiting_reason: dict[int, str] = {}
        self.progress: dict[int, Progress] = {}
        self._callback_for = callback_for or (lambda job: None)
        self._on_finished = on_finished or (lambda job: None)
        self._watchers: dict[int, set[asyncio.Queue[JobEvent]]] = {}
        self._wake = asyncio.Event()

    # ---- lifecycle -----------------------------------------------------------------------------

    def recover(self) -> None:
        """Load every unfinished job; a job that was running when the router stopped is queued again."""
        for job in self.store.unfinished_jobs():
            if job.state == JobState.STARTED:
                self.store.requeue(job, time.time())
                job.state, job.agent = JobState.QUEUED, None
            self.live[job.id] = job
        log.info("queue recovered", extra={"jobs": len(self.live)})
        self._wake.set()

    async def run(self) -> None:
        """Dispatch whenever something changed: a new job, a free slot, an agent joining or leaving."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._dispatch()
            except Exception:  # the store failing, say: keep the jobs, try again shortly
                log.exception("dispatch failed; retrying")
                await asyncio.sleep(DISPATCH_RETRY_S)
                self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    # ---- clients -------------------------------------------------------------------------------

    def submit(self, job: Job) -> Job:
        job.created = time.time()
        self.store.add_job(job)
        self.live[job.id] = job
        log.info("job queued", extra={"job": job.id, "api": job.api})
        self._wake.set()
        return job

    def get(self, job_id: int) -> Job | None:
        """A job, live, finished or archived."""
        return self.live.get(job_id) or get_anywhere(self.store, self.archive, job_id)

    def get_by_ref(self, key_id: int | None, ref_id: str) -> Job | None:
        job = self.store.get_job_by_ref(key_id, ref_id)
        if job is None:
            return self.archive.get_by_ref(key_id, ref_id)
        return self.live.get(job.id) or job

    def find(self, query: JobQuery) -> list[Job]:
        return find_everywhere(self.store, self.archive, query)

    @contextlib.contextmanager
    def watch(self, job_id: int) -> Iterator[asyncio.Queue[JobEvent]]:
        """Events of a live job while the block runs: each Progress, then the finished Job."""
        events: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._watchers.setdefault(job_id, set()).add(events)
        try:
            yield events
        finally:
            watchers = self._watchers.get(job_id, set())
            watchers.discard(events)
            if not watchers:
                self._watchers.pop(job_id, None)

    async def wait_finished(self, job_id: int, timeout: float) -> Job | None:
        """The job once finished, or None if it is still live after ``timeout`` seconds."""
        if job_id not in self.live:
            return self.store.get_job(job_id)
        with self.watch(job_id) as events, contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not isinstance(event := await events.get(), Job):
                    pass
                return event
        return None

    async def cancel(self, job: Job, reason: str) -> bool:
        """End a live job as Cancelled: a queued one is dropped, a running one is stopped on its agent
        (which answers ``interrupted``, ignored then: the job is already over)."""
        job = self.live.get(job.id, job)
        if job.id not in self.live:
            return False
        agent = self.agents.agents.get(job.agent or "") if job.state == JobState.STARTED else None
        job.error = Failure(kind=FailureKind.INTERRUPTED, message=reason).model_dump(exclude_none=True)
        self._finish(agent, job, JobState.CANCELLED)
        if agent is not None:
            try:
                await agent.send(StopJob(job_id=job.id, attempt=job.attempt))
            except (ConnectionError, RuntimeError) as exc:  # it is leaving anyway
                log.warning("stop not sent", extra={"job": job.id, "agent": agent.name, "error": str(exc)})
        return True

    def status_text(self, job: Job) -> str:
        return status_text(job, self.waiting_reason.get(job.id), self.progress.get(job.id))

    # ---- agents --------------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        offers: list[tuple[ConnectedAgent, JobOffer]] = []
        for job in [j for j in self.live.values() if j.state == JobState.QUEUED]:
            needs = JobNeeds(job.capability, job.model, job.megapixels, job.min_free_vram, frozenset(job.excluded))
            choice = choose(needs, self.agents.views())
            if isinstance(choice, Unplaceable):
                self.waiting_reason[job.id] = choice.reason
                continue
            agent = self.agents.agents[choice.name]
            if not self.store.claim(job.id, agent.name, job.attempt + 1, time.time()):
                continue  # finished meanwhile (cancelled, say)
            job.state, job.agent, job.attempt = JobState.STARTED, agent.name, job.attempt + 1
            self.waiting_reason.pop(job.id, None)
            agent.slots -= 1
            agent.running.add(job.id)
            offers.append((agent, JobOffer(job_id=job.id, attempt=job.attempt, capability=job.capability,
                                           params=job.params, inputs=job.inputs)))
        for agent, offer in offers:
            try:
                await agent.send(offer)
                log.info("job sent", extra={"job": offer.job_id, "agent": agent.name, "attempt": offer.attempt})
            except (ConnectionError, RuntimeError) as exc:  # its connection is closing: leave() requeues
                log.warning("job not sent", extra={"job": offer.job_id, "agent": agent.name, "error": str(exc)})

    def on_progress(self, agent: ConnectedAgent, message: Progress) -> None:
        job = self._held_by(agent, message.job_id, message.attempt)
        if job is not None:
            self.progress[job.id] = message
            self._notify(job.id, message)

    def on_done(self, agent: ConnectedAgent, message: Done) -> None:
        job = self._held_by(agent, message.job_id, message.attempt)
        if job is None:
            return
        job.results = {"artifacts": [a.model_dump() for a in message.artifacts], "texts": message.texts,
                       "details": message.details}
        self._finish(agent, job, JobState.COMPLETED)

    def on_failed(self, agent: ConnectedAgent, message: Failed) -> None:
        job = self._held_by(agent, message.job_id, message.attempt)
        if job is None:
            return
        decision = after_failure(job, message.failure, agent.free_vram)
        log.warning("job failed", extra={"job": job.id, "agent": agent.name, "kind": message.failure.kind.value,
                                         "retry": decision.again, "error": message.failure.message})
        if decision.again:
            self._requeue(agent, job, decision)
        else:
            job.error = message.failure.model_dump(exclude_none=True)
            self._finish(agent, job, decision.state)

    def agent_lost(self, agent: ConnectedAgent) -> None:
        """The agent went away: every job it held is queued again, elsewhere if attempts remain."""
        for job_id in sorted(agent.running):
            job = self.live.get(job_id)
            if job is None:
                continue
            failure = Failure(kind=FailureKind.WORKER_LOST, message=f"agent {agent.name} was lost")
            decision = after_failure(job, failure, agent.free_vram)
            if decision.again:
                self._requeue(agent, job, decision)
            else:
                job.error = failure.model_dump(exclude_none=True)
                self._finish(agent, job, decision.state)
        self._wake.set()

    def _held_by(self, agent: ConnectedAgent, job_id: int, attempt: int) -> Job | None:
        """The job, if this agent holds this attempt of it; a stale or foreign answer is ignored."""
        job = self.live.get(job_id)
        if job is None or job.agent != agent.name or job.attempt != attempt or job.state != JobState.STARTED:
            log.warning("answer for a job this agent does not hold", extra={"job": job_id, "agent": agent.name})
            return None
        return job

    def _requeue(self, agent: ConnectedAgent, job: Job, decision: Retry) -> None:
        if decision.exclude_agent and agent.name not in job.excluded:
            job.excluded.append(agent.name)
        job.min_free_vram = decision.min_free_vram or job.min_free_vram
        self.store.requeue(job, time.time())
        job.state, job.agent = JobState.QUEUED, None
        agent.running.discard(job.id)
        self.progress.pop(job.id, None)
        log.info("job queued again", extra={"job": job.id, "attempt": job.attempt})
        self._wake.set()

    def _finish(self, agent: ConnectedAgent | None, job: Job, state: str) -> None:
        job.state = state
        job.finished = time.time()
        self.store.finish(job, job.finished, self._callback_for(job))
        if agent is not None:
            agent.running.discard(job.id)
        self.live.pop(job.id, None)
        self.progress.pop(job.id, None)
        self.waiting_reason.pop(job.id, None)
        self._notify(job.id, job)
        self._on_finished(job)
        log.info("job finished", extra={"job": job.id, "state": state, "agent": job.agent})
        self._wake.set()

    def _notify(self, job_id: int, event: JobEvent) -> None:
        for events in self._watchers.get(job_id, ()):
            events.put_nowait(event)
