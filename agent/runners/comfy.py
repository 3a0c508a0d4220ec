"""Workflows as capabilities: each workflow template is one, run through the ComfyEngine.

Texts a workflow's nodes show (PreviewAny) come back as the job's texts, its files as artifacts.
A model is warmed (``agent.warm_models``) by the smallest real job that loads it, so ComfyUI holds
it and the router, seeing it in ``loaded()``, sends this agent the jobs that use it first.
"""

from __future__ import annotations

import asyncio
import io
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from gpugate.errors import WorkerLost
from gpugate.families import FamilyCache
from gpugate.wire import Capability, Model, WorkflowParam

from ..comfy.client import Progress
from ..comfy.engine import ComfyEngine
from ..comfy.workflows import Combos, ParamType, Workflow
from . import JobProgress, OutputFile, RunResult

GB = 1024**3
FAMILY_KINDS = ("checkpoints", "diffusion_models", "unet")  # model files whose family the router wants
LOADED_KEPT = 2  # models ComfyUI is assumed to still hold: the ones the last jobs used
MODELS_WAIT_S = 5.0  # for ComfyUI's model lists
# model kind -> the workflow and parameters of the smallest job that loads such a model
WARM_JOBS: dict[str, tuple[str, Callable[[str], dict[str, Any]]]] = {
    "checkpoints": ("txt2img", lambda m: {"checkpoint": m, "prompt": "warm-up", "width": 64, "height": 64, "steps": 1}),
    "upscale_models": ("upscale", lambda m: {"model": m, "image": _tiny_png()}),
}


class ComfyRunner:
    """The workflows, offered while ComfyUI is ready: while it restarts (after a crash, or a kill
    for not answering) the agent withdraws them and keeps serving its other runners."""

    def __init__(self, engine: ComfyEngine) -> None:
        self.engine = engine
        self._recent: list[str] = []
        self._restarts = 0
        self._models: list[Model] = []
        self._families = FamilyCache()  # read from each file's safetensors header, once per change

    def capabilities(self) -> list[Capability]:
        if not self.engine.ready:
            return []
        workflows, _ = self.engine.library.scan()
        return [_capability(wf, self.engine.combos) for wf in workflows]

    async def models(self) -> list[Model]:
        """ComfyUI's models; while it is down or slow to answer, the last list it gave (the agent's
        heartbeat waits for this, and must not wait long)."""
        if self.engine.ready:
            try:
                found = await asyncio.wait_for(self.engine.models(), MODELS_WAIT_S)
                self._models = await asyncio.to_thread(self._with_families, found)
            except (WorkerLost, TimeoutError):  # it went down meanwhile, or is busy: next time
                pass
        return list(self._models)

    def _with_families(self, found: list[Any]) -> list[Model]:
        """ComfyUI's model list, image models with their family (header reads: run in a thread)."""
        root = self.engine.settings.paths.models_dir
        out = []
        for m in found:
            family = self._families.family(root / m.kind / m.name) if m.kind in FAMILY_KINDS else None
            out.append(Model(kind=m.kind, name=m.name, size=m.size, family=family.value if family else None))
        self._families.retain(root / m.kind / m.name for m in found)  # forget files no longer listed
        return out

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
        return RunResult(files=[OutputFile(o.filename, o.media_type, o.data) for o in outputs], texts=outputs.texts)

    async def warm(self, model: str) -> bool:
        """Load ``model`` with a tiny job (it then counts as recently used); False when ComfyUI has
        no such model. A model of a kind no job here warms is an error."""
        kind = next((m.kind for m in await self.models() if m.name == model), None)
        if kind is None:
            return False
        if kind not in WARM_JOBS:
            raise ValueError(f"cannot warm a model of kind {kind}: only {', '.join(WARM_JOBS)}")
        workflow, params = WARM_JOBS[kind]
        await self.run(workflow, f"warm-{secrets.token_hex(6)}", params(model), lambda p: None)
        return True

    def _remember(self, models: list[str]) -> None:
        self.loaded()  # drop the list first if ComfyUI restarted
        for model in models:
            if model in self._recent:
                self._recent.remove(model)
            self._recent.insert(0, model)
        del self._recent[LOADED_KEPT:]


def _capability(workflow: Workflow, combos: Combos) -> Capability:
    """A workflow as the router sees it: what it loads, its memory hint, and its declared parameters
    with the values this agent's ComfyUI accepts for choices and models."""
    kind = next((s.kind for s in workflow.params.values() if s.type is ParamType.MODEL), None)
    vram = workflow.vram
    return Capability(name=workflow.name, model_kind=kind,
                      vram_base=int(vram.base_gb * GB) if vram and vram.base_gb is not None else None,
                      vram_per_megapixel=int(vram.per_megapixel_gb * GB) if vram and vram.per_megapixel_gb is not None else None,
                      description=workflow.description, params=_declaration(workflow, combos))


def _declaration(workflow: Workflow, combos: Combos) -> dict[str, WorkflowParam]:
    out = {}
    for name, spec in workflow.params.items():
        first = spec.bind[0]
        values = spec.values
        if values is None and spec.type in (ParamType.CHOICE, ParamType.MODEL):
            values = combos(workflow.prompt[first.node]["class_type"], first.input)
        out[name] = WorkflowParam(type=spec.type.value, description=spec.description, required=spec.required,
                                  default=None if spec.type is ParamType.IMAGE else workflow.default(name),
                                  min=spec.min, max=spec.max, step=spec.step,
                                  values=list(values) if values is not None else None, kind=spec.kind)
    return out


def _tiny_png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (128, 128, 128)).save(buf, "PNG")
    return buf.getvalue()
