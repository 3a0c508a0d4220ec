"""The devices this host reports to the router: NVIDIA GPUs through NVML (pynvml), else the CPU.

On a CPU-only host ComfyUI computes in RAM, so the CPU is reported as device -1 with the RAM
total and available; the settings can replace the report (``agent.gpus``) to exercise the
router's VRAM rules on machines without GPUs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import psutil

from gpugate.settings import Settings
from gpugate.wire import Device

log = logging.getLogger(__name__)
GB = 1024**3


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


def report_devices(settings: Settings) -> tuple[bool, list[Device]]:
    """(cpu_only, devices) as the agent reports them now."""
    override = settings.agent.gpus
    if override is not None:
        return False, [Device(index=i, name=g.name, vram_total=int(g.vram_total_gb * GB), vram_free=int(g.vram_free_gb * GB))
                       for i, g in enumerate(override)]
    gpus = list_gpus()
    if gpus:
        return False, [Device(index=g.index, name=g.name, vram_total=g.vram_total, vram_free=g.vram_free) for g in gpus]
    memory = psutil.virtual_memory()
    return True, [Device(index=-1, name="cpu", vram_total=memory.total, vram_free=memory.available)]
