"""The models this agent can serve, by kind: what ComfyUI's loaders list, sized from models/."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocol import combo_values

# kind (a models/ folder) -> the loader node and input whose combo lists that kind's files
LOADERS: dict[str, tuple[str, str]] = {
    "checkpoints": ("CheckpointLoaderSimple", "ckpt_name"),
    "diffusion_models": ("UNETLoader", "unet_name"),
    "text_encoders": ("CLIPLoader", "clip_name"),
    "vae": ("VAELoader", "vae_name"),
    "loras": ("LoraLoader", "lora_name"),
    "upscale_models": ("UpscaleModelLoader", "model_name"),
    "controlnet": ("ControlNetLoader", "control_net_name"),
    "clip_vision": ("CLIPVisionLoader", "clip_name"),
}


@dataclass(frozen=True)
class Model:
    kind: str
    name: str
    size: int | None  # bytes on disk, when the file is under models/


def list_models(object_info: Mapping[str, Any], models_dir: Path) -> list[Model]:
    """Every model ComfyUI can load, with its file size where we can see the file."""
    out = []
    for kind, (node, input_name) in LOADERS.items():
        for name in combo_values(object_info, node, input_name) or ():
            if "." not in name:  # built-in pseudo entries such as VAELoader's "pixel_space"
                continue
            path = models_dir / kind / name
            out.append(Model(kind, name, path.stat().st_size if path.is_file() else None))
    return out
