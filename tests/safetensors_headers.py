"""Sparse safetensors files with real tensor names and shapes, for model-family detection tests.

``write_sparse`` writes a valid safetensors header (tensors laid out back to back, as the
safetensors library writes them) and then extends the file to its full nominal size with a hole:
a FLUX file is 23 GB on paper and a few hundred KiB on disk. The data region reads as zeros.

The per-family builders return ``{name: (dtype, shape)}`` with the names and shapes of the real
releases: the diffusion model is complete in its large tensors (every UNet resnet and transformer
block, every FLUX/MMDiT block), and the VAE and text encoders are represented by a spread of their
tensors. ``prefix`` is ``CHECKPOINT`` for a full checkpoint (models/checkpoints) and ``BARE`` for a
bare diffusion model (models/diffusion_models, models/unet).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

Tensors = dict[str, tuple[str, list[int]]]

CHECKPOINT = "model.diffusion_model."
BARE = ""

DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip


def write_sparse(path: Path, tensors: Tensors, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file whose header describes ``tensors`` and whose data is a hole."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, (dtype, shape) in tensors.items():
        end = offset + DTYPE_SIZES[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the library pads the header so the data is 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        f.truncate(8 + len(raw) + offset)


def header_size(path: Path) -> int:
    """Bytes taken by the length and the header: where the data region starts."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


# --- building blocks -------------------------------------------------------------------------


def _linear(t: Tensors, name: str, out: int, inp: int, dtype: str, bias: bool = True) -> None:
    t[f"{name}.weight"] = (dtype, [out, inp])
    if bias:
        t[f"{name}.bias"] = (dtype, [out])


def _conv(t: Tensors, name: str, out: int, inp: int, k: int, dtype: str) -> None:
    t[f"{name}.weight"] = (dtype, [out, inp, k, k])
    t[f"{name}.bias"] = (dtype, [out])


def _norm(t: Tensors, name: str, width: int, dtype: str) -> None:
    t[f"{name}.weight"] = (dtype, [width])
    t[f"{name}.bias"] = (dtype, [width])


# --- latent-diffusion UNet (SD1.x, SD2.x, SDXL) ----------------------------------------------


def _res_block(t: Tensors, p: str, cin: int, cout: int, emb: int, dtype: str) -> None:
    _norm(t, f"{p}.in_layers.0", cin, dtype)
    _conv(t, f"{p}.in_layers.2", cout, cin, 3, dtype)
    _linear(t, f"{p}.emb_layers.1", cout, emb, dtype)
    _norm(t, f"{p}.out_layers.0", cout, dtype)
    _conv(t, f"{p}.out_layers.3", cout, cout, 3, dtype)
    if cin != cout:
        _conv(t, f"{p}.skip_connection", cout, cin, 1, dtype)


def _spatial_transformer(t: Tensors, p: str, c: int, context: int, depth: int, linear: bool, dtype: str) -> None:
    _norm(t, f"{p}.norm", c, dtype)
    proj = [c, c] if linear else [c, c, 1, 1]  # SD1.x projects with 1x1 convs, SD2/SDXL with linears
    for side in ("proj_in", "proj_out"):
        t[f"{p}.{side}.weight"] = (dtype, proj)
        t[f"{p}.{side}.bias"] = (dtype, [c])
    for i in range(depth):
        b = f"{p}.transformer_blocks.{i}"
        for attn, kv in (("attn1", c), ("attn2", context)):
            _linear(t, f"{b}.{attn}.to_q", c, c, dtype, bias=False)
            _linear(t, f"{b}.{attn}.to_k", c, kv, dtype, bias=False)
            _linear(t, f"{b}.{attn}.to_v", c, kv, dtype, bias=False)
            _linear(t, f"{b}.{attn}.to_out.0", c, c, dtype)
        _linear(t, f"{b}.ff.net.0.proj", 8 * c, c, dtype)  # GEGLU: two 4c halves
        _linear(t, f"{b}.ff.net.2", c, 4 * c, dtype)
        for n in (1, 2, 3):
            _norm(t, f"{b}.norm{n}", c, dtype)


def _unet(
    p: str,
    *,
    mult: tuple[int, ...],
    depths: tuple[int, ...],
    mid_depth: int,
    context: int,
    linear: bool,
    adm: int | None,
    dtype: str,
    in_channels: int = 4,
    mc: int = 320,
) -> Tensors:
    """An openaimodel UNet with model_channels ``mc`` and 2 res blocks a level, in ComfyUI's names."""
    t: Tensors = {}
    emb = 4 * mc
    _linear(t, f"{p}time_embed.0", emb, mc, dtype)
    _linear(t, f"{p}time_embed.2", emb, emb, dtype)
    if adm is not None:
        _linear(t, f"{p}label_emb.0.0", emb, adm, dtype)
        _linear(t, f"{p}label_emb.0.2", emb, emb, dtype)
    _conv(t, f"{p}input_blocks.0.0", mc, in_channels, 3, dtype)
    skips, ch, n = [mc], mc, 1
    for level, (m, depth) in enumerate(zip(mult, depths, strict=True)):
        for _ in range(2):
            _res_block(t, f"{p}input_blocks.{n}.0", ch, mc * m, emb, dtype)
            ch = mc * m
            if depth:
                _spatial_transformer(t, f"{p}input_blocks.{n}.1", ch, context, depth, linear, dtype)
            skips.append(ch)
            n += 1
        if level < len(mult) - 1:
            _conv(t, f"{p}input_blocks.{n}.0.op", ch, ch, 3, dtype)
            skips.append(ch)
            n += 1
    _res_block(t, f"{p}middle_block.0", ch, ch, emb, dtype)
    _spatial_transformer(t, f"{p}middle_block.1", ch, context, mid_depth, linear, dtype)
    _res_block(t, f"{p}middle_block.2", ch, ch, emb, dtype)
    n = 0
    for level in reversed(range(len(mult))):
        for i in range(3):
            _res_block(t, f"{p}output_blocks.{n}.0", ch + skips.pop(), mc * mult[level], emb, dtype)
            ch, k = mc * mult[level], 1
            if depths[level]:
                _spatial_transformer(t, f"{p}output_blocks.{n}.1", ch, context, depths[level], linear, dtype)
                k = 2
            if level and i == 2:
                _conv(t, f"{p}output_blocks.{n}.{k}.conv", ch, ch, 3, dtype)
            n += 1
    _norm(t, f"{p}out.0", ch, dtype)
    _conv(t, f"{p}out.2", 4, ch, 3, dtype)
    return t


def _vae(p: str, latent: int, dtype: str, quant_conv: bool) -> Tensors:
    """A spread of the KL autoencoder's tensors (4 latent channels for SD/SDXL, 16 for SD3/FLUX)."""
    t: Tensors = {}
    _conv(t, f"{p}encoder.conv_in", 128, 3, 3, dtype)
    for level, (cin, cout) in enumerate(((128, 128), (128, 256), (256, 512), (512, 512))):
        block = f"{p}encoder.down.{level}.block.0"
        _norm(t, f"{block}.norm1", cin, dtype)
        _conv(t, f"{block}.conv1", cout, cin, 3, dtype)
        _conv(t, f"{block}.conv2", cout, cout, 3, dtype)
        if cin != cout:
            _conv(t, f"{block}.nin_shortcut", cout, cin, 1, dtype)
    for q in ("q", "k", "v", "proj_out"):
        _conv(t, f"{p}encoder.mid.attn_1.{q}", 512, 512, 1, dtype)
    _conv(t, f"{p}encoder.conv_out", 2 * latent, 512, 3, dtype)
    if quant_conv:
        _conv(t, f"{p}quant_conv", 2 * latent, 2 * latent, 1, dtype)
        _conv(t, f"{p}post_quant_conv", latent, latent, 1, dtype)
    _conv(t, f"{p}decoder.conv_in", 512, latent, 3, dtype)
    for q in ("q", "k", "v", "proj_out"):
        _conv(t, f"{p}decoder.mid.attn_1.{q}", 512, 512, 1, dtype)
    for level, (cin, cout) in enumerate(((256, 128), (512, 256), (512, 512), (512, 512))):
        block = f"{p}decoder.up.{level}.block.0"
        _conv(t, f"{block}.conv1", cout, cin, 3, dtype)
        _conv(t, f"{block}.conv2", cout, cout, 3, dtype)
        if cin != cout:
            _conv(t, f"{block}.nin_shortcut", cout, cin, 1, dtype)
    _norm(t, f"{p}decoder.norm_out", 128, dtype)
    _conv(t, f"{p}decoder.conv_out", 3, 128, 3, dtype)
    return t


def _hf_clip(p: str, width: int, layers: int, dtype: str, projection: bool = False) -> Tensors:
    """A Hugging Face CLIPTextModel under ``p`` (``...transformer.text_model.``)."""
    t: Tensors = {
        f"{p}embeddings.token_embedding.weight": (dtype, [49408, width]),
        f"{p}embeddings.position_embedding.weight": (dtype, [77, width]),
    }
    for i in range(layers):
        layer = f"{p}encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            _linear(t, f"{layer}.self_attn.{proj}", width, width, dtype)
        _norm(t, f"{layer}.layer_norm1", width, dtype)
        _norm(t, f"{layer}.layer_norm2", width, dtype)
        _linear(t, f"{layer}.mlp.fc1", 4 * width, width, dtype)
        _linear(t, f"{layer}.mlp.fc2", width, 4 * width, dtype)
    _norm(t, f"{p}final_layer_norm", width, dtype)
    if projection:
        t[f"{p.removesuffix('text_model.')}text_projection.weight"] = (dtype, [width, width])
    return t


def _open_clip(p: str, width: int, layers: int, dtype: str) -> Tensors:
    """An OpenCLIP text tower under ``p`` (SD2's ``cond_stage_model.model.``, SDXL's bigG)."""
    t: Tensors = {
        f"{p}token_embedding.weight": (dtype, [49408, width]),
        f"{p}positional_embedding": (dtype, [77, width]),
        f"{p}text_projection": (dtype, [width, width]),
    }
    for i in range(layers):
        block = f"{p}transformer.resblocks.{i}"
        t[f"{block}.attn.in_proj_weight"] = (dtype, [3 * width, width])
        t[f"{block}.attn.in_proj_bias"] = (dtype, [3 * width])
        _linear(t, f"{block}.attn.out_proj", width, width, dtype)
        _norm(t, f"{block}.ln_1", width, dtype)
        _norm(t, f"{block}.ln_2", width, dtype)
        _linear(t, f"{block}.mlp.c_fc", 4 * width, width, dtype)
        _linear(t, f"{block}.mlp.c_proj", width, 4 * width, dtype)
    _norm(t, f"{p}ln_final", width, dtype)
    return t


def _t5xxl(p: str, dtype: str, blocks: int = 4) -> Tensors:
    """A spread of T5-XXL encoder tensors under ``p`` (``text_encoders.t5xxl.transformer.``)."""
    t: Tensors = {f"{p}shared.weight": (dtype, [32128, 4096])}
    for i in range(blocks):
        block = f"{p}encoder.block.{i}.layer"
        for q in ("q", "k", "v", "o"):
            t[f"{block}.0.SelfAttention.{q}.weight"] = (dtype, [4096, 4096])
        t[f"{block}.0.layer_norm.weight"] = (dtype, [4096])
        t[f"{block}.1.DenseReluDense.wi_0.weight"] = (dtype, [10240, 4096])
        t[f"{block}.1.DenseReluDense.wi_1.weight"] = (dtype, [10240, 4096])
        t[f"{block}.1.DenseReluDense.wo.weight"] = (dtype, [4096, 10240])
        t[f"{block}.1.layer_norm.weight"] = (dtype, [4096])
    t[f"{p}encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = (dtype, [32, 64])
    t[f"{p}encoder.final_layer_norm.weight"] = (dtype, [4096])
    return t


# --- families --------------------------------------------------------------------------------


def sd15(prefix: str = CHECKPOINT, dtype: str = "F16", in_channels: int = 4) -> Tensors:
    """Stable Diffusion 1.5 (v1-5-pruned-emaonly): context 768, conv projections."""
    t = _unet(prefix, mult=(1, 2, 4, 4), depths=(1, 1, 1, 0), mid_depth=1, context=768, linear=False, adm=None,
              dtype=dtype, in_channels=in_channels)  # fmt: skip
    if prefix:
        t |= _vae("first_stage_model.", 4, dtype, quant_conv=True)
        t |= _hf_clip("cond_stage_model.transformer.text_model.", 768, 12, dtype)
        t["alphas_cumprod"] = ("F32", [1000])
    return t


def sd2(prefix: str = CHECKPOINT, dtype: str = "F16") -> Tensors:
    """Stable Diffusion 2.1 (v2-1_768-ema-pruned): context 1024 from OpenCLIP ViT-H, linear projections."""
    t = _unet(prefix, mult=(1, 2, 4, 4), depths=(1, 1, 1, 0), mid_depth=1, context=1024, linear=True, adm=None,
              dtype=dtype)  # fmt: skip
    if prefix:
        t |= _vae("first_stage_model.", 4, dtype, quant_conv=True)
        t |= _open_clip("cond_stage_model.model.", 1024, 24, dtype)
    return t


def sdxl(prefix: str = CHECKPOINT, dtype: str = "F16") -> Tensors:
    """SDXL base 1.0: 3 levels with 0/2/10 transformer blocks, context 2048, label_emb of 2816."""
    t = _unet(prefix, mult=(1, 2, 4), depths=(0, 2, 10), mid_depth=10, context=2048, linear=True, adm=2816,
              dtype=dtype)  # fmt: skip
    if prefix:
        t |= _vae("first_stage_model.", 4, dtype, quant_conv=True)
        t |= _hf_clip("conditioner.embedders.0.transformer.text_model.", 768, 12, dtype)
        t |= _open_clip("conditioner.embedders.1.model.", 1280, 32, dtype)
    return t


def sdxl_diffusers_unet(dtype: str = "F16") -> Tensors:
    """A spread of an SDXL UNet in diffusers' names (ByteDance's sdxl_lightning_4step_unet.safetensors)."""
    t: Tensors = {}
    _conv(t, "conv_in", 320, 4, 3, dtype)
    _linear(t, "time_embedding.linear_1", 1280, 320, dtype)
    _linear(t, "add_embedding.linear_1", 1280, 2816, dtype)
    _linear(t, "add_embedding.linear_2", 1280, 1280, dtype)
    for block, c, attentions, depth in (("down_blocks.1", 640, 2, 2), ("down_blocks.2", 1280, 2, 10),
                                        ("mid_block", 1280, 1, 10), ("up_blocks.0", 1280, 3, 10)):  # fmt: skip
        for a in range(attentions):
            _spatial_transformer(t, f"{block}.attentions.{a}", c, 2048, depth, True, dtype)
    _norm(t, "conv_norm_out", 320, dtype)
    _conv(t, "conv_out", 4, 320, 3, dtype)
    return t


def sdxl_refiner(prefix: str = CHECKPOINT, dtype: str = "F16") -> Tensors:
    """SDXL refiner 1.0: 384 channels, context 1280 (bigG only), label_emb of 2560; not a family."""
    t = _unet(prefix, mult=(1, 2, 4, 4), depths=(0, 4, 4, 0), mid_depth=4, context=1280, linear=True, adm=2560,
              dtype=dtype, mc=384)  # fmt: skip
    if prefix:
        t |= _vae("first_stage_model.", 4, dtype, quant_conv=True)
        t |= _open_clip("conditioner.embedders.0.model.", 1280, 32, dtype)
    return t


def flux1(dev: bool, prefix: str = BARE, dtype: str = "BF16") -> Tensors:
    """FLUX.1 [dev] or [schnell]: 19 double and 38 single blocks, hidden 3072; dev has guidance_in."""
    p, h = prefix, 3072
    t: Tensors = {}
    _linear(t, f"{p}img_in", h, 64, dtype)
    _linear(t, f"{p}txt_in", h, 4096, dtype)
    for embedder, width in (("time_in", 256), ("vector_in", 768)) + ((("guidance_in", 256),) if dev else ()):
        _linear(t, f"{p}{embedder}.in_layer", h, width, dtype)
        _linear(t, f"{p}{embedder}.out_layer", h, h, dtype)
    for i in range(19):
        for stream in ("img", "txt"):
            b = f"{p}double_blocks.{i}.{stream}"
            _linear(t, f"{b}_mod.lin", 6 * h, h, dtype)
            _linear(t, f"{b}_attn.qkv", 3 * h, h, dtype)
            t[f"{b}_attn.norm.query_norm.scale"] = (dtype, [128])
            t[f"{b}_attn.norm.key_norm.scale"] = (dtype, [128])
            _linear(t, f"{b}_attn.proj", h, h, dtype)
            _linear(t, f"{b}_mlp.0", 4 * h, h, dtype)
            _linear(t, f"{b}_mlp.2", h, 4 * h, dtype)
    for i in range(38):
        b = f"{p}single_blocks.{i}"
        _linear(t, f"{b}.linear1", 3 * h + 4 * h, h, dtype)
        _linear(t, f"{b}.linear2", h, h + 4 * h, dtype)
        t[f"{b}.norm.query_norm.scale"] = (dtype, [128])
        t[f"{b}.norm.key_norm.scale"] = (dtype, [128])
        _linear(t, f"{b}.modulation.lin", 3 * h, h, dtype)
    _linear(t, f"{p}final_layer.linear", 64, h, dtype)
    _linear(t, f"{p}final_layer.adaLN_modulation.1", 2 * h, h, dtype)
    if prefix:  # Comfy-Org's all-in-one checkpoints: fp8 weights, bf16 VAE, vae./text_encoders. prefixes
        t |= _vae("vae.", 16, "BF16", quant_conv=False)
        t |= _hf_clip("text_encoders.clip_l.transformer.text_model.", 768, 12, dtype)
        t |= _t5xxl("text_encoders.t5xxl.transformer.", dtype)
    return t


def sd35(large: bool, prefix: str = BARE, dtype: str = "BF16") -> Tensors:
    """SD3.5 Large (38 joint blocks, hidden 2432) or Medium (24, hidden 1536, attn2 in blocks 0-12)."""
    p = prefix
    depth = 38 if large else 24
    h = 64 * depth
    attn2 = set() if large else set(range(13))
    t: Tensors = {
        f"{p}pos_embed": (dtype, [1, 192 * 192 if large else 384 * 384, h]),
    }
    _conv(t, f"{p}x_embedder.proj", h, 16, 2, dtype)
    _linear(t, f"{p}context_embedder", h, 4096, dtype)
    _linear(t, f"{p}t_embedder.mlp.0", h, 256, dtype)
    _linear(t, f"{p}t_embedder.mlp.2", h, h, dtype)
    _linear(t, f"{p}y_embedder.mlp.0", h, 2048, dtype)
    _linear(t, f"{p}y_embedder.mlp.2", h, h, dtype)
    for i in range(depth):
        _mmdit_block(t, f"{p}joint_blocks.{i}.x_block", h, dtype, pre_only=False, attn2=i in attn2)
        _mmdit_block(t, f"{p}joint_blocks.{i}.context_block", h, dtype, pre_only=i == depth - 1, attn2=False)
    _linear(t, f"{p}final_layer.linear", 2 * 2 * 16, h, dtype)
    _linear(t, f"{p}final_layer.adaLN_modulation.1", 2 * h, h, dtype)
    if prefix:  # sd3.5_*_fp8_scaled-style all-in-one checkpoints
        t |= _vae("first_stage_model.", 16, dtype, quant_conv=False)
        t |= _hf_clip("text_encoders.clip_l.transformer.text_model.", 768, 12, dtype, projection=True)
        t |= _hf_clip("text_encoders.clip_g.transformer.text_model.", 1280, 32, dtype, projection=True)
        t |= _t5xxl("text_encoders.t5xxl.transformer.", dtype)
    return t


def _mmdit_block(t: Tensors, b: str, h: int, dtype: str, *, pre_only: bool, attn2: bool) -> None:
    """One side of an MMDiT joint block; the last context block only modulates (pre_only)."""
    attns = ("attn", "attn2") if attn2 else ("attn",)
    for attn in attns:
        _linear(t, f"{b}.{attn}.qkv", 3 * h, h, dtype)
        t[f"{b}.{attn}.ln_q.weight"] = (dtype, [64])
        t[f"{b}.{attn}.ln_k.weight"] = (dtype, [64])
        if not pre_only:
            _linear(t, f"{b}.{attn}.proj", h, h, dtype)
    modulations = 2 if pre_only else 9 if attn2 else 6
    _linear(t, f"{b}.adaLN_modulation.1", modulations * h, h, dtype)
    if not pre_only:
        _linear(t, f"{b}.mlp.fc1", 4 * h, h, dtype)
        _linear(t, f"{b}.mlp.fc2", h, 4 * h, dtype)


def sd15_controlnet(dtype: str = "F16") -> Tensors:
    """An SD1.5 ControlNet (control_v11p_sd15_canny): the UNet's encoder half, no output blocks."""
    unet = sd15(BARE, dtype)
    t = {name: v for name, v in unet.items() if name.startswith(("input_blocks.", "middle_block.", "time_embed."))}
    _conv(t, "input_hint_block.0", 16, 3, 3, dtype)
    for i in range(12):
        _conv(t, f"zero_convs.{i}.0", 320, 320, 1, dtype)
    _conv(t, "middle_block_out.0", 1280, 1280, 1, dtype)
    return t


def sdxl_lora(dtype: str = "F16") -> Tensors:
    """A kohya SDXL LoRA: lora_unet_* down/up pairs and alphas."""
    t: Tensors = {}
    for block in ("input_blocks_4_1_transformer_blocks_0_attn2_to_k", "middle_block_1_transformer_blocks_0_attn1_to_q"):
        t[f"lora_unet_{block}.lora_down.weight"] = (dtype, [16, 1280])
        t[f"lora_unet_{block}.lora_up.weight"] = (dtype, [1280, 16])
        t[f"lora_unet_{block}.alpha"] = (dtype, [])
    return t


def esrgan_upscaler(dtype: str = "F32") -> Tensors:
    """A spread of an ESRGAN 4x upscaler's tensors (RealESRGAN_x4plus as safetensors)."""
    t: Tensors = {}
    _conv(t, "conv_first", 64, 3, 3, dtype)
    for i in range(3):
        _conv(t, f"body.{i}.rdb1.conv1", 32, 64, 3, dtype)
    _conv(t, "conv_last", 3, 64, 3, dtype)
    return t
