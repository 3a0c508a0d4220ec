"""The ``gpugate`` command as a person runs it: a real process, real ComfyUI, files on disk."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from gpugate.settings import PROJECT_ROOT
from tests.conftest import image_of
from tests.model_fixtures import CHECKPOINT


def gpugate(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpugate.cli", "--log-level", "WARNING", *args],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=PROJECT_ROOT)


def test_workflow_list_shows_each_workflow_and_its_parameters() -> None:
    result = gpugate("workflow", "list")
    assert result.returncode == 0, result.stderr
    for line in ("txt2img: Generate images", "    width            int 64..2048 (default 512)",
                 "    seed             seed (random)", "inpaint:", "upscale:", "img2img:"):
        assert line in result.stdout


def test_workflow_run_writes_the_outputs(models_dir: Path, tmp_path: Path) -> None:
    """Runs on an existing ComfyUI checkout (the vendored tree stands in for one)."""
    env = {
        "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
        "GPUGATE_COMFY__MODE": "checkout", "GPUGATE_COMFY__CHECKOUT_DIR": str(PROJECT_ROOT / "vendor" / "comfyui"),
        "GPUGATE_COMFY__DEVICE": "cpu",
        "GPUGATE_PATHS__MODELS_DIR": str(models_dir), "GPUGATE_PATHS__DATA_DIR": str(tmp_path / "data"),
    }
    result = gpugate("workflow", "run", "txt2img", "--set", "prompt=a lighthouse", "--set", "width=64",
                     "--set", "height=72", "--set", "steps=2", "--set", f"checkpoint={CHECKPOINT}",
                     "--out", str(tmp_path / "out"), env=env)
    assert result.returncode == 0, result.stderr
    [written] = result.stdout.split()
    assert image_of(Path(written).read_bytes()).size == (64, 72)

    upscaled = gpugate("workflow", "run", "upscale", "--set", f"image={written}", "--set", "model=nope.pth",
                       "--out", str(tmp_path / "out"), env=env)
    assert upscaled.returncode == 1
    assert "error (invalid): model: 'nope.pth' is not installed; installed: tiny-esrgan-2x.pth" in upscaled.stderr


def test_failures_exit_non_zero_with_a_message(tmp_path: Path) -> None:
    unknown = gpugate("workflow", "run", "no_such_flow")
    assert unknown.returncode == 1 and "no workflow named 'no_such_flow'" in unknown.stderr
    unreadable = gpugate("workflow", "run", "upscale", "--set", f"image={tmp_path / 'missing.png'}")
    assert unreadable.returncode == 1 and "image: cannot read" in unreadable.stderr
    syntax = gpugate("workflow", "run", "upscale", "--set", "image")
    assert syntax.returncode == 1 and "expected KEY=VALUE" in syntax.stderr
    config = gpugate("--config", str(tmp_path / "nope.toml"), "workflow", "list")
    assert config.returncode == 2 and "cannot read config file" in config.stderr
