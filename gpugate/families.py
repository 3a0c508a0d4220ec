"""Tell a diffusion checkpoint's model family from its safetensors header, never its weights.

A safetensors file starts with an 8-byte little-endian header length, then that many bytes of JSON:
``{tensor_name: {"dtype", "shape", "data_offsets"}, "__metadata__": {str: str}}``. Tensor names and
shapes say which architecture the weights are for, so ``detect`` reads only those bytes (a few
hundred KiB for a 24 GB FLUX file) and never touches the data region.

Both layouts ComfyUI loads are handled: full checkpoints (models/checkpoints), whose diffusion
model is under ``model.diffusion_model.`` beside ``first_stage_model.`` (VAE) and the text
encoders, and bare diffusion models (models/diffusion_models, models/unet), with no prefix.

Architecture signals (the keys ComfyUI's comfy/model_detection.py reads):

- UNet (SD1.x/2.x/XL): ``input_blocks.0.0.weight`` (conv_in) and ``out.2.weight`` (conv_out; a
  ControlNet has the former but not the latter). The cross-attention context width, shape[1] of
  every ``attn2.to_k.weight``, is 768 for SD1.5 and 1024 for SD2; SDXL is 2048 with a
  ``label_emb.0.0.weight`` of 2816 inputs. A bare UNet in diffusers' names (``conv_in.weight``,
  ``conv_out.weight``, ``add_embedding.linear_1.weight``) is read the same way. Only 4 latent input channels count: inpainting (9) and
  instruct-pix2pix (8) models are not plain text-to-image models of their family, so they are None,
  as are the SDXL refiner (context 1280) and SD2 unCLIP (a label_emb without SDXL's shape).
- FLUX.1: ``double_blocks.0.img_attn.qkv.weight`` with ``img_in.weight`` taking 64 inputs (Fill,
  Depth and Canny concatenate extra channels: None), ``vector_in`` (Chroma and FLUX.2 lack it:
  None), ``single_blocks`` and ``final_layer``. ``guidance_in.in_layer.weight`` (the distilled
  guidance embedding) makes it dev, its absence schnell. Kontext has dev's shapes, so it is dev.
- SD3.x MMDiT: ``joint_blocks.0.x_block.attn.qkv.weight`` and ``final_layer``; 24 joint blocks with
  ``x_block.attn2`` (MMDiT-X) is SD3.5 Medium, 38 is SD3.5 Large. SD3.0 Medium (24 blocks, no
  attn2) is not in ``Family``: None.

Few-step variants cannot be told from shapes: SDXL Lightning/Turbo/Hyper and SD3.5 Large Turbo have
exactly their base's tensors. So once the architecture is SDXL or SD3.5 Large, a word decides:
first the string values of ``__metadata__`` (modelspec.title, modelspec.description, ...; keys about
training data, tags, captions, prompts or comments are skipped, as they name image subjects), then,
only if the metadata says nothing, the file name. Words, case-insensitive and matched inside
CamelCase names ("juggernautXL_v9Rdphoto2Lightning"), checked in this order:

- "lightning" -> SDXL_LIGHTNING, SD35_LARGE_TURBO
- "hyper" (Hyper-SD; not "hyperreal..."/"hyperdetail..."/"hyperphoto...") -> SDXL_LIGHTNING (same
  regime: a handful of steps, CFG 1), SD35_LARGE_TURBO
- "turbo" -> SDXL_TURBO, SD35_LARGE_TURBO

SD1.5, SD2, SD3.5 Medium and FLUX have no few-step member in ``Family`` and are never refined.

``detect`` never raises for a file it cannot classify: other suffixes (.ckpt, .pth, .pt, .bin,
.gguf) are None without being opened; unreadable, truncated or malformed files, LoRAs, upscalers,
VAEs and text encoders are None. ``read_header`` is the strict part: it raises ``ValueError``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Final


class Family(StrEnum):
    """A diffusion model family: what decides which workflow and sampler settings a model needs."""

    SD15 = "sd15"
    SD2 = "sd2"
    SDXL = "sdxl"
    SDXL_LIGHTNING = "sdxl-lightning"
    SDXL_TURBO = "sdxl-turbo"
    FLUX1_SCHNELL = "flux1-schnell"
    FLUX1_DEV = "flux1-dev"
    SD35_MEDIUM = "sd35-medium"
    SD35_LARGE = "sd35-large"
    SD35_LARGE_TURBO = "sd35-large-turbo"


SAFETENSORS_SUFFIXES: Final = frozenset({".safetensors", ".sft"})  # .sft: BFL's first FLUX files
DEFAULT_HEADER_LIMIT: Final = 100 * 2**20  # what the safetensors library itself accepts
METADATA_KEY: Final = "__metadata__"
CHECKPOINT_PREFIX: Final = "model.diffusion_model."

Shapes = dict[str, tuple[int, ...]]


# --- reading ---------------------------------------------------------------------------------


def read_header(path: Path, limit: int = DEFAULT_HEADER_LIMIT) -> dict[str, Any]:
    """Return the parsed JSON header of the safetensors file at ``path``, reading nothing else.

    Raises ``ValueError`` when the file is not safetensors: shorter than the 8-byte length, a
    header length under 2 or over ``limit`` or past the end of the file, a header that is not a
    UTF-8 JSON object, a tensor entry without a dtype, shape or valid data_offsets, or a tensor
    whose data would end past the end of the file (a truncated download). ``OSError`` passes
    through (missing file, no permission, a directory).
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        length = _header_length(f.read(8), size, limit, path)
        raw = f.read(length)
    if len(raw) != length:
        raise ValueError(f"{path}: not safetensors: the file ends inside its {length}-byte header")
    header = _parse_object(raw, path)
    _check_entries(header, size - 8 - length, path)
    return header


def _header_length(prefix: bytes, size: int, limit: int, path: Path) -> int:
    """Decode and sanity-check the 8-byte little-endian header length."""
    if len(prefix) < 8:
        raise ValueError(f"{path}: not safetensors: {size} bytes is too short for a header length")
    length = int.from_bytes(prefix, "little")
    if length < 2:
        raise ValueError(f"{path}: not safetensors: header length {length} is too small for JSON")
    if length > limit:
        raise ValueError(f"{path}: not safetensors: header length {length} exceeds limit {limit}")
    if length > size - 8:
        raise ValueError(
            f"{path}: not safetensors: header length {length} runs past the end of the file "
            f"({size - 8} bytes follow the length)"
        )
    return length


def _parse_object(raw: bytes, path: Path) -> dict[str, Any]:
    """Parse the header bytes as a JSON object."""
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not safetensors: the header is not UTF-8 JSON ({e})") from None
    if not isinstance(header, dict):
        kind = type(header).__name__  # ValueError, not TypeError: the file's content is wrong
        raise ValueError(f"{path}: not safetensors: the header is {kind}, not an object")  # noqa: TRY004
    return header


def _check_entries(header: Mapping[str, Any], data_len: int, path: Path) -> None:
    """Check every tensor entry is well formed and its data lies inside the file."""
    meta = header.get(METADATA_KEY)
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"{path}: not safetensors: {METADATA_KEY} is not an object")
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        problem = _entry_problem(entry, data_len)
        if problem:
            raise ValueError(f"{path}: not safetensors: tensor {name!r}: {problem}")


def _entry_problem(entry: object, data_len: int) -> str | None:
    """What is wrong with one tensor entry, or None."""
    if not isinstance(entry, dict):
        return "entry is not an object"
    if not isinstance(entry.get("dtype"), str):
        return "no dtype"
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        return "shape is not a list of non-negative integers"
    offsets = entry.get("data_offsets")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        return "data_offsets is not [begin, end]"
    begin, end = offsets
    if begin > end:
        return f"data_offsets {offsets} run backwards"
    if end > data_len:
        return f"data ends at byte {end} but the file holds {data_len} bytes of data (truncated?)"
    return None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


# --- classifying -----------------------------------------------------------------------------


def detect(path: Path) -> Family | None:
    """The family of the model file at ``path``, or None when it is not one ``Family`` names.

    Reads only the safetensors header; never raises for unknown, foreign or broken files.
    """
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return None
    try:
        header = read_header(path)
    except (OSError, ValueError):
        return None
    return classify_header(header, path.name)


def classify_header(header: Mapping[str, Any], filename: str = "") -> Family | None:
    """The family a parsed safetensors header describes; ``filename`` breaks few-step ties."""
    base = _architecture(diffusion_shapes(header))
    if base is None:
        return None
    return _few_step(base, _metadata_texts(header), filename)


def diffusion_shapes(header: Mapping[str, Any]) -> Shapes:
    """Tensor shapes of the diffusion model, with a full checkpoint's prefix stripped.

    A header with any ``model.diffusion_model.`` key is a full checkpoint and only those keys are
    kept; otherwise every tensor is taken as part of a bare diffusion model.
    """
    shapes = {
        name: tuple(entry["shape"])
        for name, entry in header.items()
        if name != METADATA_KEY and isinstance(entry, dict) and isinstance(entry.get("shape"), list)
    }
    if any(name.startswith(CHECKPOINT_PREFIX) for name in shapes):
        cut = len(CHECKPOINT_PREFIX)
        return {name[cut:]: shape for name, shape in shapes.items() if name.startswith(CHECKPOINT_PREFIX)}
    return shapes


def _architecture(s: Shapes) -> Family | None:
    """The base family from diffusion-model tensor shapes alone."""
    for probe in (_flux, _mmdit, _unet):
        family = probe(s)
        if family is not None:
            return family
    return None


# (conv_in, conv_out, class/size embedding): the LDM names ComfyUI uses, then diffusers' (for
# instance ByteDance's sdxl_lightning_*_unet.safetensors, loadable with ComfyUI's UNETLoader).
_UNET_NAMES: Final = (
    ("input_blocks.0.0.weight", "out.2.weight", "label_emb.0.0.weight"),
    ("conv_in.weight", "conv_out.weight", "add_embedding.linear_1.weight"),
)


def _unet(s: Shapes) -> Family | None:
    """SD1.5, SD2 or SDXL from a latent-diffusion UNet's tensors."""
    names = next((names for names in _UNET_NAMES if names[0] in s), None)
    if names is None:
        return None
    conv_in, conv_out = s[names[0]], s.get(names[1])
    if conv_out is None or len(conv_in) != 4 or conv_in[1] != 4 or conv_out[0] != 4:
        return None
    context = _context_dim(s)
    label_emb = s.get(names[2])
    if label_emb is None:
        return {768: Family.SD15, 1024: Family.SD2}.get(context) if context else None
    if context == 2048 and label_emb[-1:] == (2816,):
        return Family.SDXL
    return None


def _context_dim(s: Shapes) -> int | None:
    """The cross-attention context width all ``attn2.to_k`` agree on, or None."""
    widths = {shape[1] for name, shape in s.items() if name.endswith(".attn2.to_k.weight") and len(shape) == 2}
    return widths.pop() if len(widths) == 1 else None


def _flux(s: Shapes) -> Family | None:
    """FLUX.1 dev or schnell from a FLUX transformer's tensors."""
    if "double_blocks.0.img_attn.qkv.weight" not in s:
        return None
    img_in = s.get("img_in.weight")
    required = ("vector_in.in_layer.weight", "single_blocks.0.linear1.weight", "final_layer.linear.weight")
    if img_in is None or img_in[-1:] != (64,) or not all(key in s for key in required):
        return None
    return Family.FLUX1_DEV if "guidance_in.in_layer.weight" in s else Family.FLUX1_SCHNELL


def _mmdit(s: Shapes) -> Family | None:
    """SD3.5 Medium or Large from an MMDiT's tensors."""
    if "joint_blocks.0.x_block.attn.qkv.weight" not in s or "final_layer.linear.weight" not in s:
        return None
    depth = _count_blocks(s, "joint_blocks.")
    has_attn2 = any(name.startswith("joint_blocks.") and ".x_block.attn2." in name for name in s)
    if depth == 24 and has_attn2:
        return Family.SD35_MEDIUM
    if depth == 38 and not has_attn2:
        return Family.SD35_LARGE
    return None


def _count_blocks(s: Shapes, prefix: str) -> int:
    """How many distinct numbered blocks ``prefix<N>.`` there are."""
    indices = {name[len(prefix) :].split(".", 1)[0] for name in s if name.startswith(prefix)}
    return sum(1 for index in indices if index.isdigit())


# --- few-step variants -----------------------------------------------------------------------

_LIGHTNING = re.compile(r"lightning", re.IGNORECASE)
_HYPER = re.compile(r"hyper(?![-_ ]?(?:real|detail|photo))", re.IGNORECASE)
_TURBO = re.compile(r"turbo", re.IGNORECASE)

_VARIANTS: Final[dict[Family, tuple[tuple[re.Pattern[str], Family], ...]]] = {
    Family.SDXL: (
        (_LIGHTNING, Family.SDXL_LIGHTNING),
        (_HYPER, Family.SDXL_LIGHTNING),
        (_TURBO, Family.SDXL_TURBO),
    ),
    Family.SD35_LARGE: (
        (_LIGHTNING, Family.SD35_LARGE_TURBO),
        (_HYPER, Family.SD35_LARGE_TURBO),
        (_TURBO, Family.SD35_LARGE_TURBO),
    ),
}

# Metadata keys (substrings, lowercase) that describe training data or images, not the model.
_SUBJECT_KEYS: Final = ("tag", "dataset", "bucket", "caption", "prompt", "comment", "trigger")


def _metadata_texts(header: Mapping[str, Any]) -> list[str]:
    """The string values of ``__metadata__`` that may name the model."""
    meta = header.get(METADATA_KEY)
    if not isinstance(meta, dict):
        return []
    return [
        value
        for key, value in meta.items()
        if isinstance(value, str) and not any(word in str(key).lower() for word in _SUBJECT_KEYS)
    ]


def _few_step(base: Family, metadata: Iterable[str], filename: str) -> Family:
    """Refine ``base`` to a few-step variant from the metadata, else the file name."""
    variants = _VARIANTS.get(base)
    if not variants:
        return base
    for texts in (list(metadata), [filename]):
        for pattern, variant in variants:
            if any(pattern.search(text) for text in texts):
                return variant
    return base


# --- caching ---------------------------------------------------------------------------------


class FamilyCache:
    """Remembers ``detect`` results by (path, size, mtime_ns), for cheap inventory refreshes.

    A file is re-read only when its size or modification time changed (or it is new); a file that
    can no longer be stat'ed is forgotten and is None. Not thread-safe: one per event loop/thread.
    """

    def __init__(self, detector: Callable[[Path], Family | None] | None = None) -> None:
        self._detector = detector or detect
        self._entries: dict[Path, tuple[tuple[int, int], Family | None]] = {}

    def family(self, path: Path) -> Family | None:
        """The family of ``path``, from the cache when the file is unchanged since last time."""
        path = Path(path)
        try:
            st = os.stat(path)
        except OSError:
            self._entries.pop(path, None)
            return None
        stamp = (st.st_size, st.st_mtime_ns)
        cached = self._entries.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        family = self._detector(path)
        self._entries[path] = (stamp, family)  # stamped before reading: a later write re-detects
        return family

    def retain(self, paths: Iterable[Path]) -> None:
        """Forget every path not in ``paths`` (the files the latest inventory still has)."""
        keep = {Path(p) for p in paths}
        for path in [p for p in self._entries if p not in keep]:
            del self._entries[path]

    def __len__(self) -> int:
        return len(self._entries)
