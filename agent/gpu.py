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
SHARED_RUNNERS = ("speech", "media")  # loaded once per host: on the first GPU's worker only


def plan_workers(settings: Settings, devices: list[Device], host: str) -> list[Settings]:
    """The workers this agent runs (pure): one per GPU when there are several and ``per_gpu`` is on,
    each named ``<name>-gpu<index>``, pinned to its GPU, with its own ComfyUI folder; speech and
    media run on the first one only. Otherwise the agent itself is the one worker."""
    if not settings.agent.per_gpu or settings.agent.gpu is not None or len(devices) < 2:
        return [settings]
    name = settings.agent.name or host
    workers = []
    for position, device in enumerate(devices):
        runners = settings.agent.runners if position == 0 else tuple(r for r in settings.agent.runners
                                                                       if r not in SHARED_RUNNERS)
        if runners:
            agent = settings.agent.model_copy(update={"name": f"{name}-gpu{device.index}", "gpu": device.index,
                                                      "runners": runners})
            workers.append(settings.model_copy(update={"agent": agent}))
    return workers


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
    """(cpu_only, devices) as the agent reports them now; a worker pinned to one GPU reports only it."""
    override = settings.agent.gpus
    if override is not None:
        devices = [Device(index=i, name=g.name, vram_total=int(g.vram_total_gb * GB), vram_free=int(g.vram_free_gb * GB))
                   for i, g in enumerate(override)]
    else:
        devices = [Device(index=g.index, name=g.name, vram_total=g.vram_total, vram_free=g.vram_free) for g in list_gpus()]
    if devices:
        return False, [d for d in devices if settings.agent.gpu in (None, d.index)]
    memory = psutil.virtual_memory()
    return True, [Device(index=-1, name="cpu", vram_total=memory.total, vram_free=memory.available)]
