"""Build the tiny real models the tests and benchmarks run on, once, into a cache outside the repo.

- ``tiny-sd15.safetensors``: an SD1.5-class checkpoint with random weights. ComfyUI recognises SD1.5
  from model_channels 320 and context_dim 768 and reads the depth from the state dict, so a UNet
  with one level, one res block and one transformer block is enough; the CLIP-L text encoder and
  the VAE are full size so the real loaders run. Images come out as noise; the pipeline is real.
- ``tiny-esrgan-2x.pth``: an ESRGAN with 8 filters and one block at scale 2, detected by spandrel.

Run ``python -m tests.model_fixtures DIR`` (a subprocess keeps torch out of the test process).
"""

from __future__ import annotations

import sys
from pathlib import Path

CHECKPOINT = "tiny-sd15.safetensors"
UPSCALER = "tiny-esrgan-2x.pth"
FIXTURES_VERSION = "1"  # bump when the builders change, so caches are rebuilt


def build_all(out: Path, comfy_dir: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / f".built-v{FIXTURES_VERSION}"
    if stamp.exists() and (out / CHECKPOINT).exists() and (out / UPSCALER).exists():
        return
    sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported: no CUDA probing
    _build_checkpoint(out / CHECKPOINT)
    _build_upscaler(out / UPSCALER)
    stamp.touch()


def _randomise(module) -> None:
    """ComfyUI's layers skip weight init (they expect a checkpoint); give every tensor a sane value."""
    import torch

    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.02)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()


def _build_checkpoint(path: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(
        image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
        channel_mult=[1], num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
        transformer_depth_middle=1, transformer_depth_output=[1, 1], context_dim=768,
    )
    _randomise(unet)
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                        num_attention_heads=12, max_position_embeddings=77, projection_dim=768))
    vae = AutoencoderKL(
        ddconfig={"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                  "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
        embed_dim=4,
    )
    _randomise(vae)
    state: dict[str, torch.Tensor] = {}
    for prefix, module in (("model.diffusion_model.", unet), ("cond_stage_model.transformer.", clip),
                           ("first_stage_model.", vae)):
        for key, tensor in module.state_dict().items():
            state[prefix + key] = tensor.detach().to(torch.float16).contiguous()
    tmp = path.with_suffix(".partial")
    save_file(state, str(tmp))
    tmp.rename(path)


def _build_upscaler(path: Path) -> None:
    import torch
    from spandrel import ModelLoader
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(0)
    model = ESRGAN(in_nc=3, out_nc=3, num_filters=8, num_blocks=1, scale=2)
    tmp = path.with_suffix(".partial")
    torch.save(model.state_dict(), tmp)
    assert ModelLoader().load_from_state_dict(torch.load(tmp)).scale == 2, "spandrel does not see a 2x upscaler"
    tmp.rename(path)


if __name__ == "__main__":
    build_all(Path(sys.argv[1]), Path(sys.argv[2]))
