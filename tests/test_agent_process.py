"""`gpugate agent` (what `make run` starts) as a process: ready, then stopped by a signal or killed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpugate.settings import PROJECT_ROOT


def start_agent(models_dir: Path, data_dir: Path) -> tuple[subprocess.Popen[str], int]:
    """Start the agent; return it and its ComfyUI's PID once it says it is ready."""
    env = {**os.environ, "GPUGATE_COMFY__DEVICE": "cpu", "GPUGATE_PATHS__MODELS_DIR": str(models_dir),
           "GPUGATE_PATHS__DATA_DIR": str(data_dir)}
    agent = subprocess.Popen([sys.executable, "-m", "gpugate.cli", "agent"], cwd=PROJECT_ROOT, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    comfy_pid = None
    deadline = time.monotonic() + 180
    assert agent.stdout is not None
    for line in agent.stdout:
        if found := re.search(r"ComfyUI starting pid=(\d+)", line):
            comfy_pid = int(found.group(1))
        if "gpugate agent ready" in line:
            break
        assert time.monotonic() < deadline, "agent not ready in time"
    else:
        pytest.fail("agent exited before it was ready")
    assert comfy_pid is not None and _alive(comfy_pid)
    return agent, comfy_pid


def test_sigterm_stops_the_agent_and_its_comfyui(models_dir: Path, tmp_path: Path) -> None:
    agent, comfy_pid = start_agent(models_dir, tmp_path)
    agent.send_signal(signal.SIGTERM)
    rest, _ = agent.communicate(timeout=60)
    assert agent.returncode == 0, rest
    assert "ComfyUI stopped" in rest
    assert not _alive(comfy_pid)


def test_a_killed_agent_takes_its_comfyui_with_it(models_dir: Path, tmp_path: Path) -> None:
    agent, comfy_pid = start_agent(models_dir, tmp_path)
    agent.kill()
    agent.communicate(timeout=10)
    deadline = time.monotonic() + 30
    while _alive(comfy_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(comfy_pid), "ComfyUI outlived its agent"


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
