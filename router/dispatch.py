"""Handing queued jobs to agents: whenever something changed (a job, a free slot, an agent joining,
leaving or reporting), queued jobs in turn (API keys taking turns, oldest first) are placed by
the scheduler (router/scheduler.py), claimed in the store and sent to the agent.

A pass reads the queue through its index (router/backlog.py): only the (capability, model) groups
some agent here could take now, in fair order, until the free slots are used. With every agent
busy a pass costs nothing; with free slots it costs about the jobs it looks at, not the queue.

Why a job waits is worked out when someone asks (its status), from the agents as they are then.
A job that no connected agent can take (no agent has its model, none has the memory, none can run
it; not merely all busy) fails after ``unplaceable_timeout_s`` of that, with the reason, so nothing
waits forever unseen (0: wait forever): once a second the groups no agent anywhere can take are
looked at, and a job a pass meets that no agent can take is timed from then.

Routers that share a database (router.shared) each hand jobs to their own agents; a job that only
another router's agent can take waits for that router (the agents of all routers count for the
reason and for whether a job can ever run). The store's conditional claim settles two routers
reaching for the same job at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

from gpugate.errors import FailureKind
from gpugate.wire import Failure, JobOffer

from .backlog import Group, interleave
from .queue import JobQueue
from .retry import Decision
from .scheduler import AgentView, JobNeeds, Unplaceable, choose
from .sessions import AgentSession, SessionRegistry
from .store import Job, JobState

log = logging.getLogger(__name__)
RETRY_S = 1.0  # after a failing pass (the store busy, say)
TICK_S = 1.0  # a pass at least this often while jobs wait: time limits move on
LOOKAHEAD = 8  # jobs a job may be passed by for one whose model its agent has loaded (fewer swaps)
VIEWS_FRESH_S = 0.2  # how long the agents' views built to say why a job waits are reused


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
        self._ticked = -math.inf
        self._views: tuple[float, list[AgentView], list[AgentView]] | None = None  # for reasons: (when, here, peers)
        self._wake = asyncio.Event()
        queue.explain = self.reason

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S if self.queue.backlog.groups() else None)
            self._wake.clear()
            try:
                await self.dispatch(time.time())
            except Exception:  # the store failing, say: the jobs are kept; try again shortly
                log.exception("dispatch failed; retrying")
                await asyncio.sleep(RETRY_S)
                self._wake.set()

    # ---- why a job waits ------------------------------------------------------------------------

    def reason(self, job: Job) -> str | None:
        """Why this queued job waits now, or None if an agent here could take it (its turn is coming)."""
        here, peers = self._reason_views()
        choice = _place(_needs(job), {v.name: v for v in here}, peers)
        return choice.reason if isinstance(choice, Unplaceable) else None

    def cannot_place(self, job: Job, now: float) -> str | None:
        """Why no connected agent could ever take this job as things stand (none runs it or has its
        model), or None: one could, now or once it has the memory or a free slot."""
        here, peers = self._reason_views()
        choice = choose(_needs(job), [*here, *peers])
        return choice.reason if isinstance(choice, Unplaceable) and choice.missing else None

    def _reason_views(self) -> tuple[list[AgentView], list[AgentView]]:
        now = time.monotonic()
        if self._views is None or now - self._views[0] > VIEWS_FRESH_S:
            self._views = (now, self.sessions.views(self.queue.running_by_session(), time.time()),
                           self.sessions.peer_views())
        return self._views[1], self._views[2]

    # ---- a pass ----------------------------------------------------------------------------------

    async def dispatch(self, now: float) -> None:
        """One pass: hand out queued jobs in fair order while agents here have free slots. The
        agents' views are built once per pass and updated as jobs are handed out; jobs with the
        same needs get the same answer until one is handed out. When the agent a job would go to
        has another model loaded, a job among the next ``lookahead`` that needs a model it has
        loaded goes there first (no swap); the passed job is placed next."""
        self._views = None  # the agents changed or will: reasons are worked out afresh
        if now - self._ticked >= TICK_S:
            self._ticked = now
            await self._time_limits(now)
        if not any(s.slots > 0 or any(n > 0 for n in s.pools.values()) for s in self.sessions.sessions.values()):
            return  # every agent busy: nothing to hand out (the views are not even built)
        running = self.queue.running_by_session()
        views = {v.name: v for v in self.sessions.views(running, now)}
        free = sum(_free_slots(v) for v in views.values())
        if not free:
            return
        peers = self.sessions.peer_views()
        groups = [g for g in self.queue.backlog.groups() if not isinstance(choose(_lenient(g), views.values()), Unplaceable)]
        if (refresh := getattr(self.weight, "refresh", None)) is not None:  # the keys' weights, read before the pass
            await refresh(self.queue.backlog.keys(groups))
        decided: dict[JobNeeds, AgentView | Unplaceable] = {}
        order = _Buffered(self.queue.backlog.fair(groups, self._vtime, self.weight, self._clock))
        taken: set[int] = set()
        i = 0
        try:
            while free > 0 and (job := order.get(i)) is not None:
                if job.id in taken or job.state != JobState.QUEUED:
                    i += 1
                    continue
                needs = _needs(job)
                choice = decided.get(needs)
                if choice is None:
                    choice = decided[needs] = _place(needs, views, peers)
                if isinstance(choice, Unplaceable):
                    await self._waits(job, choice, now)
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
                session = self.sessions.sessions.get(choice.name)
                if session is None or not session.can_take(job.capability):  # it changed while the pass waited on the store
                    views.pop(choice.name, None)
                    decided.clear()
                    continue
                if not await self.queue.claim(job, session.name, session.id):
                    continue  # finished meanwhile (cancelled, say), or another router's agent took it
                if self.sessions.by_id(session.id) is None:  # it left while the claim was written: nobody's lease
                    await self.queue.requeue(job, Decision(True, charged=False))
                    views.pop(choice.name, None)
                    decided.clear()
                    continue
                session.offered(job.capability)
                running[session.id] += 1
                free -= 1
                self._served(job.key_id)
                views[choice.name] = choice.took(job.capability)
                decided.clear()  # that agent has one slot less now
                await _send(session, JobOffer(job_id=job.id, attempt=job.attempt, capability=job.capability,
                                              params=job.params, inputs=job.inputs))
        finally:
            order.close()

    async def _time_limits(self, now: float) -> None:
        """Once a second: jobs of groups no agent of any router can take (no agent runs the
        capability or has the model) are timed, and fail once past ``unplaceable_timeout_s``;
        what no longer waits is forgotten. (A job that no agent can take for its own reasons,
        its size say, is timed when a pass meets it.)"""
        backlog = self.queue.backlog
        if backlog.stale() > max(1024, len(self.queue.live)):
            backlog.compact()
        for known in (self._unplaceable_since, self._passed):
            for job_id in [j for j in known if j not in self.queue.live]:
                del known[job_id]
        if not self.unplaceable_timeout_s:
            return
        everyone = [*self.sessions.views(self.queue.running_by_session(), now), *self.sessions.peer_views()]
        for group in backlog.groups():
            why = choose(_lenient(group), everyone)
            if isinstance(why, Unplaceable) and why.missing:
                for job in list(backlog.jobs(group)):
                    await self._waits(job, why, now)

    def _served(self, key_id: int | None) -> None:
        start = max(self._vtime.get(key_id, self._clock), self._clock)
        self._vtime[key_id] = start + 1 / max(1, self.weight(key_id))
        self._clock = start

    def _loaded_there(self, order: _Buffered, start: int, agent: AgentView, taken: set[int]) -> Job | None:
        """The first of the next ``lookahead`` queued jobs that needs a model ``agent`` has loaded
        and that it can take now, if any."""
        for at in range(start, start + self.lookahead):
            job = order.get(at)
            if job is None:
                return None
            if job.id not in taken and job.model in agent.loaded and choose(_needs(job), [agent]) == agent:
                return job
        return None

    async def _waits(self, job: Job, why: Unplaceable, now: float) -> None:
        """The job cannot be placed: while that is only a wait (all busy), no clock; else it is
        timed, and failed once past ``unplaceable_timeout_s``."""
        if why.busy:
            self._unplaceable_since.pop(job.id, None)
            return
        since = self._unplaceable_since.setdefault(job.id, now)
        if self.unplaceable_timeout_s and now - since >= self.unplaceable_timeout_s and job.state == JobState.QUEUED:
            message = f"no connected agent could take it for {now - since:.0f}s: {why.reason}"
            log.warning("job unschedulable", extra={"job": job.id, "error": message})
            await self.queue.finish(job, JobState.FAILED, Failure(kind=FailureKind.UNSCHEDULABLE, message=message))


async def _send(session: AgentSession, offer: JobOffer) -> None:
    """An offer, at once after its claim (a cancel that comes after it finds the agent running it)."""
    try:
        await session.send(offer)
        log.info("job sent", extra={"job": offer.job_id, "agent": session.name, "attempt": offer.attempt})
    except (ConnectionError, RuntimeError) as exc:  # closing: its lease clock starts when it is gone
        log.warning("job not sent", extra={"job": offer.job_id, "agent": session.name, "error": str(exc)})


class _Buffered:
    """The fair order as it is made, kept so far: look-ahead reads a few jobs further."""

    def __init__(self, jobs: Iterator[Job]) -> None:
        self._jobs, self._seen = jobs, []  # type: ignore[var-annotated]

    def get(self, i: int) -> Job | None:
        while len(self._seen) <= i:
            job = next(self._jobs, None)
            if job is None:
                return None
            self._seen.append(job)
        return self._seen[i]

    def close(self) -> None:
        self._jobs.close()  # type: ignore[attr-defined]


def fair_order(jobs: Iterable[Job], served: Mapping[int | None, float],
               weight: Callable[[int | None], int] = lambda key_id: 1, new: float = -1.0) -> list[Job]:
    """Queued jobs taking turns by API key (router/backlog.py ``interleave``), each key's oldest first."""
    by_key: dict[int | None, list[Job]] = {}
    for job in sorted(jobs, key=lambda j: j.id):
        by_key.setdefault(job.key_id, []).append(job)
    return list(interleave({key: iter(line) for key, line in by_key.items()}, served, weight, new))


def _free_slots(view: AgentView) -> int:
    return 0 if view.paused else view.slots + sum(view.pools.values())


def _lenient(group: Group) -> JobNeeds:
    """The least a job of this group can need: if no agent can take that, none of the group can go."""
    return JobNeeds(group[0], group[1])


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
