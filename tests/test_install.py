"""install.sh for real, in a clean copy of the project (fresh venv, no GPU), and the container
files checked statically (no Docker engine here): hadolint, and what they must contain."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gpugate.settings import PROJECT_ROOT, Settings, load_settings
from router.keys import create_key
from router.state import STORE
from tests.services import TOKEN, Router, call, router_settings_in

HADOLINT = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")


def test_the_dockerfile_passes_hadolint_and_installs_with_install_sh() -> None:
    linted = subprocess.run([HADOLINT, "--no-color", str(PROJECT_ROOT / "Dockerfile.cuda")], capture_output=True, text=True)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    lines = [line.strip() for line in (PROJECT_ROOT / "Dockerfile.cuda").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    stages = [i for i in instructions if i.startswith("FROM ")]
    assert stages[-1].startswith("FROM nvidia/cuda:") and "runtime" in stages[-1], "the image runs on the runtime base"
    assert "devel" in stages[0] and "RUN python3 -m agent.chat.build --cuda --portable /opt/llama.cpp/llama-server" in \
        instructions, "llama-server is built with CUDA in a devel stage, by gpugate's own build step"
    assert "ENV GPUGATE_CHAT__SERVER=/opt/llama.cpp/llama-server" in instructions
    assert "RUN ./install.sh --no-service" in instructions, "the image is built by install.sh's steps"
    user = next(i for i in instructions if i.startswith("USER "))
    assert user.split()[1].split(":")[0] not in ("0", "root")
    assert instructions.index(user) < instructions.index("RUN ./install.sh --no-service"), "installed as the user"
    assert any(i.startswith("HEALTHCHECK") for i in instructions) and 'CMD ["gpugate", "--log-level", "ERROR", "health", "agent"]' in instructions
    assert 'VOLUME ["/app/models", "/app/data"]' in instructions


def test_the_high_availability_override_runs_two_routers_on_postgresql_behind_a_balancer() -> None:
    ha = yaml.safe_load((PROJECT_ROOT / "docker-compose.ha.yml").read_text())["services"]
    one, two = ha["router"], ha["router-b"]
    url = one["environment"]["GPUGATE_ROUTER__DATABASE_URL"]
    assert url.startswith("postgresql://") and two["environment"]["GPUGATE_ROUTER__DATABASE_URL"] == url
    assert one["environment"]["GPUGATE_ROUTER__SHARED"] == two["environment"]["GPUGATE_ROUTER__SHARED"] == "true"
    assert one["volumes"] == two["volumes"], "one data folder: the file store and the secrets"
    assert ha["agent"]["environment"]["GPUGATE_AGENT__ROUTER_URL"] == "http://router:8420,http://router-b:8420"
    assert one["depends_on"]["postgres"]["condition"] == "service_healthy"
    conf = (PROJECT_ROOT / "deploy" / "nginx-routers.conf").read_text()
    assert "server router:8420" in conf and "server router-b:8420" in conf and "proxy_buffering off" in conf
    assert ha["balancer"]["volumes"] == ["./deploy/nginx-routers.conf:/etc/nginx/nginx.conf:ro"]


def test_compose_runs_a_router_and_an_agent_that_reserves_the_gpus() -> None:
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    router, agent = compose["services"]["router"], compose["services"]["agent"]
    assert router["command"] == ["gpugate", "router"] and "8420:8420" in router["ports"]
    assert agent["environment"]["GPUGATE_AGENT__ROUTER_URL"] == "http://router:8420"
    assert agent["environment"]["GPUGATE_AGENT__TOKEN"] == router["environment"]["GPUGATE_ROUTER__AGENT_TOKEN"]
    [gpus] = agent["deploy"]["resources"]["reservations"]["devices"]
    assert gpus == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    assert any(v.startswith("models:") for v in agent["volumes"]) and set(compose["volumes"]) >= {"models", "agent-data"}
    assert agent["depends_on"]["router"]["condition"] == "service_healthy" and "health" in router["healthcheck"]["test"]
    assert "files:/app/data/artifacts" in router["volumes"] and "files:/app/data/artifacts" in agent["volumes"], \
        "the agent sees the router's file store at the router's path (the image's data folder)"


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), echo_api="true")


def _install(copy: Path, url: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPUGATE_", "VIRTUAL_ENV"))}
    return subprocess.run(["./install.sh", "--yes", "--router-url", url, "--token", TOKEN], cwd=copy, env=env,
                          capture_output=True, text=True, timeout=1500)


def _state(copy: Path) -> tuple[str, float, float]:
    freeze = subprocess.run([str(copy / ".venv" / "bin" / "python"), "-m", "pip", "freeze"], capture_output=True,
                            text=True, check=True).stdout
    return freeze, (copy / "gpugate.toml").stat().st_mtime, (copy / "vendor" / "comfyui" / "main.py").stat().st_mtime


async def test_install_sh_unattended_in_a_clean_copy_gives_a_working_agent_and_a_second_run_changes_nothing(
        router: Router, tmp_path: Path) -> None:
    copy = tmp_path / "gpugate"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=PROJECT_ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (PROJECT_ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / name, copy / name)
    first = await asyncio.to_thread(_install, copy, router.url)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "no NVIDIA driver found" in first.stdout + first.stderr, "a CPU-only host is told so"
    assert 'router_url = "' + router.url + '"' in (copy / "gpugate.toml").read_text()
    before = _state(copy)

    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUGATE_")}
    agent = subprocess.Popen([str(copy / ".venv" / "bin" / "gpugate"), "agent"], cwd=copy,
                             env={**env, "GPUGATE_AGENT__NAME": "installed", "GPUGATE_AGENT__RUNNERS": '["echo"]'},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        await router.wait_for_agents("installed", timeout=120)
        key = create_key(router.app[STORE], "k").token
        answer = await call(router, key, "Echo", {"text": "from the installed agent"})
        assert answer["results"] == [{"text": "from the installed agent"}]
        healthy = False
        for _ in range(60):  # the first heartbeat marks the agent alive
            check = subprocess.run([str(copy / ".venv" / "bin" / "gpugate"), "health", "agent"], cwd=copy, env=env,
                                   capture_output=True, text=True)
            if healthy := check.returncode == 0:
                break
            await asyncio.sleep(0.5)
        assert healthy, check.stderr
    finally:
        agent.terminate()
        agent.wait(30)

    second = await asyncio.to_thread(_install, copy, router.url)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "settings written" not in second.stdout
    assert _state(copy) == before, "a second run changes nothing"


def test_install_sh_changes_only_the_keys_it_was_given_in_an_existing_settings_file(tmp_path: Path) -> None:
    config = tmp_path / "gpugate.toml"
    original = """# written by hand: keep me
[agent]
name = "gpu-box-1"   # the name on the dashboard
router_url = "http://old-router:8420"
runners = ["comfy", "speech"]
gpus = [{ name = "A100", vram_total_gb = 80, vram_free_gb = 78 }]

[workflows]
dirs = ["workflows", "/srv/flows"]  # ours first

[router]
callback_allow_networks = [
    "10.0.0.0/8",  # the office
]
"""
    config.write_text(original)

    def install_config(*values: str) -> str:
        done = subprocess.run([sys.executable, "-m", "gpugate.config_file", str(config), *values], cwd=PROJECT_ROOT,
                              capture_output=True, text=True, check=True)
        return done.stdout

    said = install_config("agent.router_url=http://new-router:8420", "agent.token=s3cret")
    assert said == f"gpugate install: settings written to {config}\n"
    expected = original.replace('router_url = "http://old-router:8420"', 'router_url = "http://new-router:8420"').replace(
        "vram_free_gb = 78 }]\n", 'vram_free_gb = 78 }]\ntoken = "s3cret"\n')  # a new key ends its table
    assert config.read_text() == expected, "everything else byte for byte: comments, lists, tables"
    assert install_config("agent.router_url=http://new-router:8420") == "", "nothing to change: not rewritten"
    settings = load_settings(config, environ={})
    assert settings.agent.runners == ("comfy", "speech") and settings.agent.gpus[0].name == "A100"  # type: ignore[index]
    assert settings.agent.token == "s3cret" and settings.router.callback_allow_networks == ("10.0.0.0/8",)


def test_services_give_a_draining_agent_longer_than_its_grace_period() -> None:
    grace = Settings().agent.shutdown_grace_s
    compose = yaml.safe_load((PROJECT_ROOT / "docker-compose.yml").read_text())
    assert int(compose["services"]["agent"]["stop_grace_period"].rstrip("s")) > grace
    unit = (PROJECT_ROOT / "install.sh").read_text()
    assert int(unit.split("TimeoutStopSec=")[1].split()[0]) > grace
