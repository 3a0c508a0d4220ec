"""The GPUs this host has, read through NVML (pynvml). A host without NVIDIA's driver has none."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    vram_total: int  # bytes
    vram_free: int  # bytes


def list_gpus() -> list[Gpu]:
    """Every NVIDIA GPU with its VRAM now; an empty list when NVML is absent (a CPU-only host)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError_LibraryNotFound, DriverNotLoaded, ImportError...
        log.debug("no NVIDIA GPU visible", extra={"reason": str(exc)})
        return []
    try:
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(Gpu(index, name.decode() if isinstance(name, bytes) else name, memory.total, memory.free))
        return gpus
    finally:
        pynvml.nvmlShutdown()
