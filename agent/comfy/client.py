"""Talk to one ComfyUI: HTTP through aiohttp, events through one websocket (websockets).

The websocket has a stable client id and reconnects on its own. Execution events go only to the
client id a prompt was submitted with, and events sent while the socket is down are lost, so after
every (re)connect each waiting prompt looks at ``/history`` (and ``/queue``) instead of trusting
silence. A prompt is done when ComfyUI sends ``executing`` with ``node: null`` for it; its result
is then read from ``/history`` (see :mod:`.protocol`). Connection failures become
:class:`WorkerLost`: ComfyUI is gone or restarting.

Nothing waits on ComfyUI without a limit: every HTTP call has a connect and a read timeout
(``request_timeout_s``; a stalled read is a lost ComfyUI too), the websocket is pinged, and the
event task survives anything a message or the connection throws at it (it logs and reconnects).
A ComfyUI that is alive but wedged is the supervisor's to find (process.py: liveness).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import websockets

from gpugate.errors import ExecutionError, InvalidRequest, JobFailed, JobTimeout, WorkerLost

from .protocol import FieldNamer, Outcome, OutputRef, history_outcome, prompt_refusal

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.2
RECONNECT_MAX_S = 5.0
STOP_GRACE_S = 30.0  # how long an interrupted prompt may take to reach its next interrupt check


@dataclass(frozen=True)
class Progress:
    """Where a running prompt is: the node executing and, for samplers, step of total."""

    node: str | None
    node_type: str | None
    step: int | None = None
    total: int | None = None


ProgressCallback = Callable[[Progress], None]


class _Watch:
    """One prompt we wait for: its progress callback and the signals that wake its waiter."""

    def __init__(self, prompt: Mapping[str, Any], on_progress: ProgressCallback | None) -> None:
        self.prompt = prompt
        self.on_progress = on_progress
        self.signals: asyncio.Queue[str | JobFailed] = asyncio.Queue()
        self.submitted = False  # a ComfyUI has it: that ComfyUI dying fails it

    def progress(self, progress: Progress) -> None:
        if self.on_progress is not None:
            try:
                self.on_progress(progress)
            except Exception:  # a broken callback must not stop the event stream
                log.exception("progress callback failed")

    async def next_signal(self) -> str:
        signal = await self.signals.get()
        if isinstance(signal, JobFailed):
            raise signal
        return signal


class ComfyClient:
    """One ComfyUI's HTTP API and event stream. Use ``async with``."""

    def __init__(self, base_url: str, *, client_id: str | None = None, request_timeout_s: float = 120.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.request_timeout_s = request_timeout_s
        self._http: aiohttp.ClientSession | None = None
        self._events: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._watches: dict[str, _Watch] = {}

    async def __aenter__(self) -> ComfyClient:
        self._http = aiohttp.ClientSession(self.base_url, timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=10, sock_read=self.request_timeout_s))
        self._events = asyncio.create_task(self._event_loop(), name="comfyui-events")
        return self

    @property
    def connected(self) -> bool:
        """The event connection is up (in attach mode, the best sign that ComfyUI is)."""
        return self._connected.is_set()

    async def __aexit__(self, *exc: object) -> None:
        if self._events is not None:
            self._events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events
        if self._http is not None:
            await self._http.close()

    # ---- the prompt lifecycle ------------------------------------------------------------------

    async def run(
        self,
        prompt: Mapping[str, Any],
        prompt_id: str,
        *,
        timeout: float,
        on_progress: ProgressCallback | None = None,
        namer: FieldNamer = lambda node, name: None,
    ) -> Outcome:
        """Submit ``prompt`` as ``prompt_id``, wait until ComfyUI has finished it, return its outputs."""
        watch = self._watches[prompt_id] = _Watch(prompt, on_progress)
        try:
            await self._wait_connected(timeout)
            watch.submitted = True
            refusal = await self._submit(prompt, prompt_id, namer)
            if refusal is not None:  # ComfyUI queued the part that validated: take it back first
                await self._stop(prompt_id, watch)
                raise refusal
            try:
                async with asyncio.timeout(timeout):
                    return await self._wait_outcome(prompt_id, watch)
            except TimeoutError:
                await self._stop(prompt_id, watch)
                raise JobTimeout(f"still running after {timeout:.0f}s; interrupted") from None
            except asyncio.CancelledError:  # the caller gave up on the job: ComfyUI must too
                await asyncio.shield(self._stop(prompt_id, watch))
                raise
        finally:
            del self._watches[prompt_id]

    async def _stop(self, prompt_id: str, watch: _Watch) -> None:
        """Interrupt a prompt and wait until ComfyUI has let go of it, so nothing of it is left behind."""
        try:
            await self.interrupt(prompt_id)
            async with asyncio.timeout(STOP_GRACE_S):
                while await watch.next_signal() != "done" and await self._is_queued(prompt_id):
                    pass
        except (TimeoutError, JobFailed) as exc:
            log.warning("prompt did not confirm its end", extra={"job": prompt_id, "error": str(exc)})

    async def _wait_connected(self, timeout: float) -> None:
        # Events sent before the socket is up are lost: never submit without it.
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise WorkerLost(f"no event connection to ComfyUI at {self.base_url}") from None

    async def _submit(self, prompt: Mapping[str, Any], prompt_id: str, namer: FieldNamer) -> InvalidRequest | None:
        """Queue the prompt. A refusal is raised; a partial one (200 with node_errors) is returned,
        because the outputs that did validate are queued and must be stopped by the caller."""
        body = {"prompt": prompt, "client_id": self.client_id, "prompt_id": prompt_id}
        async with self._request("POST", "/prompt", json=body) as r:
            answer = await r.json(content_type=None)
        if r.status == 200:
            return prompt_refusal(answer, prompt, namer) if answer.get("node_errors") else None
        if r.status == 400:
            raise prompt_refusal(answer, prompt, namer)
        raise ExecutionError(f"ComfyUI answered {r.status} to /prompt: {str(answer)[:500]}")

    async def _wait_outcome(self, prompt_id: str, watch: _Watch) -> Outcome:
        while True:
            signal = await watch.next_signal()
            # After a reconnect: still queued or running means keep waiting. ComfyUI moves a prompt
            # from its queue to its history under one lock, so asking the queue first and the
            # history second cannot miss a prompt that finishes in between.
            if signal == "resync" and await self._is_queued(prompt_id):
                continue
            entry = await self.history(prompt_id)
            if entry is not None and entry.get("status") is not None:
                return history_outcome(entry)
            if signal == "done":
                raise ExecutionError("ComfyUI reported the prompt finished but has no history for it")
            raise WorkerLost("ComfyUI lost the prompt: it restarted while the event connection was down")

    def fail_all(self, failure: JobFailed) -> None:
        """Fail every prompt the dead ComfyUI had (the supervisor saw it die). A prompt still waiting
        to be submitted goes to the ComfyUI that comes back instead."""
        for watch in self._watches.values():
            if watch.submitted:
                watch.signals.put_nowait(failure)

    # ---- HTTP ----------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _request(self, method: str, path: str, **kwargs: Any) -> AsyncIterator[aiohttp.ClientResponse]:
        """Every HTTP call goes through here: a lost connection means ComfyUI is gone."""
        assert self._http is not None, "use ComfyClient inside 'async with'"
        try:
            async with self._http.request(method, path, **kwargs) as response:
                yield response
        except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as exc:
            raise WorkerLost(f"ComfyUI at {self.base_url} is not reachable: {exc}") from exc

    async def get_json(self, path: str) -> Any:
        async with self._request("GET", path) as r:
            if r.status != 200:
                raise ExecutionError(f"ComfyUI answered {r.status} to GET {path}")
            return await r.json(content_type=None)

    async def _post(self, path: str, body: Any) -> None:
        async with self._request("POST", path, json=body) as r:
            if r.status != 200:
                raise ExecutionError(f"ComfyUI answered {r.status} to POST {path}: {(await r.text())[:300]}")

    async def history(self, prompt_id: str) -> dict[str, Any] | None:
        return (await self.get_json(f"/history/{prompt_id}")).get(prompt_id)

    async def delete_history(self, prompt_id: str) -> None:
        await self._post("/history", {"delete": [prompt_id]})

    async def _is_queued(self, prompt_id: str) -> bool:
        queue = await self.get_json("/queue")
        return any(item[1] == prompt_id for key in ("queue_running", "queue_pending") for item in queue.get(key, []))

    async def interrupt(self, prompt_id: str) -> None:
        """Stop ``prompt_id`` whether it is running or still waiting in ComfyUI's queue."""
        await self._post("/queue", {"delete": [prompt_id]})
        await self._post("/interrupt", {"prompt_id": prompt_id})

    async def upload_image(self, data: bytes, filename: str, subfolder: str) -> str:
        """Put an image in ComfyUI's input folder; returns the name a LoadImage node takes."""
        form = aiohttp.FormData()
        form.add_field("image", data, filename=filename, content_type="application/octet-stream")
        form.add_field("subfolder", subfolder)
        form.add_field("type", "input")
        form.add_field("overwrite", "true")
        async with self._request("POST", "/upload/image", data=form) as r:
            if r.status != 200:
                raise ExecutionError(f"ComfyUI refused the upload of {filename}: {r.status} {(await r.text())[:300]}")
            answer = await r.json()
        return f"{answer['subfolder']}/{answer['name']}" if answer.get("subfolder") else answer["name"]

    async def view(self, ref: OutputRef) -> bytes:
        params = {"filename": ref.filename, "subfolder": ref.subfolder, "type": ref.type}
        async with self._request("GET", "/view", params=params) as r:
            if r.status != 200:
                raise ExecutionError(f"ComfyUI could not serve output {ref.subfolder}/{ref.filename}: {r.status}")
            return await r.read()

    # ---- events --------------------------------------------------------------------------------

    async def _event_loop(self) -> None:
        url = self.base_url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        delay = RECONNECT_MIN_S
        while True:
            try:
                async with websockets.connect(url, max_size=None, open_timeout=10, ping_interval=10,
                                              ping_timeout=self.request_timeout_s) as ws:
                    self._connected.set()
                    delay = RECONNECT_MIN_S
                    for watch in self._watches.values():
                        watch.signals.put_nowait("resync")  # events may have been missed meanwhile
                    async for message in ws:
                        if isinstance(message, str):  # binary frames are previews
                            self._on_message(message)
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                if self._connected.is_set():
                    log.warning("ComfyUI event connection lost", extra={"error": str(exc) or type(exc).__name__})
            except Exception:  # a bug here must not end the event stream for good: reconnect
                log.exception("ComfyUI event connection failed")
            finally:
                self._connected.clear()
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_MAX_S)

    def _on_message(self, text: str) -> None:
        try:
            message = json.loads(text)
        except ValueError:
            log.warning("ComfyUI sent a malformed event; ignored", extra={"event": text[:200]})
            return
        if isinstance(message, dict):
            self._dispatch(message)

    def _dispatch(self, message: Mapping[str, Any]) -> None:
        data = message.get("data")
        if not isinstance(data, dict):
            return
        watch = self._watches.get(str(data.get("prompt_id")))
        if watch is None:
            return
        kind = message.get("type")
        if kind == "executing":
            node = data.get("node")
            if node is None:
                watch.signals.put_nowait("done")
            else:
                watch.progress(Progress(node, _class_of(watch.prompt, node)))
        elif kind == "progress":
            node = data.get("node")
            watch.progress(Progress(node, _class_of(watch.prompt, node), data.get("value"), data.get("max")))


def _class_of(prompt: Mapping[str, Any], node: Any) -> str | None:
    return (prompt.get(str(node)) or {}).get("class_type")
