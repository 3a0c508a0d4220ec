"""Workflows as capabilities: each workflow template is one, run through the ComfyEngine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpugate.errors import WorkerLost
from gpugate.wire import Capability, Model

from ..comfy.client import Progress
from ..comfy.engine import ComfyEngine
from ..comfy.workflows import ParamType, Workflow
from . import JobProgress, OutputFile, RunResult

GB = 1024**3
LOADED_KEPT = 2  # models ComfyUI is assumed to still hold: the ones the last jobs used
MODELS_WAIT_S = 5.0  # for ComfyUI's model lists


class ComfyRunner:
    """The workflows, offered while ComfyUI is ready: while it restarts (after a crash, or a kill
    for not answering) the agent withdraws them and keeps serving its other runners."""

    def __init__(self, engine: ComfyEngine) -> None:
        self.engine = engine
        self._recent: list[str] = []
        self._restarts = 0
        self._models: list[Model] = []

    def capabilities(self) -> list[Capability]:
        if not self.engine.ready:
            return []
        workflows, _ = self.engine.library.scan()
        return [_capability(wf) for wf in workflows]

    async def models(self) -> list[Model]:
        """ComfyUI's models; while it is down or slow to answer, the last list it gave (the agent's
        heartbeat waits for this, and must not wait long)."""
        if self.engine.ready:
            try:
                found = await asyncio.wait_for(self.engine.models(), MODELS_WAIT_S)
                self._models = [Model(kind=m.kind, name=m.name, size=m.size) for m in found]
            except (WorkerLost, TimeoutError):  # it went down meanwhile, or is busy: next time
                pass
        return list(self._models)

    def loaded(self) -> list[str]:
        """Models the last jobs used, forgotten when ComfyUI restarts (it starts empty)."""
        restarts = self.engine.process.restarts if self.engine.process else 0
        if restarts != self._restarts:
            self._restarts, self._recent = restarts, []
        return list(self._recent)

    async def run(self, capability: str, job_id: str, params: dict[str, Any],
                  on_progress: Callable[[JobProgress], None]) -> RunResult:
        def progress(p: Progress) -> None:
            on_progress(JobProgress(p.step, p.total, p.node_type))

        images = {k: await asyncio.to_thread(v.read_bytes) for k, v in params.items() if isinstance(v, Path)}  # small
        outputs = await self.engine.run(capability, {**params, **images}, job_id=job_id, on_progress=progress)
        template = self.engine.library.get(capability)
        self._remember([str(params[n]) for n, s in template.params.items() if s.type is ParamType.MODEL and n in params])
        return RunResult(files=[OutputFile(o.filename, o.media_type, o.data) for o in outputs])

    def _remember(self, models: list[str]) -> None:
        self.loaded()  # drop the list first if ComfyUI restarted
        for model in models:
            if model in self._recent:
                self._recent.remove(model)
            self._recent.insert(0, model)
        del self._recent[LOADED_KEPT:]


def _capability(workflow: Workflow) -> Capability:
    kind = next((s.kind for s in workflow.params.values() if s.type is ParamType.MODEL), None)
    vram = workflow.vram
    return Capability(name=workflow.name, model_kind=kind,
                      vram_base=int(vram.base_gb * GB) if vram and vram.base_gb is not None else None,
                      vram_per_megapixel=int(vram.per_megapixel_gb * GB) if vram and vram.per_megapixel_gb is not None else None)
