"""The agent's image engine: one ComfyUI (supervised, or attached by URL) driven by workflow templates.

``run()`` is the whole life of a job on ComfyUI: validate the parameters against the template
(before anything reaches ComfyUI), upload its images, submit with the job id as prompt id, report
progress, fetch every output file (with the texts its nodes showed: ``Outputs.texts``), and leave
ComfyUI as it was (history entry, uploaded inputs and output files deleted), whether the job
succeeded or not. That cleanup runs right after the answer instead of before it (about 1 ms a job,
bench/overhead.py); the engine tracks each cleanup, a later run of the same job id waits for it,
and ``settle()`` / ``stop()`` wait for all of them.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpugate.errors import EngineUnavailable, InvalidRequest, WorkerLost
from gpugate.settings import Settings

from . import launch
from .client import ComfyClient, ProgressCallback
from .inventory import Model, list_models
from ..supervised import SupervisedServer
from .protocol import OutputRef, combo_values
from .workflows import ImageInput, ParamType, Workflow, WorkflowLibrary, render, validate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutputFile:
    """One file a job produced."""

    node_id: str
    kind: str  # the output list it came in: images, gifs, audio, latents, ...
    filename: str
    media_type: str
    data: bytes


class Outputs(list[OutputFile]):
    """A job's output files, in order, and the texts its nodes showed (PreviewAny): a list, so
    callers that only want files use it as one."""

    def __init__(self, files: list[OutputFile], texts: list[str]) -> None:
        super().__init__(files)
        self.texts = texts


class ComfyEngine:
    """Use ``async with ComfyEngine(settings) as engine: await engine.run("txt2img", {...})``."""

    def __init__(self, settings: Settings, library: WorkflowLibrary | None = None) -> None:
        self.settings = settings
        self.library = library or WorkflowLibrary(settings.workflows.dirs)
        self.library.object_info = lambda: self._object_info  # converts UI-format templates
        self.process: SupervisedServer | None = None
        self.client: ComfyClient | None = None
        self._object_info: dict[str, Any] = {}
        self._folders_seen: tuple[tuple[str, int], ...] = ()
        self._dirs: dict[str, Path] = {}  # ComfyUI's input/output/temp folders, when we can see them
        self._cleanups: dict[str, asyncio.Task[None]] = {}  # job id -> its cleanup still running

    @property
    def url(self) -> str:
        assert self.client is not None
        return self.client.base_url

    async def __aenter__(self) -> ComfyEngine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        comfy = self.settings.comfy
        if comfy.mode == "attach":
            if not comfy.url:
                raise EngineUnavailable("comfy.mode = 'attach' needs comfy.url")
            url = comfy.url
            self._dirs = {k: v for k, v in (("input", comfy.attach_input_dir), ("output", comfy.attach_output_dir)) if v}
        else:
            spec = launch.prepare(self.settings, use_cuda=self._use_cuda())
            gpu = self.settings.agent.gpu  # a per-GPU worker's ComfyUI sees only its GPU (as cuda:0)
            self.process = SupervisedServer(
                spec.command, url=spec.url, cwd=spec.cwd, env={"CUDA_VISIBLE_DEVICES": str(gpu)} if gpu is not None else None,
                startup_timeout_s=comfy.startup_timeout_s, backoff_s=comfy.restart_backoff_s,
                backoff_max_s=comfy.restart_backoff_max_s, liveness_timeout_s=comfy.liveness_timeout_s,
                liveness_every_s=comfy.liveness_every_s, on_exit=self._on_comfy_exit,
            )
            await self.process.start()
            url = spec.url
            self._dirs = {"input": spec.input_dir, "output": spec.output_dir, "temp": spec.temp_dir}
        self.client = ComfyClient(url, request_timeout_s=comfy.request_timeout_s)
        await self.client.__aenter__()
        await self.refresh()

    async def stop(self) -> None:
        await self.settle()
        if self.client is not None:
            await self.client.__aexit__(None, None, None)
        if self.process is not None:
            await self.process.stop()

    @property
    def ready(self) -> bool:
        """ComfyUI can take a job now: its process is up (or, attached, its event connection is)."""
        if self.process is not None:
            return self.process.is_ready
        return self.client is not None and self.client.connected

    def _use_cuda(self) -> bool:
        device = self.settings.comfy.device
        if device != "auto":
            return device == "cuda"
        from agent.gpu import list_gpus

        return bool(list_gpus())

    def _on_comfy_exit(self, returncode: int) -> None:
        if self.client is not None:
            self.client.fail_all(WorkerLost(f"ComfyUI died (exit code {returncode})"))
        self._object_info = {}

    def combos(self, class_type: str, input_name: str) -> list[str] | None:
        """The values ComfyUI accepts at a node's input (samplers, installed models...), if it lists them."""
        return combo_values(self._object_info, class_type, input_name)

    async def refresh(self) -> None:
        """Re-read ComfyUI's node schemas: installed models and accepted values change with them."""
        assert self.client is not None
        self._object_info = await self.client.get_json("/object_info")

    async def models(self) -> list[Model]:
        """What ComfyUI can load; its lists are read again when a model folder changed (a pull)."""
        folders = self._folders_signature()
        if not self._object_info or folders != self._folders_seen:
            await self.refresh()
            self._folders_seen = folders
        return list_models(self._object_info, self.settings.paths.models_dir)

    def _folders_signature(self) -> tuple[tuple[str, int], ...]:
        root = self.settings.paths.models_dir
        return tuple((d.name, d.stat().st_mtime_ns) for d in sorted(root.iterdir()) if d.is_dir()) if root.is_dir() else ()

    async def run(
        self,
        workflow: str,
        params: Mapping[str, Any],
        *,
        job_id: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> Outputs:
        """Run one workflow; raise a :class:`JobFailed` subclass saying why when it cannot."""
        assert self.client is not None, "start the engine first"
        job_id = job_id or uuid.uuid4().hex
        if job_id in self._cleanups:  # an earlier attempt of this job: let it finish clearing up first
            await self._cleanups[job_id]
        template = self.library.get(workflow)
        if self.process is not None:  # restarting: its node lists come back with it
            try:
                await self.process.wait_ready(self.settings.comfy.startup_timeout_s)
            except EngineUnavailable as exc:  # not back in time: another agent may be
                raise WorkerLost(str(exc)) from None
        if not self._object_info:  # forgotten when ComfyUI died: read the new one's
            await self.refresh()
        values = await self._validate(template, params)
        refs: list[OutputRef] = []
        try:
            uploaded = await self._upload_images(template, values, job_id)
            prompt = render(template, values, uploaded, job_id)
            log.info("prompt submitted", extra={"job": job_id, "workflow": workflow})
            outcome = await self.client.run(prompt, job_id, timeout=self.settings.comfy.job_timeout_s,
                                            on_progress=on_progress, namer=template.param_for)
            refs = outcome.refs
            outputs = Outputs(list(await asyncio.gather(*(self._fetch(ref) for ref in refs))), outcome.texts)
            log.info("prompt finished", extra={"job": job_id, "outputs": len(outputs), "texts": len(outputs.texts)})
            return outputs
        finally:
            self._schedule_cleanup(job_id, refs)

    async def settle(self) -> None:
        """Wait until every finished job has been cleaned out of ComfyUI."""
        await asyncio.gather(*self._cleanups.values())

    async def interrupt(self, job_id: str) -> None:
        assert self.client is not None
        await self.client.interrupt(job_id)

    async def _validate(self, template: Workflow, params: Mapping[str, Any]) -> dict[str, Any]:
        combos = self.combos
        try:
            return validate(template, params, combos)
        except InvalidRequest as exc:
            if not any(e.code == "not_installed" for e in exc.errors):
                raise
        await self.refresh()  # a model may have been added since we last looked
        return validate(template, params, combos)

    async def _upload_images(self, template: Workflow, values: Mapping[str, Any], job_id: str) -> dict[str, str]:
        assert self.client is not None
        uploaded = {}
        for name, spec in template.params.items():
            image = values.get(name)
            if spec.type is ParamType.IMAGE and isinstance(image, ImageInput):
                uploaded[name] = await self.client.upload_image(image.data, f"{name}.{image.format.lower()}", job_id)
        return uploaded

    async def _fetch(self, ref: OutputRef) -> OutputFile:
        assert self.client is not None
        data = await self.client.view(ref)
        media_type = mimetypes.guess_type(ref.filename)[0] or "application/octet-stream"
        return OutputFile(ref.node_id, ref.kind, ref.filename, media_type, data)

    def _schedule_cleanup(self, job_id: str, refs: list[OutputRef]) -> None:
        task = asyncio.create_task(self._clean_up(job_id, refs), name=f"comfyui-cleanup-{job_id}")
        self._cleanups[job_id] = task
        task.add_done_callback(lambda done: self._cleanups.pop(job_id) if self._cleanups.get(job_id) is done else None)

    async def _clean_up(self, job_id: str, refs: list[OutputRef]) -> None:
        """Forget the job in ComfyUI: its history entry, uploaded inputs and output files.

        Our uploads and saved outputs sit in ``job_id/`` folders (see :func:`render`); files a
        node wrote elsewhere (previews in temp/) are deleted one by one.
        """
        assert self.client is not None
        doomed = [self._dirs[k] / job_id for k in ("input", "output") if k in self._dirs]
        doomed += [self._dirs[r.type] / r.subfolder / r.filename for r in refs
                   if r.type in self._dirs and not r.subfolder.startswith(job_id)]
        history, files = await asyncio.gather(
            self.client.delete_history(job_id),
            asyncio.to_thread(_remove, doomed, list(self._dirs.values())),
            return_exceptions=True,
        )
        for problem in (history, files):
            if isinstance(problem, BaseException) and not isinstance(problem, WorkerLost):  # dead: nothing to delete
                log.warning("cleanup failed", extra={"job": job_id, "error": repr(problem)})


def _remove(paths: list[Path], roots: list[Path]) -> None:
    for path in paths:
        if not any(path.resolve().is_relative_to(root.resolve()) for root in roots):
            continue  # a ref that points outside ComfyUI's folders is never ours to delete
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
