"""Fairness between keys and fewer model swaps: the router's real dispatcher, queue and store,
driven in simulated time (agents are in-process stand-ins that take a fixed time a job and a
fixed time more to load another model), side by side with plain first-come order.

- **keys**: key A queues 10,000 jobs at once; key B sends one job a second for 300 s; 4 agents,
  1 s a job. B's wait (queued to handed out), p50/p99: keys taking turns against one first-come
  queue.
- **swaps**: 2 agents, each able to run 2 models (one loaded at the start); 200 jobs for either
  model at random (seeded); 1 s a job and 5 s more to load the other model. Swaps and makespan:
  the dispatcher as it is (a job passed, within 8, by one whose model is loaded) against plain
  first-come order (no look-ahead). Target: at least 30% less makespan.

Results: bench/results/fairness.{json,md}. Run: ``python -m bench.fairness``.
"""

from __future__ import annotations

import asyncio
import heapq
import json
import platform
import random
import statistics
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.overhead import RESULTS
from gpugate.wire import Capability, Device, Hello, JobOffer, Model
from router.dispatch import LOOKAHEAD, Dispatcher
from router.events import JobEvents
from router.queue import JobQueue
from router.sessions import AgentSession, SessionRegistry
from router.store import Job, JobState
from router.store.sqlite import SqliteStore

GB = 2**30


class Simulation:
    """Agents that run each offered job for ``run_s`` (plus ``swap_s`` when its model is not the
    one loaded), on a simulated clock; the dispatcher runs after every event, as the router's does."""

    def __init__(self, folder: Path, agents: dict[str, list[str]], run_s: float, swap_s: float = 0.0,
                 lookahead: int = LOOKAHEAD) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.store = SqliteStore(folder / "router.db")
        self.queue = JobQueue(self.store, JobEvents())
        self.sessions = SessionRegistry()
        self.dispatcher = Dispatcher(self.queue, self.sessions, 0, lookahead=lookahead)
        self.run_s, self.swap_s = run_s, swap_s
        self.now = 0.0
        self.events: list[tuple[float, int, Callable[[], None]]] = []
        self.submitted: dict[int, float] = {}
        self.waits: dict[int, float] = {}  # job -> queued to handed out
        self.swaps = 0
        self._seq = 0
        for name, models in agents.items():
            self._join(name, models)

    def _join(self, name: str, models: list[str]) -> None:
        offered: list[JobOffer] = []

        async def send(message: Any) -> None:
            if isinstance(message, JobOffer):
                offered.append(message)

        hello = Hello(name=name, instance=name, cpu_only=False, concurrency=1,
                      devices=[Device(index=0, name="gpu", vram_total=80 * GB, vram_free=60 * GB)],
                      models=[Model(kind="checkpoints", name=m, size=2 * GB) for m in models],
                      capabilities=[Capability(name="txt2img", model_kind="checkpoints")])
        session, _ = self.sessions.join(hello, send, send)
        session.slots, session.loaded = 1, {models[0]}
        session.offered_jobs = offered  # type: ignore[attr-defined]

    def at(self, when: float, action: Callable[[], Awaitable[None]]) -> None:
        self._seq += 1
        heapq.heappush(self.events, (when, self._seq, action))

    async def submit(self, key_id: int | None, model: str) -> None:
        job = await self.queue.submit(Job(id=0, api="TextToImage", capability="txt2img", params={}, inputs={}, model=model,
                                    megapixels=0.25, max_attempts=1, key_id=key_id))
        self.submitted[job.id] = self.now

    async def run(self, until: Callable[[], bool]) -> float:
        """Run events until ``until()`` holds or none are left; the simulated time then."""
        await self._dispatch()
        while self.events and not until():
            self.now, _, action = heapq.heappop(self.events)
            await action()
            await self._dispatch()
        return self.now

    async def _dispatch(self) -> None:
        await self.dispatcher.dispatch(self.now)
        for session in list(self.sessions.sessions.values()):
            offered: list[JobOffer] = session.offered_jobs  # type: ignore[attr-defined]
            while offered:
                self._start(session, offered.pop(0))

    def _start(self, session: AgentSession, offer: JobOffer) -> None:
        job = self.queue.live[offer.job_id]
        self.waits[job.id] = self.now - self.submitted[job.id]
        took = self.run_s
        if job.model not in session.loaded:
            self.swaps += 1
            took += self.swap_s
            session.loaded = {job.model or ""}

        async def done() -> None:
            await self.queue.finish(job, JobState.COMPLETED, results={})
            session.slots += 1

        self.at(self.now + took, done)


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


async def keys_scenario(folder: Path, fair: bool) -> dict[str, Any]:
    sim = Simulation(folder, {f"agent-{i}": ["m.safetensors"] for i in range(4)}, run_s=1.0)
    for _ in range(10_000):
        await sim.submit(1 if fair else None, "m.safetensors")  # without keys: one first-come queue
    b_jobs: list[int] = []

    def b_sends(n: int) -> Callable[[], Awaitable[None]]:
        async def send() -> None:
            await sim.submit(2 if fair else None, "m.safetensors")
            b_jobs.append(max(sim.submitted))
            if n + 1 < 300:
                sim.at(sim.now + 1.0, b_sends(n + 1))
        return send

    sim.at(0.5, b_sends(0))
    await sim.run(lambda: sim.now > 305)  # B's last job came at 299.5
    started = [j for j in b_jobs if j in sim.waits]
    # a job still queued has waited at least until now: its wait counts as that (a lower bound)
    waits = [sim.waits.get(j, sim.now - sim.submitted[j]) for j in b_jobs]
    sim.store.close()
    return {"b_jobs": len(b_jobs), "b_started": len(started), "b_wait_p50_s": _p(waits, 0.5),
            "b_wait_p99_s": _p(waits, 0.99), "at_least": len(started) < len(b_jobs)}


async def swaps_scenario(folder: Path, lookahead: int) -> dict[str, Any]:
    models = ["a.safetensors", "b.safetensors"]
    sim = Simulation(folder, {"agent-0": models, "agent-1": models[::-1]}, run_s=1.0, swap_s=5.0, lookahead=lookahead)
    pick = random.Random(7)
    for _ in range(200):
        await sim.submit(1, pick.choice(models))
    makespan = await sim.run(lambda: False)
    sim.store.close()
    return {"makespan_s": round(makespan, 1), "swaps": sim.swaps, "mean_wait_s": round(statistics.mean(sim.waits.values()), 1)}


async def measure() -> dict[str, Any]:
    out: dict[str, Any] = {"machine": f"{platform.machine()}, simulated time"}
    with tempfile.TemporaryDirectory(prefix="gpugate-bench-fairness-") as tmp:
        for name, coroutine in (("keys_fair", keys_scenario(Path(tmp) / "1", True)),
                                ("keys_first_come", keys_scenario(Path(tmp) / "2", False)),
                                ("swaps_lookahead", swaps_scenario(Path(tmp) / "3", LOOKAHEAD)),
                                ("swaps_first_come", swaps_scenario(Path(tmp) / "4", 0))):
            out[name] = await coroutine
    out["makespan_saved"] = round(1 - out["swaps_lookahead"]["makespan_s"] / out["swaps_first_come"]["makespan_s"], 3)
    return out


def write(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fairness.json").write_text(json.dumps(result, indent=2) + "\n")
    fair, plain = result["keys_fair"], result["keys_first_come"]
    look, first = result["swaps_lookahead"], result["swaps_first_come"]
    lines = ["# Fairness and swaps (the router's dispatcher, simulated time)", "",
             "Key A queues 10,000 jobs; key B sends one a second for 300 s; 4 agents, 1 s a job.", "",
             "| order | B's jobs started | B's wait p50 | B's wait p99 |", "|---|---|---|---|",
             *(f"| {label} | {r['b_started']} of {r['b_jobs']} | {'>= ' if r['at_least'] else ''}{r['b_wait_p50_s']} s | "
               f"{'>= ' if r['at_least'] else ''}{r['b_wait_p99_s']} s |"
               for label, r in (("keys take turns", fair), ("first come", plain))),
             "", "2 agents x 2 models, 200 mixed jobs, 1 s a job, 5 s to load the other model.", "",
             "| order | swaps | makespan | mean wait |", "|---|---|---|---|",
             f"| loaded model first (look-ahead 8) | {look['swaps']} | {look['makespan_s']} s | {look['mean_wait_s']} s |",
             f"| first come | {first['swaps']} | {first['makespan_s']} s | {first['mean_wait_s']} s |", "",
             f"Makespan {result['makespan_saved']:.0%} shorter."]
    (RESULTS / "fairness.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    write(asyncio.run(measure()))
    print(f"written to {RESULTS / 'fairness.md'}")


if __name__ == "__main__":
    main()
