"""Running the services for tests: a router in this process (so a test can restart it) and
`gpugate agent` processes (stopped by PID), plus the client calls the tests make."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from agent.comfy.launch import free_port
from gpugate.settings import PROJECT_ROOT, Settings, load_settings
from router.app import create_app
from router.main import router_url
from router.state import SESSIONS
from tests.conftest import CACHE
from tests.model_fixtures import CHECKPOINT, UPSCALER

TOKEN = "agent-token-for-tests"
TINY_CATALOG = '[models.tiny]\nkind = "checkpoints"\nfile = "tiny.safetensors"\ndefault = true\n'


def router_settings_in(data: Path, catalog: str | None = None, **router: str) -> Settings:
    """A test router's settings: data in ``data``, a free loopback port and the test agent token;
    ``catalog`` (TOML) becomes its model catalog, ``router`` more [router] values (sync_timeout_s="120")."""
    env = {"GPUGATE_PATHS__DATA_DIR": str(data), "GPUGATE_ROUTER__PORT": str(free_port("127.0.0.1")),
           "GPUGATE_ROUTER__AGENT_TOKEN": TOKEN, **{f"GPUGATE_ROUTER__{k.upper()}": v for k, v in router.items()}}
    if catalog is not None:
        (data / "catalog.toml").write_text(catalog)
        env["GPUGATE_ROUTER__CATALOG"] = str(data / "catalog.toml")
    return load_settings(environ=env)

class Router:
    """The router app on a fixed loopback port; can be stopped and started again on the same data."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.url = router_url(settings)
        self.runner: Any = None

    async def start(self) -> None:
        from aiohttp import web

        self.app = create_app(self.settings)
        self.runner = web.AppRunner(self.app, handle_signals=False, shutdown_timeout=1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.settings.router.port).start()

    async def stop(self) -> None:
        await self.runner.cleanup()

    async def wait_for_agents(self, *names: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not set(names) <= set(self.app[SESSIONS].sessions):
            assert time.monotonic() < deadline, f"agents {names} did not join"
            await asyncio.sleep(0.2)


class RouterProcess:
    """A `gpugate router` process on PostgreSQL (``database``) with its data in ``data`` (routers
    given the same folder share it, as they would a volume); ``env``: more settings. Stopped by PID."""

    def __init__(self, data: Path, database: str, **env: str) -> None:
        self.port = free_port("127.0.0.1")
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "GPUGATE_PATHS__DATA_DIR": str(data), "GPUGATE_ROUTER__PORT": str(self.port),
                    "GPUGATE_ROUTER__AGENT_TOKEN": TOKEN, "GPUGATE_ROUTER__DATABASE_URL": database,
                    "GPUGATE_ROUTER__SYNC_TIMEOUT_S": "60", "GPUGATE_ROUTER__LEASE_GRACE_S": "60", **env}
        log = open(data.parent / f"router-{self.port}.log", "wb")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([sys.executable, "-m", "gpugate.cli", "router"], cwd=PROJECT_ROOT, env=self.env,
                                     stdout=log, stderr=subprocess.STDOUT)
        log.close()

    async def healthy(self) -> bool:
        try:
            async with aiohttp.ClientSession() as http, http.get(f"{self.url}/health",
                                                                 timeout=aiohttp.ClientTimeout(total=2)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not await self.healthy():
            assert self.proc.poll() is None, f"router on {self.port} exited with {self.proc.returncode}"
            assert time.monotonic() < deadline, f"router on {self.port} never answered"
            await asyncio.sleep(0.2)

    def new_key(self, name: str) -> str:
        """A new API key in this router's database (`gpugate keys create`)."""
        made = subprocess.run([sys.executable, "-m", "gpugate.cli", "keys", "create", "--name", name], cwd=PROJECT_ROOT,
                              env=self.env, capture_output=True, text=True, check=True)
        return made.stdout.strip().rsplit(" ", 1)[-1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Agents:
    """`gpugate agent` processes, stopped by PID at the end."""

    def __init__(self, root: Path, url: str) -> None:
        self.root, self.url = root, url
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.workflows = root / "workflows"
        shutil.copytree(PROJECT_ROOT / "workflows", self.workflows)
        with open(self.workflows / "txt2img.toml", "a") as declaration:
            declaration.write("\n[vram]\nper_megapixel_gb = 40\n")

    def start(self, name: str, free_gb: float, checkpoints: list[str], wrap: list[str] | None = None, **env: str) -> None:
        """Start agent ``name`` reporting ``free_gb`` of VRAM with these checkpoints; ``wrap`` is a command
        it runs under (it execs the agent's command line given as its arguments)."""
        models = self.root / name / "models"
        (models / "checkpoints").mkdir(parents=True)
        (models / "upscale_models").mkdir()
        for file in checkpoints:
            (models / "checkpoints" / file).symlink_to(CACHE / CHECKPOINT)
        (models / "upscale_models" / UPSCALER).symlink_to(CACHE / UPSCALER)
        env = {**os.environ, "GPUGATE_AGENT__NAME": name, "GPUGATE_AGENT__ROUTER_URL": self.url,
               "GPUGATE_AGENT__TOKEN": TOKEN, "GPUGATE_AGENT__HEARTBEAT_S": "1",
               "GPUGATE_AGENT__GPUS": json.dumps([{"name": "test GPU", "vram_total_gb": 8, "vram_free_gb": free_gb}]),
               "GPUGATE_COMFY__DEVICE": "cpu", "GPUGATE_PATHS__MODELS_DIR": str(models),
               "GPUGATE_WORKFLOWS__DIRS": json.dumps([str(self.workflows)]), "GPUGATE_AGENT__RUNNERS": '["comfy"]',
               "GPUGATE_PATHS__DATA_DIR": str(self.root / name / "data"), **env}
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen([*(wrap or []), sys.executable, "-m", "gpugate.cli", "agent"], cwd=PROJECT_ROOT,
                                            env=env, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def call(router: Router, key: str | None, api: str,
               body: dict[str, Any] | aiohttp.FormData | aiohttp.MultipartWriter, status: int = 200) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as http:
        kwargs = {"json": body} if isinstance(body, dict) else {"data": body}
        async with http.post(f"{router.url}/api/{api}", headers=headers, **kwargs) as r:
            answer = await r.json()
            assert r.status == status, answer
            return answer


async def api_call(url: str, key: str, api: str, body: dict[str, Any], status: int = 200) -> dict[str, Any]:
    """POST /api/{api} to the router at ``url`` (a RouterProcess's) with JSON."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as http:
        async with http.post(f"{url}/api/{api}", json=body) as r:
            answer = await r.json()
            assert r.status == status, answer
            return answer


async def status(router: Router, key: str, **query: Any) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{router.url}/api/GetArtifactGenerationStatus", params=query,
                            headers={"Authorization": f"Bearer {key}"}) as r:
            return await r.json()


async def until(router: Router, key: str, job_id: int | None, predicate, timeout: float = 180,  # noqa: ANN001
                **query: Any) -> dict[str, Any]:
    """The job's status once ``predicate`` holds for it (by ``job_id``, or by the query given: refId=...)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = await status(router, key, **({"jobId": job_id} if job_id is not None else query))
        if predicate(answer):
            return answer
        assert time.monotonic() < deadline, f"job {job_id} never got there: {answer}"
        await asyncio.sleep(0.1)


def finished(answer: dict[str, Any]) -> bool:
    return answer["jobState"] in ("Completed", "Failed", "Cancelled")
