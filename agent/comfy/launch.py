"""What to run for a ComfyUI the agent supervises: its folders, model paths and command line."""

from __future__ import annotations

import json
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from gpugate.errors import ConfigError
from gpugate.settings import Settings

# The model folders ComfyUI reads, mapped onto our models/ tree (models/README.md).
MODEL_FOLDERS = (
    "checkpoints", "clip", "clip_vision", "configs", "controlnet", "diffusion_models", "embeddings",
    "loras", "text_encoders", "unet", "upscale_models", "vae", "vae_approx",
)
STATE_FOLDERS = ("input", "output", "temp", "user", "custom_nodes", "models")


@dataclass(frozen=True)
class Launch:
    command: list[str]
    cwd: Path
    url: str
    input_dir: Path
    output_dir: Path
    temp_dir: Path


def prepare(settings: Settings, *, use_cuda: bool) -> Launch:
    """Create ComfyUI's state folders and model-path file; return how to start it."""
    comfy = settings.comfy
    if comfy.mode == "checkout":
        if comfy.checkout_dir is None:
            raise ConfigError("comfy.mode = 'checkout' needs comfy.checkout_dir")
        source = comfy.checkout_dir
    else:
        source = settings.comfy_vendor_dir
    if not (source / "main.py").is_file():
        hint = "run `make install` (or `gpugate comfy provision`)" if comfy.mode == "vendored" else "check comfy.checkout_dir"
        raise ConfigError(f"no ComfyUI at {source}: {hint}")
    state = settings.comfy_state_dir
    for name in STATE_FOLDERS:
        (state / name).mkdir(parents=True, exist_ok=True)
    paths_file = state / "extra_model_paths.yaml"
    paths_file.write_text(json.dumps(extra_model_paths(settings), indent=2))  # JSON is valid YAML
    port = comfy.port or free_port(comfy.listen)
    command = [
        str(comfy.python or sys.executable), "main.py",
        "--listen", comfy.listen, "--port", str(port),
        "--base-directory", str(state),
        "--extra-model-paths-config", str(paths_file),
        "--database-url", "sqlite:///:memory:",
        "--disable-auto-launch", "--disable-api-nodes", "--preview-method", "none",
    ]
    if not comfy.embed_workflow_metadata:
        command.append("--disable-metadata")
    if not use_cuda:
        command.append("--cpu")
    command += comfy.extra_args
    host = "127.0.0.1" if comfy.listen in ("0.0.0.0", "::", "") else comfy.listen
    return Launch(command, source, f"http://{host}:{port}", state / "input", state / "output", state / "temp")


def extra_model_paths(settings: Settings) -> dict[str, dict[str, str | bool]]:
    models = settings.paths.models_dir
    node_dirs = [settings.paths.custom_nodes_dir, *settings.comfy.extra_custom_node_dirs]
    return {
        "gpugate_models": {"base_path": str(models), "is_default": True, **{f: f for f in MODEL_FOLDERS}},
        "gpugate_nodes": {"custom_nodes": "\n".join(str(d) for d in node_dirs)},
    }


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host if host not in ("0.0.0.0", "::", "") else "127.0.0.1", 0))
        return s.getsockname()[1]
