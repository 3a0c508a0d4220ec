"""The long chaos run: 500+ mixed Queue* jobs through a router and two agents while faults strike at
random moments (chosen from a seed, so a run can be repeated). Results: bench/results/chaos.{json,md}.

The faults are those of tests/test_chaos.py (tests/chaos.py does them): kill -9 of a ComfyUI, of an
agent (started again under its name), of the router (started again), SIGTERM of the router
(started again), and a second agent under a name in use. Between two faults the system gets a
random 15 to 45 s. The report counts how every job ended, the attempts they took, the client's
retries while the router was down, and what each fault cost (how long until the fleet served again).

Run: ``python -m bench.chaos [--jobs 500] [--seed 7]`` (``make bench`` runs it last).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.overhead import CACHE, RESULTS
from tests.chaos import Cluster, Stream, summary

AGENTS = ["left", "right"]
PACE_S = 0.3
MOST_WAITING = 12


async def run(jobs: int, seed: int) -> dict[str, Any]:
    rng = random.Random(seed)
    video = CACHE / "media" / "sample.mp4"
    if not video.exists():
        raise SystemExit(f"{video} is missing: run the tests once (make test) to make the fixtures")
    with tempfile.TemporaryDirectory(prefix="gpugate-chaos-") as tmp:
        cluster = Cluster(Path(tmp), video)
        stream = Stream(cluster)
        faults: list[dict[str, Any]] = []
        started = time.monotonic()
        try:
            await cluster.up(AGENTS)
            async with aiohttp.ClientSession() as http:
                feeder = asyncio.create_task(stream.feed(http, PACE_S, MOST_WAITING))
                try:
                    while len(stream.accepted) < jobs:
                        await asyncio.sleep(rng.uniform(15, 45))
                        if len(stream.accepted) < jobs:
                            faults.append(await _strike(cluster, rng))
                finally:
                    feeder.cancel()
                    await asyncio.gather(feeder, return_exceptions=True)
                final = await stream.wait_all(http, 1800)
            unexpected = cluster.unexpected_exits()
        finally:
            await cluster.down()
        took = time.monotonic() - started
    report = summary(final)
    return {"seed": seed, "jobs_asked": jobs, **report, "client_retries": stream.retries, "seconds": round(took, 1),
            "faults": faults, "unexpected_exits": unexpected, "orphaned_comfyuis": cluster.orphans,
            "machine": {"cpus": _cpus(), "python": platform.python_version()}}


async def _strike(cluster: Cluster, rng: random.Random) -> dict[str, Any]:
    """One fault at random; how long until every agent served images again."""
    kind = rng.choice(["kill-comfyui", "kill-agent", "sigterm-router", "kill-router", "impostor"])
    agent = rng.choice(AGENTS)
    at = time.monotonic()
    if kind == "kill-comfyui":
        await cluster.kill_comfyui(agent)
    elif kind == "kill-agent":
        await cluster.kill_agent(agent)
    elif kind == "sigterm-router":
        await cluster.restart_router(signal.SIGTERM)
    elif kind == "kill-router":
        await cluster.restart_router(signal.SIGKILL)
    else:
        await cluster.impostor(agent)
    return {"fault": kind, "agent": agent if "router" not in kind else None,
            "recovered_s": round(time.monotonic() - at, 1)}


def _cpus() -> int:
    import os

    return os.cpu_count() or 0


def markdown(result: dict[str, Any]) -> str:
    by_kind: dict[str, list[float]] = {}
    for fault in result["faults"]:
        by_kind.setdefault(fault["fault"], []).append(fault["recovered_s"])
    lines = [
        "# Chaos run (bench/chaos.py)", "",
        f"Seed {result['seed']}, {result['machine']['cpus']} CPU cores, Python {result['machine']['python']}, "
        f"{len(AGENTS)} agents (each with its own ComfyUI on the tiny checkpoint, faster-whisper, Piper, FFmpeg), "
        f"{result['seconds']:.0f} s in all.", "",
        "| jobs accepted | Completed | not completed | client retries (router down) | faults |",
        "|---|---|---|---|---|",
        f"| {result['jobs']} | {result['states'].get('Completed', 0)} | {len(result['not_completed'])} | "
        f"{result['client_retries']} | {len(result['faults'])} |", "",
        "Attempts per job: " + ", ".join(f"{n} attempt{'s' if int(n) > 1 else ''}: {c} jobs"
                                        for n, c in result["attempts"].items()) + ".", "",
        "| fault | times | until the fleet served again (median, max) |", "|---|---|---|",
    ]
    for kind, times in sorted(by_kind.items()):
        ordered = sorted(times)
        lines.append(f"| {kind} | {len(times)} | {ordered[len(ordered) // 2]:.1f} s, {ordered[-1]:.1f} s |")
    lines += ["", f"Processes that ended unkilled: {len(result['unexpected_exits'])}. "
                  f"ComfyUIs that outlived their agent: {len(result['orphaned_comfyuis'])}."]
    if result["not_completed"]:
        lines += ["", "Not completed:", *(f"- {ref}: {why}" for ref, why in result["not_completed"].items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    result = asyncio.run(run(args.jobs, args.seed))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "chaos.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "chaos.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
