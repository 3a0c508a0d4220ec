"""The chaos harness: real processes on loopback and the faults a GPU server meets.

A ``Cluster`` is a `gpugate router` process (or several sharing a PostgreSQL and a data folder,
router.shared, with each agent knowing them all) and `gpugate agent` processes (each with its own
ComfyUI on the tiny checkpoint, plus faster-whisper, Piper and FFmpeg), all stopped by PID. A
``Stream`` submits Queue* jobs (TextToImage, a video transform, TextToSpeech) as a client would
(through the routers in turn, as a load balancer would): each with its own refId, retried with the
same refId while a router is down, then followed to its end. The faults are methods of the cluster: kill -9 of a ComfyUI, of an agent (restarted under
the same name), of the router (restarted), SIGTERM of the router (restarted), and a second agent
connecting under a name in use.

tests/test_chaos.py runs a short stream with each fault once (`make test`); bench/chaos.py a long
one with faults at random moments from a seed (results in bench/results/chaos.md).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from agent.comfy.launch import free_port
from gpugate.settings import PROJECT_ROOT
from tests.model_fixtures import CHECKPOINT

TOKEN = "chaos-agent-token"
SENTENCES = ("The lighthouse keeper counted every ship.", "Rain fell on the quiet harbour all night.",
             "A small robot learned to paint the sea.")
FINAL = ("Completed", "Failed", "Cancelled")


@dataclass
class Process:
    """One process we started: whether its end was our doing, and where its output went."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    killed: bool = False

    @property
    def pid(self) -> int:
        return self.popen.pid

    def signal(self, sig: int) -> None:
        self.killed = True
        self.popen.send_signal(sig)


class Cluster:
    """Routers and agents as processes, in ``root``; each fault is a method. ``database``: the
    routers' PostgreSQL (needed for more than one router: they share it)."""

    def __init__(self, root: Path, media: Path, *, lease_grace_s: float = 10.0, database: str | None = None,
                 routers: int = 1) -> None:
        assert routers == 1 or database, "routers share their work through PostgreSQL"
        self.root, self.media, self.database = root, media, database
        self.ports = [free_port("127.0.0.1") for _ in range(routers)]
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]
        self._turn = itertools.count()
        self.lease_grace_s = lease_grace_s
        self.processes: list[Process] = []
        self.routers: list[Process | None] = [None] * routers
        self.agents: dict[str, Process] = {}
        self._first_router: dict[str, int] = {}  # agent -> the router it tries first
        self.orphans: list[str] = []  # ComfyUIs that outlived their agents
        self.key = ""
        (root / "models" / "checkpoints").mkdir(parents=True, exist_ok=True)
        link = root / "models" / "checkpoints" / CHECKPOINT
        if not link.exists():
            link.symlink_to(Path(os.environ.get("GPUGATE_TEST_CACHE", Path.home() / ".cache" / "gpugate" / "fixtures"))
                            / CHECKPOINT)

    # ---- processes -------------------------------------------------------------------------------

    def next_url(self) -> str:
        """The router the next request goes to: each in turn, as a load balancer would."""
        return self.urls[next(self._turn) % len(self.urls)]

    def _env(self, router: int = 0, **extra: str) -> dict[str, str]:
        shared = {"GPUGATE_ROUTER__DATABASE_URL": self.database, "GPUGATE_ROUTER__SHARED": "true",
                  "GPUGATE_ROUTER__PEER_TIMEOUT_S": "5"} if self.database else {}
        return {**{k: v for k, v in os.environ.items() if not k.startswith("GPUGATE_")}, **shared,
                "GPUGATE_PATHS__DATA_DIR": str(self.root / "router-data"), "GPUGATE_PATHS__MODELS_DIR": str(self.root / "models"),
                "GPUGATE_ROUTER__PORT": str(self.ports[router]), "GPUGATE_ROUTER__AGENT_TOKEN": TOKEN,
                "GPUGATE_ROUTER__HEARTBEAT_TIMEOUT_S": "6", "GPUGATE_ROUTER__LEASE_GRACE_S": str(self.lease_grace_s),
                "GPUGATE_ROUTER__SYNC_TIMEOUT_S": "60", "GPUGATE_COMFY__DEVICE": "cpu", **extra}

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> Process:
        log = self.root / f"{name}-{len(self.processes)}.log"
        with open(log, "wb") as out:
            popen = subprocess.Popen([sys.executable, "-m", "gpugate.cli", *args], cwd=PROJECT_ROOT, env=env,
                                     stdout=out, stderr=subprocess.STDOUT)
        process = Process(name, popen, log)
        self.processes.append(process)
        return process

    def start_router(self, router: int = 0) -> None:
        self.routers[router] = self._start(f"router{router or ''}", ["router"], self._env(router))

    def router_urls(self, first: int) -> str:
        """agent.router_url for an agent that tries router ``first`` first, then the others."""
        return ",".join(self.urls[first:] + self.urls[:first])

    def start_agent(self, name: str, runners: str = '["comfy", "speech", "media"]', **env: str) -> Process:
        first = self._first_router.setdefault(name, len(self._first_router) % len(self.urls))
        settings = {"GPUGATE_PATHS__DATA_DIR": str(self.root / f"agent-{name}"), "GPUGATE_AGENT__NAME": name,
                    "GPUGATE_AGENT__ROUTER_URL": self.router_urls(first), "GPUGATE_AGENT__TOKEN": TOKEN, "GPUGATE_AGENT__HEARTBEAT_S": "1",
                    "GPUGATE_AGENT__CONCURRENCY": "2", "GPUGATE_AGENT__RUNNERS": runners,
                    "GPUGATE_AGENT__SHUTDOWN_GRACE_S": "30"}
        process = self._start(f"agent-{name}", ["agent"], self._env(**{**settings, **env}))
        if runners != '["echo"]':
            self.agents[name] = process
        return process

    async def up(self, agents: list[str]) -> None:
        made = subprocess.run([sys.executable, "-m", "gpugate.cli", "keys", "create", "--name", "chaos", "--admin"], cwd=PROJECT_ROOT,
                              env=self._env(), capture_output=True, text=True, check=True)
        self.key = made.stdout.strip().rsplit(" ", 1)[-1]
        for router in range(len(self.urls)):
            self.start_router(router)
        for name in agents:
            self.start_agent(name)
        await self.wait_for(lambda s: set(agents) <= self.ready_agents(s), "agents ready", 300)

    async def down(self) -> None:
        """SIGTERM the agents (they drain into the router), then the router; kill what does not stop."""
        for group in ([p for p in self.live() if not p.name.startswith("router")], self.live()):
            for process in group:
                process.signal(signal.SIGTERM)
            for process in group:
                try:
                    await asyncio.to_thread(process.popen.wait, 90)
                except subprocess.TimeoutExpired:
                    process.popen.kill()
                    process.popen.wait()

    def live(self) -> list[Process]:
        return [p for p in self.processes if p.popen.poll() is None]

    def unexpected_exits(self) -> list[str]:
        """Processes that ended though nobody killed them, with their last log lines."""
        return [f"{p.name} (pid {p.pid}) exited with {p.popen.returncode}:\n" + _tail(p.log)
                for p in self.processes if not p.killed and p.popen.poll() is not None]

    def comfyui_of(self, agent: str) -> psutil.Process | None:
        try:
            children = psutil.Process(self.agents[agent].pid).children()
        except psutil.NoSuchProcess:
            return None
        return next((c for c in children if any("main.py" in part for part in c.cmdline())), None)

    # ---- the router's view -----------------------------------------------------------------------

    async def dashboard(self) -> dict[str, Any] | None:
        try:
            async with aiohttp.ClientSession() as http, http.get(
                    f"{self.next_url()}/api/GetDashboard", headers={"Authorization": f"Bearer {self.key}"},
                    timeout=aiohttp.ClientTimeout(total=5)) as r:
                return await r.json() if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError):
            return None

    @staticmethod
    def ready_agents(dashboard: dict[str, Any]) -> set[str]:
        """Agents connected with their image capability (their ComfyUI up)."""
        return {a["name"] for a in dashboard["agents"] if "txt2img" in a["capabilities"]}

    async def wait_for(self, predicate: Any, what: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if (board := await self.dashboard()) is not None and predicate(board):
                return board
            await asyncio.sleep(0.25)
        raise AssertionError(f"timed out waiting for: {what}\n" + "\n".join(_tail(p.log) for p in self.live()))

    # ---- faults ------------------------------------------------------------------------------------

    async def kill_comfyui(self, agent: str) -> int:
        """kill -9 the agent's ComfyUI (what the OOM killer does); wait until it serves images again."""
        comfy = self.comfyui_of(agent)
        assert comfy is not None, f"{agent} has no ComfyUI"
        comfy.kill()
        await self.wait_for(lambda s: agent not in self.ready_agents(s), f"{agent} withdrawing its images", 60)
        await self.wait_for(lambda s: agent in self.ready_agents(s), f"{agent}'s ComfyUI back", 300)
        return comfy.pid

    async def kill_agent(self, agent: str) -> None:
        """kill -9 an agent; its ComfyUI must go with it; start it again under the same name."""
        comfy = self.comfyui_of(agent)
        self.agents[agent].signal(signal.SIGKILL)
        await asyncio.to_thread(self.agents[agent].popen.wait, 30)
        if comfy is not None:
            try:
                await asyncio.to_thread(comfy.wait, 30)
            except psutil.TimeoutExpired:
                self.orphans.append(f"ComfyUI {comfy.pid} of {agent}")
                comfy.kill()
        self.start_agent(agent)
        await self.wait_for(lambda s: agent in self.ready_agents(s), f"{agent} back", 300)

    async def restart_router(self, sig: int, router: int = 0) -> None:
        """SIGTERM (a deploy) or SIGKILL (a crash) a router, and start it again."""
        process = self.routers[router]
        assert process is not None
        process.signal(sig)
        await asyncio.to_thread(process.popen.wait, 60)
        self.start_router(router)
        names = set(self.agents)
        await self.wait_for(lambda s: names <= self.ready_agents(s), "agents rejoining the new router", 120)

    async def impostor(self, name: str) -> str:
        """A second agent under a name already connected (with several routers: trying another router
        first than the agent did): it must be refused and change nothing."""
        other = (self._first_router[name] + 1) % len(self.urls)
        process = self.start_agent(name, runners='["echo"]', GPUGATE_PATHS__DATA_DIR=str(self.root / f"impostor-{name}"),
                                   GPUGATE_AGENT__ROUTER_URL=self.router_urls(other))
        refused = f"an agent named '{name}' is"
        deadline = time.monotonic() + 120
        while refused not in (text := process.log.read_text(errors="replace")):
            assert process.popen.poll() is None, f"the impostor exited:\n{text[-2000:]}"
            assert time.monotonic() < deadline, f"the impostor was not refused:\n{text[-2000:]}"
            await asyncio.sleep(0.25)
        process.signal(signal.SIGKILL)
        await asyncio.to_thread(process.popen.wait, 30)
        return next(line for line in text.splitlines() if refused in line)


@dataclass
class Stream:
    """A client submitting Queue* jobs and following them; it retries through router restarts."""

    cluster: Cluster
    accepted: dict[str, int] = field(default_factory=dict)  # refId -> jobId
    kinds: dict[str, str] = field(default_factory=dict)  # refId -> API
    retries: int = 0  # submissions retried because the router was down or failing
    _numbers: Any = field(default_factory=itertools.count)

    async def submit(self, http: aiohttp.ClientSession) -> None:
        number = next(self._numbers)
        ref = f"chaos-{number}"
        api, form = self._job(number)
        headers = {"Authorization": f"Bearer {self.cluster.key}"}
        deadline = time.monotonic() + 300
        while True:
            try:
                async with http.post(f"{self.cluster.next_url()}/api/Queue{api}", data=form(ref), headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=30)) as r:
                    answer = await r.json(content_type=None)
                    if r.status == 200:
                        self.accepted[ref], self.kinds[ref] = answer["jobId"], api
                        return
                    if r.status < 500:
                        raise AssertionError(f"{api} refused: {answer}")
            except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
                pass
            self.retries += 1
            assert time.monotonic() < deadline, f"{api} {ref} never accepted"
            await asyncio.sleep(0.5)

    def _job(self, number: int) -> tuple[str, Any]:
        kind = number % 3
        if kind == 0:
            return "TextToImage", lambda ref: _form(ref, positivePrompt=f"chaos {number}", width="64", height="64",
                                                    model=CHECKPOINT)
        if kind == 1:
            video = self.cluster.media.read_bytes()
            return "ScaleVideo", lambda ref: _form(ref, width="160", height="120", video=("v.mp4", video))
        return "TextToSpeech", lambda ref: _form(ref, input=SENTENCES[number % len(SENTENCES)])

    async def jobs(self, http: aiohttp.ClientSession) -> dict[str, dict[str, Any]]:
        """Every accepted job as QueryJobs has it now (state, attempts, agent, error), by refId;
        {} while the router is down."""
        try:
            async with http.get(f"{self.cluster.next_url()}/api/QueryJobs", params={"limit": "1000"},
                                headers={"Authorization": f"Bearer {self.cluster.key}"},
                                timeout=aiohttp.ClientTimeout(total=10)) as r:
                if r.status != 200:
                    return {}
                found = {j["refId"]: j for j in (await r.json())["jobs"]}
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            return {}
        return {ref: found[ref] for ref in self.accepted if ref in found}

    async def finished(self, http: aiohttp.ClientSession) -> int:
        return sum(j["jobState"] in FINAL for j in (await self.jobs(http)).values())

    async def feed(self, http: aiohttp.ClientSession, pace_s: float, most_waiting: int) -> None:
        """Submit one job after another, ``pace_s`` apart, keeping at most ``most_waiting`` unfinished
        (unless the router is down: then the client keeps trying, as clients do)."""
        while True:
            jobs = await self.jobs(http)
            if jobs and len(self.accepted) - sum(j["jobState"] in FINAL for j in jobs.values()) >= most_waiting:
                await asyncio.sleep(pace_s)
                continue
            await self.submit(http)
            await asyncio.sleep(pace_s)

    async def wait_all(self, http: aiohttp.ClientSession, timeout: float) -> dict[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            jobs = await self.jobs(http)
            if len(jobs) == len(self.accepted) and all(j["jobState"] in FINAL for j in jobs.values()):
                return jobs
            if time.monotonic() > deadline:
                stuck = {ref: (j["jobState"], j["agent"]) for ref, j in jobs.items() if j["jobState"] not in FINAL}
                raise AssertionError(f"jobs never ended: {stuck}; not found: {set(self.accepted) - set(jobs)}")
            await asyncio.sleep(1)


def summary(jobs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Counts for a report: final states, attempts per job, and what did not complete (and why)."""
    return {"jobs": len(jobs), "states": dict(Counter(j["jobState"] for j in jobs.values())),
            "attempts": dict(sorted(Counter(j["attempts"] for j in jobs.values()).items())),
            "not_completed": {ref: (j["error"] or {}).get("message") for ref, j in jobs.items()
                              if j["jobState"] != "Completed"}}


def _form(ref: str, **fields: Any) -> aiohttp.FormData:
    form = aiohttp.FormData()
    form.add_field("refId", ref)
    for name, value in fields.items():
        if isinstance(value, tuple):
            form.add_field(name, value[1], filename=value[0], content_type="application/octet-stream")
        else:
            form.add_field(name, value)
    return form


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
