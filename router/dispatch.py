"""Handing queued jobs to agents: whenever something changed (a job, a free slot, an agent joining,
leaving or reporting), each queued job in turn (API keys taking turns, oldest first) is placed by
the scheduler (router/scheduler.py), claimed in the store and sent to the agent.

A job that no connected agent can take (no agent has its model, none has the memory, none can run
it; not merely all busy) waits with that reason in its status; after ``unplaceable_timeout_s`` of
that it ends Failed with the reason, so nothing waits forever unseen (0: wait forever).

Routers that share a database (router.shared) each hand jobs to their own agents; a job that only
another router's agent can take waits for that router (the agents of all routers count for the
reason and for whether a job can ever run). The store's conditional claim settles two routers
reaching for the same job at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping

from gpugate.errors import FailureKind
from gpugate.wire import Failure, JobOffer

from .queue import JobQueue
from .scheduler import AgentView, JobNeeds, Unplaceable, choose
from .sessions import AgentSession, SessionRegistry
from .store import Job, JobState

log = logging.getLogger(__name__)
RETRY_S = 1.0  # after a failing pass (the store busy, say)
TICK_S = 1.0  # a pass at least this often while jobs wait: reasons and time limits move on
LOOKAHEAD = 8  # jobs a job may be passed by for one whose model its agent has loaded (fewer swaps)


class Dispatcher:
    def __init__(self, queue: JobQueue, sessions: SessionRegistry, unplaceable_timeout_s: float,
                 weight: Callable[[int | None], int] = lambda key_id: 1, lookahead: int = LOOKAHEAD) -> None:
        self.queue, self.sessions, self.weight, self.lookahead = queue, sessions, weight, lookahead
        self.unplaceable_timeout_s = unplaceable_timeout_s
        self._unplaceable_since: dict[int, float] = {}
        # stride scheduling: a key's virtual time grows by 1/weight with each job of it handed out; the
        # key with the least goes first. A key new to the queue starts at the clock (the virtual time
        # of the last job handed out), so it neither waits for the others nor gets a burst.
        self._vtime: dict[int | None, float] = {}
        self._clock = 0.0
        self._passed: dict[int, int] = {}  # job -> passes by look-ahead so far (at most ``lookahead``)
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S if self.queue.waiting_reason else None)
            self._wake.clear()
            try:
                await self.dispatch(time.time())
            except Exception:  # the store failing, say: the jobs are kept; try again shortly
                log.exception("dispatch failed; retrying")
                await asyncio.sleep(RETRY_S)
                self._wake.set()

    def cannot_place(self, job: Job, now: float) -> str | None:
        """Why no connected agent could ever take this job as things stand (none runs it or has its
        model), or None: one could, now or once it has the memory or a free slot."""
        views = [*self.sessions.views(self.queue.running_by_session(), now), *self.sessions.peer_views()]
        choice = choose(_needs(job), views)
        return choice.reason if isinstance(choice, Unplaceable) and choice.missing else None

    async def dispatch(self, now: float) -> None:
        """One pass over the queued jobs in fair order (``fair_order``). The agents' views are built
        once per pass and updated as jobs are handed out; jobs with the same needs get the same
        answer until one is handed out, so a long queue costs a look-up per job, not a placement.
        When the agent a job would go to has another model loaded, a job among the next
        ``lookahead`` that needs a model it has loaded goes there first (no swap); the passed job
        is placed next."""
        offers: list[tuple[AgentSession, JobOffer]] = []
        running = self.queue.running_by_session()
        views = {v.name: v for v in self.sessions.views(running, now)}
        peers = self.sessions.peer_views()
        decided: dict[JobNeeds, AgentView | Unplaceable] = {}
        order = fair_order(self.queue.queued(), self._vtime, self.weight, new=self._clock)
        taken: set[int] = set()
        i = 0
        while i < len(order):
            job = order[i]
            if job.id in taken:
                i += 1
                continue
            needs = _needs(job)
            choice = decided.get(needs)
            if choice is None:
                choice = decided[needs] = _place(needs, views, peers)
            if isinstance(choice, Unplaceable):
                self._waits(job.id, choice, now)
                i += 1
                continue
            swap_free = None if job.model is None or job.model in choice.loaded \
                or self._passed.get(job.id, 0) >= self.lookahead else self._loaded_there(order, i + 1, choice, taken)
            if swap_free is None:
                i += 1
            else:  # order[i] is looked at again once this one is out; passed so at most ``lookahead`` times
                self._passed[job.id] = self._passed.get(job.id, 0) + 1
                job = swap_free
            taken.add(job.id)
            self._unplaceable_since.pop(job.id, None)
            session = self.sessions.sessions[choice.name]
            if not self.queue.claim(job, session.name, session.id):
                continue  # finished meanwhile (cancelled, say)
            session.offered(job.capability)
            running[session.id] += 1
            self._served(job.key_id)
            views[choice.name] = choice.took(job.capability)
            decided.clear()  # that agent has one slot less now
            offers.append((session, JobOffer(job_id=job.id, attempt=job.attempt, capability=job.capability,
                                             params=job.params, inputs=job.inputs)))
        for session, offer in offers:
            try:
                await session.send(offer)
                log.info("job sent", extra={"job": offer.job_id, "agent": session.name, "attempt": offer.attempt})
            except (ConnectionError, RuntimeError) as exc:  # closing: its lease clock starts when it is gone
                log.warning("job not sent", extra={"job": offer.job_id, "agent": session.name, "error": str(exc)})
        for known in (self._unplaceable_since, self._passed):
            for job_id in [j for j in known if j not in self.queue.live]:
                del known[job_id]

    def _served(self, key_id: int | None) -> None:
        start = max(self._vtime.get(key_id, self._clock), self._clock)
        self._vtime[key_id] = start + 1 / max(1, self.weight(key_id))
        self._clock = start

    def _loaded_there(self, order: list[Job], start: int, agent: AgentView, taken: set[int]) -> Job | None:
        """The first of the next ``lookahead`` queued jobs that needs a model ``agent`` has loaded
        and that it can take now, if any."""
        for job in order[start:start + self.lookahead]:
            if job.id not in taken and job.model in agent.loaded and choose(_needs(job), [agent]) == agent:
                return job
        return None

    def _waits(self, job_id: int, why: Unplaceable, now: float) -> None:
        job = self.queue.live[job_id]
        self.queue.waiting_reason[job_id] = why.reason
        if why.busy:
            self._unplaceable_since.pop(job_id, None)
            return
        since = self._unplaceable_since.setdefault(job_id, now)
        if self.unplaceable_timeout_s and now - since >= self.unplaceable_timeout_s and job.state == JobState.QUEUED:
            message = f"no connected agent could take it for {now - since:.0f}s: {why.reason}"
            log.warning("job unschedulable", extra={"job": job_id, "error": message})
            self.queue.finish(job, JobState.FAILED, Failure(kind=FailureKind.UNSCHEDULABLE, message=message))


def fair_order(jobs: Iterable[Job], served: Mapping[int | None, float],
               weight: Callable[[int | None], int] = lambda key_id: 1, new: float = -1.0) -> list[Job]:
    """Queued jobs taking turns by API key: ``weight`` jobs of each key a round (its oldest first),
    round after round; the key served least (``served``: its virtual time; ``new`` for a key not in
    it) takes its turn first in every round. One key queuing ten thousand jobs delays another key's
    next job by about one job (its weight's worth), not by ten thousand."""
    by_key: dict[int | None, list[Job]] = {}
    for job in sorted(jobs, key=lambda j: j.id):  # already in id order but after a recovery: linear
        by_key.setdefault(job.key_id, []).append(job)
    if len(by_key) == 1:
        return next(iter(by_key.values()))
    order = sorted(by_key, key=lambda k: (served.get(k, new), by_key[k][0].id))
    active = [(by_key[k], max(1, weight(k))) for k in order]
    out: list[Job] = []
    turn = 0
    while active:
        for queue, share in active:
            out.extend(queue[turn * share:(turn + 1) * share])
        turn += 1
        active = [(queue, share) for queue, share in active if len(queue) > turn * share]
    return out


def _place(needs: JobNeeds, views: Mapping[str, AgentView], peers: list[AgentView]) -> AgentView | Unplaceable:
    """The agent here that takes a job; else why it waits, counting the agents of other routers
    (``peers``): one of theirs that can take it is a wait for that router, not a lack of capacity."""
    choice = choose(needs, views.values())
    if isinstance(choice, AgentView) or not peers:
        return choice
    elsewhere = choose(needs, [*views.values(), *peers])
    if isinstance(elsewhere, AgentView):
        return Unplaceable(f"waiting for agent {elsewhere.name} (connected to another router)", busy=True)
    return elsewhere


def _needs(job: Job) -> JobNeeds:
    return JobNeeds(job.capability, job.model, job.megapixels, job.min_free_vram, frozenset(job.avoid))
