"""Per-job overhead of the agent's engine against driving the same ComfyUI directly.

One ComfyUI, two drivers, alternating in blocks of ten jobs so drift and noise fall on both alike.
The agent clears each job out of ComfyUI just after answering; that work overlaps its own next job,
as in real use, and is finished (untimed) before each direct block so it never slows the baseline.

- direct: what a minimal hand-written client does (ComfyUI's own websocket example): POST /prompt,
  wait for ``executing`` with ``node: null`` on its own websocket, GET /history, GET /view per file.
- agent: ``ComfyEngine.run()``: parameter validation, rendering, the same round trip, classification,
  and cleanup (history entry and output files deleted), everything a job pays for.

Both give every job fresh inputs (a new filename prefix, a new seed), so ComfyUI's cache cannot
skip the work for one and not the other. Workloads: a trivial workflow (EmptyImage -> SaveImage)
and the tiny txt2img at 64x64, 2 steps. Results: bench/results/overhead.json and .md.

Run: ``make bench`` (or ``python -m bench.overhead --jobs 200``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import websockets

from agent.comfy.engine import ComfyEngine
from agent.comfy.workflows import render, validate
from gpugate.settings import PROJECT_ROOT, load_settings
from tests.model_fixtures import CHECKPOINT

RESULTS = Path(__file__).parent / "results"
CACHE = Path.home() / ".cache" / "gpugate" / "fixtures"
BLOCK = 10


class DirectDriver:
    """The baseline: ComfyUI's API used directly, nothing more than a job needs."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.client_id = uuid.uuid4().hex

    async def __aenter__(self) -> DirectDriver:
        self.http = aiohttp.ClientSession(self.url)
        self.ws = await websockets.connect(f"{self.url.replace('http', 'ws', 1)}/ws?clientId={self.client_id}", max_size=None)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.http.close()

    async def run(self, prompt: dict[str, Any]) -> list[bytes]:
        prompt_id = uuid.uuid4().hex
        async with self.http.post("/prompt", json={"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}) as r:
            assert r.status == 200, await r.text()
        while True:
            message = await self.ws.recv()
            if isinstance(message, str):
                event = json.loads(message)
                data = event.get("data", {})
                if event.get("type") == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    break
        async with self.http.get(f"/history/{prompt_id}") as r:
            outputs = (await r.json())[prompt_id]["outputs"]
        files = []
        for node in outputs.values():
            for item in node.get("images", []):
                async with self.http.get("/view", params=item) as r:
                    files.append(await r.read())
        return files


async def measure(jobs: int, warmup: int) -> dict[str, Any]:
    subprocess.run([sys.executable, "-m", "tests.model_fixtures", str(CACHE), str(PROJECT_ROOT / "vendor" / "comfyui")], check=True)
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models" / "checkpoints"
        models.mkdir(parents=True)
        (models / CHECKPOINT).symlink_to(CACHE / CHECKPOINT)
        settings = load_settings(environ={
            "GPUGATE_PATHS__DATA_DIR": str(Path(tmp) / "data"), "GPUGATE_PATHS__MODELS_DIR": str(Path(tmp) / "models"),
            "GPUGATE_WORKFLOWS__DIRS": json.dumps([str(PROJECT_ROOT / "workflows"), str(PROJECT_ROOT / "tests" / "workflows")]),
            "GPUGATE_COMFY__DEVICE": "cpu",
        })
        async with ComfyEngine(settings) as engine, DirectDriver(engine.url) as direct:
            workloads = {
                "trivial (EmptyImage -> SaveImage)": ("blank", {}),
                "txt2img 64x64, 2 steps": ("txt2img", {"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2,
                                                       "checkpoint": CHECKPOINT}),
            }
            results = {}
            for label, (name, params) in workloads.items():
                results[label] = await _compare(engine, direct, name, params, jobs, warmup)
                print(_line(label, results[label]), flush=True)
    return {
        "benchmark": "agent per-job overhead vs direct ComfyUI",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": f"{platform.machine()}, {_cores()} cores, {platform.python_implementation()} {platform.python_version()}, CPU only",
        "jobs_per_driver": jobs,
        "results": results,
    }


async def _compare(engine: ComfyEngine, direct: DirectDriver, name: str, params: dict[str, Any], jobs: int, warmup: int) -> dict[str, Any]:
    template = engine.library.get(name)

    def direct_prompt() -> dict[str, Any]:
        # what the agent renders, with a fresh seed and output folder so nothing is served from cache
        fresh = {**params, "seed": secrets.randbelow(2**53)} if "seed" in template.params else params
        return render(template, validate(template, fresh, lambda n, i: None), {}, uuid.uuid4().hex)

    times: dict[str, list[float]] = {"direct": [], "agent": []}
    for _ in range((warmup + jobs) // BLOCK):
        await engine.settle()
        for _ in range(BLOCK):
            prompt = direct_prompt()  # built outside the timed region: the baseline's prompt is free
            t0 = time.perf_counter()
            files = await direct.run(prompt)
            times["direct"].append((time.perf_counter() - t0) * 1000)
            assert files
        for _ in range(BLOCK):
            t0 = time.perf_counter()
            outputs = await engine.run(name, params)
            times["agent"].append((time.perf_counter() - t0) * 1000)
            assert outputs
    times = {k: v[warmup:] for k, v in times.items()}
    p50 = {k: statistics.median(v) for k, v in times.items()}
    return {
        "direct_ms": _summary(times["direct"]),
        "agent_ms": _summary(times["agent"]),
        "overhead_p50_ms": round(p50["agent"] - p50["direct"], 2),
        "overhead_p50_pct": round(100 * (p50["agent"] / p50["direct"] - 1), 1),
    }


def _summary(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=100)
    return {"p50": round(statistics.median(values), 2), "p90": round(q[89], 2), "p99": round(q[98], 2)}


def _line(label: str, r: dict[str, Any]) -> str:
    return (f"{label:38} direct p50 {r['direct_ms']['p50']:8.2f} ms   agent p50 {r['agent_ms']['p50']:8.2f} ms   "
            f"overhead {r['overhead_p50_ms']:+.2f} ms ({r['overhead_p50_pct']:+.1f}%)")


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def write(report: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "overhead.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = ["| workload | direct p50 / p90 (ms) | agent p50 / p90 (ms) | overhead at p50 |", "|---|---|---|---|"]
    for label, r in report["results"].items():
        rows.append(f"| {label} | {r['direct_ms']['p50']} / {r['direct_ms']['p90']} | {r['agent_ms']['p50']} / "
                    f"{r['agent_ms']['p90']} | {r['overhead_p50_ms']:+} ms ({r['overhead_p50_pct']:+}%) |")
    (RESULTS / "overhead.md").write_text(
        f"Agent overhead vs direct ComfyUI, {report['jobs_per_driver']} jobs each, alternated; "
        f"{report['machine']}; {report['when']}.\n\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=BLOCK)
    args = parser.parse_args()
    report = asyncio.run(measure(args.jobs, args.warmup))
    write(report)
    print(f"written to {RESULTS / 'overhead.md'}")


if __name__ == "__main__":
    main()
