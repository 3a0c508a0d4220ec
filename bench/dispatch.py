"""One dispatch pass over a long queue, side by side with the placement loop it replaced.
Results: bench/results/dispatch.{json,md}.

The fleet: 50 agents with 100 models each. Jobs ask for one of the 100 models and belong to one of
50 API keys.

- **busy**: every agent busy (no free slot): what a pass costs while the queue only waits.
- **placing**: every agent has a free slot, so a pass hands out 50 jobs (claimed in the store):
  jobs handed out a second, when passes run back to back.
- **why**: a status call's reason for one waiting job, worked out when asked.

- **now**: router/dispatch.py as it is: the queue read through its index (router/backlog.py) in the
  keys' fair order, only groups an agent could take, until the free slots are used.
- **per-job placement** (the first dispatcher, kept here as the reference): the agents' views
  rebuilt and the scheduler run for every queued job, oldest first, every pass.

Run: ``python -m bench.dispatch`` (``make bench`` runs it too).
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from gpugate.wire import Capability, Device, Hello, Model
from router.dispatch import Dispatcher, _needs
from router.events import JobEvents
from router.queue import JobQueue
from router.scheduler import Unplaceable, choose
from router.sessions import SessionRegistry
from router.store import Job
from router.store.sqlite import SqliteStore

RESULTS = Path(__file__).parent / "results"
GB = 2**30
AGENTS, MODELS, KEYS = 50, 100, 50
SIZES = (1_000, 5_000, 20_000, 100_000)
REFERENCE_UP_TO = 5_000  # the per-job loop takes seconds a pass beyond this
PASSES = 5


async def fleet(store: SqliteStore, jobs: int) -> tuple[JobQueue, SessionRegistry, Dispatcher]:
    queue = JobQueue(store, JobEvents())
    sessions = SessionRegistry()

    async def send(_: object) -> None:
        return None

    for a in range(AGENTS):
        hello = Hello(name=f"agent-{a}", instance=str(a), cpu_only=False, concurrency=1,
                      devices=[Device(index=0, name="gpu", vram_total=24 * GB, vram_free=20 * GB)],
                      models=[Model(kind="checkpoints", name=f"m{i}.safetensors", size=2 * GB) for i in range(MODELS)],
                      capabilities=[Capability(name="txt2img", model_kind="checkpoints")])
        sessions.join(hello, send, send)  # slots stay 0: every agent busy
    for j in range(jobs):
        await queue.submit(Job(id=0, api="TextToImage", capability="txt2img", params={"prompt": "x"}, inputs={},
                         model=f"m{j % MODELS}.safetensors", megapixels=0.25, max_attempts=3, key_id=j % KEYS))
    return queue, sessions, Dispatcher(queue, sessions, unplaceable_timeout_s=0)


def free_slots(sessions: SessionRegistry) -> None:
    for session in sessions.sessions.values():
        session.slots = 1


def per_job_pass(queue: JobQueue, sessions: SessionRegistry, now: float) -> dict[int, str]:
    """The reference: what each pass did first (views and a placement for every job)."""
    running, reasons = queue.running_by_session(), {}
    for job in queue.queued():
        choice = choose(_needs(job), sessions.views(running, now))
        if isinstance(choice, Unplaceable):
            reasons[job.id] = choice.reason
    return reasons


def timed(run) -> float:  # noqa: ANN001 - a pass
    samples = []
    for _ in range(PASSES):
        started = time.perf_counter()
        run()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    rows = []
    for size in SIZES:
        with tempfile.TemporaryDirectory() as tmp:
            store = SqliteStore(Path(tmp) / "router.db")
            queue, sessions, dispatcher = asyncio.run(fleet(store, size))
            now = time.time()
            current = timed(lambda: asyncio.run(dispatcher.dispatch(now)))
            reference = timed(lambda: per_job_pass(queue, sessions, now)) if size <= REFERENCE_UP_TO else None
            waiting = queue.queued()[-1]
            why = timed(lambda: queue.status_text(waiting))
            assert queue.status_text(waiting).startswith("waiting for a free agent"), queue.status_text(waiting)
            before = len(queue.queued())
            placing = timed(lambda: (free_slots(sessions), asyncio.run(dispatcher.dispatch(now))))
            assert before - len(queue.queued()) == AGENTS * PASSES, "each pass handed out a job per agent"
            store.close()
        rows.append({"queued": size, "now_ms": current * 1000, "per_job_ms": reference * 1000 if reference else None,
                     "placing_ms": placing * 1000, "jobs_per_s": AGENTS / placing, "why_ms": why * 1000})
        print(rows[-1], flush=True)
    machine = f"{platform.machine()}, {len(__import__('os').sched_getaffinity(0))} cores"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dispatch.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    lines = [f"Dispatch pass, {AGENTS} agents x {MODELS} models; {machine}; "
             f"{time.strftime('%Y-%m-%d %H:%M:%S')}; median of {PASSES} passes.", "",
             "| queued jobs | a pass, all busy | per-job placement (first dispatcher) | a pass placing 50 | "
             "jobs handed out a second | why one job waits |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        before = f"{r['per_job_ms']:.0f} ms" if r["per_job_ms"] else "(not run: seconds a pass)"
        lines.append(f"| {r['queued']:,} | {r['now_ms']:.3f} ms | {before} | {r['placing_ms']:.1f} ms | "
                     f"{r['jobs_per_s']:,.0f} | {r['why_ms']:.2f} ms |")
    (RESULTS / "dispatch.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
