"""Echo jobs through one router on SQLite, one on PostgreSQL, and two routers sharing one PostgreSQL
(router.shared, the clients spread over them), side by side: the store's cost on the router's own
path (a job is written when queued, claimed, and finished) and what a second router adds. A router
process and an echo agent process per router on loopback (bench/router.py's), PostgreSQL a
throwaway cluster on loopback (tests/postgres.py) with fsync on and commits not waited for, like
SQLite's WAL with synchronous=NORMAL. Rounds rotate which setup goes first.
Results: bench/results/stores.{json,md}. Run: ``python -m bench.stores``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.overhead import RESULTS
from bench.router import Services, echo_load
from tests.postgres import Cluster


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


SETUPS = {"sqlite": 1, "postgres": 1, "postgres, 2 routers": 2}  # setup -> routers


async def one(store: str, cluster: Cluster, clients: int, jobs: int) -> dict[str, Any]:
    extra = {"GPUGATE_ROUTER__DATABASE_URL": cluster.new_database()} if store.startswith("postgres") else {}
    with tempfile.TemporaryDirectory() as tmp, environment(**extra):
        async with Services(Path(tmp), comfy=False, routers=SETUPS[store]) as services:
            return await echo_load(services, clients, jobs)


async def measure(rounds: int, jobs: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="gpugate-bench-postgres-"))
    cluster = Cluster(folder, fsync=True)
    cluster.start()
    out: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "rounds": rounds, "jobs": jobs,
                           "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores"}
    try:
        for clients in (1, 32):
            runs: dict[str, list[dict[str, Any]]] = {store: [] for store in SETUPS}
            for i in range(rounds):
                for store in list(SETUPS)[i % len(SETUPS):] + list(SETUPS)[:i % len(SETUPS)]:
                    runs[store].append(await one(store, cluster, clients, jobs if clients > 1 else jobs // 4))
                    print(clients, store, runs[store][-1]["jobs_per_s"], flush=True)
            out[f"clients_{clients}"] = {
                store: {"jobs_per_s": round(statistics.median(r["jobs_per_s"] for r in results), 1),
                        "p50_ms": round(statistics.median(r["latency_ms"]["p50"] for r in results), 2)}
                for store, results in runs.items()}
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)
    return out


def write(result: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "stores.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Echo jobs: one router on SQLite, one on PostgreSQL, two sharing PostgreSQL ({result['machine']}; "
             f"{result['when']}; median of {result['rounds']} rounds)", "",
             "| clients | store | jobs/s | latency p50 |", "|---|---|---|---|"]
    for clients in (1, 32):
        for store, r in result[f"clients_{clients}"].items():
            lines.append(f"| {clients} | {store} | {r['jobs_per_s']} | {r['p50_ms']} ms |")
    (RESULTS / "stores.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2000)
    args = parser.parse_args()
    write(asyncio.run(measure(args.rounds, args.jobs)))
    print(f"written to {RESULTS / 'stores.md'}")


if __name__ == "__main__":
    main()
