"""Router throughput and added latency, side by side in one run. Results: bench/results/router.{json,md}.

(a) Echo jobs (no work on the agent) through a router process and one agent process, with
    durable SQLite storage: jobs/s and latency, one client after another and 32 clients at once.
    An echo job's whole round trip is what the router and the link add to a job.
(b) The tiny txt2img (64x64, 20 steps) through router + agent against the same ComfyUI driven
    directly (bench/overhead.py's minimal client), alternating blocks of jobs.
(c) The agent link's transport, measured: a job handed over by websocket message against one
    handed over by an HTTP long-poll request, both on aiohttp over loopback.

Run: ``python -m bench.router`` (``make bench`` runs it after bench/overhead.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from agent.comfy.launch import free_port
from agent.comfy.workflows import load_workflow, render, validate
from bench.overhead import CACHE, RESULTS, DirectDriver, _summary
from gpugate.settings import PROJECT_ROOT
from tests.model_fixtures import CHECKPOINT

TOKEN = "bench-agent-token"


class Services:
    """A router process and one agent process on loopback, stopped by PID on exit. ``routers`` > 1:
    that many routers sharing the PostgreSQL of GPUGATE_ROUTER__DATABASE_URL (router.shared), each
    with an agent of its own."""

    def __init__(self, tmp: Path, comfy: bool, runners: str | None = None, routers: int = 1) -> None:
        self.tmp, self.comfy = tmp, comfy
        self.runners = runners or ('["echo", "comfy"]' if comfy else '["echo"]')
        self.ports, self.comfy_port = [free_port("127.0.0.1") for _ in range(routers)], free_port("127.0.0.1")
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]
        self.url = self.urls[0]
        self.procs: list[subprocess.Popen[bytes]] = []

    def env(self, router: int = 0, **extra: str) -> dict[str, str]:
        shared = {"GPUGATE_ROUTER__SHARED": "true", "GPUGATE_AGENT__NAME": f"echo-{router}"} if len(self.urls) > 1 else {}
        return {**os.environ, **shared, "GPUGATE_PATHS__DATA_DIR": str(self.tmp / "data"),
                "GPUGATE_PATHS__MODELS_DIR": str(self.tmp / "models"), "GPUGATE_ROUTER__PORT": str(self.ports[router]),
                "GPUGATE_ROUTER__AGENT_TOKEN": TOKEN, "GPUGATE_ROUTER__ECHO_API": "true",
                "GPUGATE_AGENT__ROUTER_URL": self.urls[router], "GPUGATE_AGENT__TOKEN": TOKEN,
                "GPUGATE_AGENT__RUNNERS": self.runners,
                "GPUGATE_AGENT__CONCURRENCY": "32" if not self.comfy else "1", "GPUGATE_COMFY__DEVICE": "cpu",
                "GPUGATE_COMFY__PORT": str(self.comfy_port),
                **extra}

    def gpugate(self, *args: str, router: int = 0) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "gpugate.cli", "--log-level", "WARNING", *args],
                                cwd=PROJECT_ROOT, env=self.env(router), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.procs.append(proc)
        return proc

    async def __aenter__(self) -> Services:
        (self.tmp / "models" / "checkpoints").mkdir(parents=True)
        (self.tmp / "models" / "checkpoints" / CHECKPOINT).symlink_to(CACHE / CHECKPOINT)
        made = subprocess.run([sys.executable, "-m", "gpugate.cli", "keys", "create", "--name", "bench"], cwd=PROJECT_ROOT,
                              env=self.env(), capture_output=True, text=True, check=True)
        self.key = made.stdout.strip().rsplit(" ", 1)[-1]
        for router in range(len(self.urls)):
            self.gpugate("router", router=router)
            self.gpugate("agent", router=router)
        async with aiohttp.ClientSession() as http:
            for _ in range(1200):
                if all([await _agents(http, url) == 1 for url in self.urls]):
                    return self
                await asyncio.sleep(0.1)
        await self.__aexit__()  # what started is stopped
        raise RuntimeError("routers and agents did not come up")

    async def __aexit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


async def _agents(http: aiohttp.ClientSession, url: str) -> int:
    """The agents connected to the router at ``url`` (-1 while it does not answer)."""
    try:
        async with http.get(f"{url}/health") as r:
            return (await r.json())["agents"]
    except aiohttp.ClientError:
        return -1


async def echo_load(services: Services, clients: int, jobs: int) -> dict[str, Any]:
    """``clients`` sending Echo jobs one after another (spread over the routers, as a load balancer
    would) until ``jobs`` are done: jobs/s and latency."""
    headers = {"Authorization": f"Bearer {services.key}"}
    latencies: list[float] = []
    remaining = jobs

    async def client(http: aiohttp.ClientSession, url: str) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            t0 = time.perf_counter()
            async with http.post(f"{url}/api/Echo", json={"text": "x"}, headers=headers) as r:
                body = await r.json()
            latencies.append((time.perf_counter() - t0) * 1000)
            assert body["results"] == [{"text": "x"}], body

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as http:
        for _ in range(50):  # warm up
            async with http.post(f"{services.url}/api/Echo", json={"text": "x"}, headers=headers) as r:
                await r.read()
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, services.urls[i % len(services.urls)]) for i in range(clients)))
        elapsed = time.perf_counter() - t0
    return {"clients": clients, "jobs": len(latencies), "jobs_per_s": round(len(latencies) / elapsed, 1),
            "latency_ms": _summary(latencies)}


async def txt2img_vs_direct(services: Services, jobs: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {services.key}"}
    body = {"positivePrompt": "a lighthouse", "width": 64, "height": 64, "model": CHECKPOINT}
    template = load_workflow(PROJECT_ROOT / "workflows" / "txt2img.json")
    times: dict[str, list[float]] = {"direct": [], "router": []}
    async with aiohttp.ClientSession() as http, DirectDriver(f"http://127.0.0.1:{services.comfy_port}") as direct:
        for _ in range(jobs // 5 + 1):  # the first block of each is warm-up
            for _ in range(5):
                params = validate(template, {"prompt": "a lighthouse", "width": 64, "height": 64, "checkpoint": CHECKPOINT},
                                  lambda n, i: None)
                prompt = render(template, params, {}, uuid.uuid4().hex)
                t0 = time.perf_counter()
                assert await direct.run(prompt)
                times["direct"].append((time.perf_counter() - t0) * 1000)
            for _ in range(5):
                t0 = time.perf_counter()
                async with http.post(f"{services.url}/api/TextToImage", json=body, headers=headers) as r:
                    answer = await r.json()
                times["router"].append((time.perf_counter() - t0) * 1000)
                assert answer.get("results"), answer
    times = {k: v[5:] for k, v in times.items()}
    p50 = {k: statistics.median(v) for k, v in times.items()}
    return {"direct_ms": _summary(times["direct"]), "router_ms": _summary(times["router"]),
            "overhead_p50_ms": round(p50["router"] - p50["direct"], 2),
            "overhead_p50_pct": round(100 * (p50["router"] / p50["direct"] - 1), 1)}


async def transports(rounds: int) -> dict[str, Any]:
    """A job handed to a worker and its answer returned: one websocket exchange vs two HTTP requests
    (the long-poll that returns the job, and the POST of its result), each on a kept-alive connection."""
    app = web.Application()

    async def poll(request: web.Request) -> web.Response:
        return web.json_response({"job_id": 1, "params": {"text": "x"}})

    async def result(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({})

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str(json.dumps({"job_id": 1, "params": {"text": "x"}}))
        async for msg in ws:
            await ws.send_str(json.dumps({"job_id": 1, "params": {"text": msg.data}}))
        return ws

    app.add_routes([web.get("/poll", poll), web.post("/result", result), web.get("/ws", socket)])
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port("127.0.0.1")
    await web.TCPSite(runner, "127.0.0.1", port).start()
    out = {}
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            t0 = time.perf_counter()
            for _ in range(rounds):
                async with http.get("/poll") as r:
                    await r.json()
                async with http.post("/result", json={"text": "x"}) as r:
                    await r.read()
            out["http_long_poll_us_per_job"] = round((time.perf_counter() - t0) / rounds * 1e6, 1)
            async with http.ws_connect("/ws") as ws:
                await ws.receive()
                t0 = time.perf_counter()
                for _ in range(rounds):
                    await ws.send_str("x")
                    await ws.receive()
                out["websocket_us_per_job"] = round((time.perf_counter() - t0) / rounds * 1e6, 1)
    finally:
        await runner.cleanup()
    return out


async def measure(jobs: int, txt2img_jobs: int) -> dict[str, Any]:
    subprocess.run([sys.executable, "-m", "tests.model_fixtures", str(CACHE), str(PROJECT_ROOT / "vendor" / "comfyui")],
                   check=True)
    report: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, CPU only"}
    report["transport"] = await transports(2000)
    print("transport", report["transport"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        async with Services(Path(tmp), comfy=False) as services:
            report["echo_sequential"] = await echo_load(services, 1, jobs // 4)
            print("echo, 1 client", report["echo_sequential"], flush=True)
            report["echo_32_clients"] = await echo_load(services, 32, jobs)
            print("echo, 32 clients", report["echo_32_clients"], flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        async with Services(Path(tmp), comfy=True) as services:
            report["txt2img"] = await txt2img_vs_direct(services, txt2img_jobs)
            print("txt2img", report["txt2img"], flush=True)
    return report


def write(report: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "router.json").write_text(json.dumps(report, indent=2) + "\n")
    seq, par, t2i, tr = report["echo_sequential"], report["echo_32_clients"], report["txt2img"], report["transport"]
    rows = [
        "| measurement | result |", "|---|---|",
        f"| echo jobs, 1 client | {seq['jobs_per_s']} jobs/s; latency p50 {seq['latency_ms']['p50']} ms, p99 {seq['latency_ms']['p99']} ms |",
        f"| echo jobs, 32 clients | {par['jobs_per_s']} jobs/s; latency p50 {par['latency_ms']['p50']} ms, p99 {par['latency_ms']['p99']} ms |",
        f"| txt2img 64x64 via router vs direct ComfyUI | p50 {t2i['router_ms']['p50']} vs {t2i['direct_ms']['p50']} ms: "
        f"{t2i['overhead_p50_ms']:+} ms ({t2i['overhead_p50_pct']:+}%) |",
        f"| handing a job over: websocket vs HTTP long-poll | {tr['websocket_us_per_job']} vs {tr['http_long_poll_us_per_job']} µs per job |",
    ]
    (RESULTS / "router.md").write_text(f"Router benchmark; {report['machine']}; {report['when']}.\n\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=4000)
    parser.add_argument("--txt2img-jobs", type=int, default=30)
    args = parser.parse_args()
    report = asyncio.run(measure(args.jobs, args.txt2img_jobs))
    write(report)
    print(f"written to {RESULTS / 'router.md'}")


if __name__ == "__main__":
    main()
