"""The agent's connection to the router: register, heartbeat, pull jobs, run them, report back.

One websocket (a pull: the agent asks for as many jobs as it has free slots, one more each time
a job ends), files by name (agent/files.py). When the connection drops, the router has
already queued this agent's jobs again, so running jobs are cancelled (their ComfyUI prompts
interrupted) and the link reconnects with backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from gpugate.errors import ExecutionError, FieldError, Interrupted, InvalidRequest, JobFailed, WorkerLost
from gpugate.settings import Settings
from gpugate.wire import (
    Done, Failed, Failure, Heartbeat, Hello, JobOffer, Model, Progress, Pull, StopJob, Welcome, router_message,
)

from .files import RouterFiles
from .gpu import report_devices
from .runners import JobProgress, Runner

log = logging.getLogger(__name__)
RECONNECT_MAX_S = 10.0


class RouterLink:
    def __init__(self, settings: Settings, runners: list[Runner]) -> None:
        if not settings.agent.router_url or not settings.agent.token:
            raise ValueError("agent.router_url and agent.token are needed to join a router")
        self.settings = settings
        self.url = settings.agent.router_url.rstrip("/")
        self.name = settings.agent.name or socket.gethostname()
        self.runners = {cap.name: runner for runner in runners for cap in runner.capabilities()}
        self._runners = runners
        self._headers = {"Authorization": f"Bearer {settings.agent.token}"}
        self.connected = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected (reconnecting with backoff) until ``stop`` is set."""
        try:
            await self._stay_connected(stop)
        finally:
            (self.settings.health_dir / f"{self.name}.json").unlink(missing_ok=True)

    async def _stay_connected(self, stop: asyncio.Event) -> None:
        delay = 0.2
        async with aiohttp.ClientSession(self.url, headers=self._headers) as http:
            while not stop.is_set():
                try:
                    await self._session(http, stop)
                    delay = 0.2
                except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                    log.warning("router unreachable", extra={"router": self.url, "error": str(exc) or type(exc).__name__})
                finally:
                    self.connected.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, RECONNECT_MAX_S)

    async def _session(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        async with http.ws_connect("/agent/ws", heartbeat=10, max_msg_size=16 * 2**20) as ws:
            await ws.send_str((await self._hello()).model_dump_json())
            welcome = router_message.validate_json((await ws.receive()).data)
            if not isinstance(welcome, Welcome):
                raise ConnectionError("router did not welcome us")
            log.info("joined router", extra={"router": self.url, "agent": self.name})
            files = await RouterFiles.for_session(http, welcome.store)
            outbox: asyncio.Queue[str] = asyncio.Queue()  # one writer keeps progress before its outcome
            outbox.put_nowait(Pull(slots=self.settings.agent.concurrency).model_dump_json())
            jobs: dict[int, asyncio.Task[None]] = {}
            tasks = [asyncio.create_task(self._send(ws, outbox), name="send"),
                     asyncio.create_task(self._heartbeats(outbox), name="heartbeats"),
                     asyncio.create_task(self._receive(files, ws, outbox, jobs), name="receive"),
                     asyncio.create_task(stop.wait(), name="stop")]
            self.connected.set()
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            finally:
                for task in (*jobs.values(), *tasks):
                    task.cancel()
                await asyncio.gather(*jobs.values(), *tasks, return_exceptions=True)

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, outbox: asyncio.Queue[str]) -> None:
        while True:
            await ws.send_str(await outbox.get())

    async def _receive(self, files: RouterFiles, ws: aiohttp.ClientWebSocketResponse,
                       outbox: asyncio.Queue[str], jobs: dict[int, asyncio.Task[None]]) -> None:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            message = router_message.validate_json(msg.data)
            if isinstance(message, JobOffer):
                task = asyncio.create_task(self._run_job(files, outbox, message), name=f"job-{message.job_id}")
                jobs[message.job_id] = task
                task.add_done_callback(lambda _, job_id=message.job_id: jobs.pop(job_id, None))
            elif isinstance(message, StopJob) and (task := jobs.get(message.job_id)) is not None:
                log.info("job cancelled by the router", extra={"job": message.job_id, "attempt": message.attempt})
                task.cancel()

    async def _run_job(self, files: RouterFiles, outbox: asyncio.Queue[str], offer: JobOffer) -> None:
        extra = {"job": offer.job_id, "attempt": offer.attempt, "capability": offer.capability}
        log.info("job received", extra=extra)
        try:
            runner = self.runners.get(offer.capability)
            if runner is None:
                raise InvalidRequest(FieldError("capability", f"this agent cannot run {offer.capability}"))

            def progress(p: JobProgress) -> None:
                outbox.put_nowait(Progress(job_id=offer.job_id, attempt=offer.attempt, step=p.step, total=p.total,
                                           node=p.node).model_dump_json())

            with tempfile.TemporaryDirectory(prefix=f"gpugate-inputs-{offer.job_id}-") as folder:
                params: dict[str, Any] = dict(offer.params)
                for name, file in offer.inputs.items():
                    params[name] = await files.fetch(file, Path(folder))
                result = await runner.run(offer.capability, f"{offer.job_id}-{offer.attempt}", params, progress)
            artifacts = [await files.store_output(f) for f in result.files]
            answer: Done | Failed = Done(job_id=offer.job_id, attempt=offer.attempt, artifacts=artifacts,
                                         texts=result.texts, details=result.details)
            log.info("job done", extra={**extra, "files": len(artifacts)})
        except JobFailed as exc:
            answer = Failed(job_id=offer.job_id, attempt=offer.attempt, failure=Failure.of(exc))
            log.warning("job failed", extra={**extra, "kind": exc.kind.value, "error": exc.message})
        except asyncio.CancelledError:  # stopped by the router, or this session is closing
            answer = Failed(job_id=offer.job_id, attempt=offer.attempt, failure=Failure.of(Interrupted("cancelled")))
            log.info("job stopped", extra=extra)
        except aiohttp.ClientError as exc:  # file transfer with the router broke
            answer = Failed(job_id=offer.job_id, attempt=offer.attempt,
                            failure=Failure.of(WorkerLost(f"file transfer with the router failed: {exc}")))
        except Exception as exc:  # a bug or a local fault must end the job with an answer, never hang it
            log.exception("job crashed", extra=extra)
            answer = Failed(job_id=offer.job_id, attempt=offer.attempt,
                            failure=Failure.of(ExecutionError(f"the agent failed: {type(exc).__name__}: {exc}")))
        outbox.put_nowait(answer.model_dump_json())
        outbox.put_nowait(Pull(slots=1).model_dump_json())

    async def _hello(self) -> Hello:
        cpu_only, devices = report_devices(self.settings)
        return Hello(name=self.name, cpu_only=cpu_only, devices=devices, models=await self._models(),
                     capabilities=[c for r in self._runners for c in r.capabilities()],
                     concurrency=self.settings.agent.concurrency)

    async def _models(self) -> list[Model]:
        return [m for runner in self._runners for m in await runner.models()]

    async def _heartbeats(self, outbox: asyncio.Queue[str]) -> None:
        last_models = await self._models()
        while True:
            await asyncio.sleep(self.settings.agent.heartbeat_s)
            models = await self._models()
            _, devices = report_devices(self.settings)
            beat = Heartbeat(devices=devices, loaded=[m for r in self._runners for m in r.loaded()],
                             models=models if models != last_models else None)
            last_models = models
            outbox.put_nowait(beat.model_dump_json())
            await asyncio.to_thread(self._mark_alive)

    def _mark_alive(self) -> None:
        """What `gpugate health --agent` (the container's HEALTHCHECK) reads: connected as of now."""
        path = self.settings.health_dir / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        part.write_text(json.dumps({"router": self.url, "time": time.time()}))
        part.replace(path)  # the health check never reads half a file
