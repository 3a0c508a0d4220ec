"""ComfyUI dying, failing to start, or losing its event connection: jobs end clearly, work resumes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

from agent.comfy.engine import ComfyEngine
from agent.supervised import SupervisedServer
from gpugate.errors import EngineUnavailable, WorkerLost
from tests.conftest import image_of
from tests.model_fixtures import CHECKPOINT

LONG = {"prompt": "long", "steps": 150, "width": 256, "height": 256, "checkpoint": CHECKPOINT}


async def test_killing_comfyui_mid_prompt_reports_it_died_and_the_next_prompt_succeeds(engine: ComfyEngine) -> None:
    assert engine.process is not None
    old_pid, restarts = engine.process.pid, engine.process.restarts
    sampling = asyncio.Event()
    job = asyncio.create_task(engine.run("txt2img", LONG, on_progress=lambda p: p.step and sampling.set()))
    await asyncio.wait_for(sampling.wait(), 60)
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(WorkerLost, match=r"ComfyUI died \(exit code -9\)"):
        await asyncio.wait_for(job, 30)

    [output] = await engine.run("blank", {"width": 16})  # waits for the restart, then runs
    assert image_of(output.data).size == (16, 64)
    assert engine.process.restarts == restarts + 1 and engine.process.pid not in (None, old_pid)


async def test_a_comfyui_that_cannot_start_is_reported_with_its_output(tmp_path: Path) -> None:
    broken = SupervisedServer([sys.executable, "-c", "print('missing torch, say'); raise SystemExit(3)"],
                          url="http://127.0.0.1:9", cwd=tmp_path)
    with pytest.raises(EngineUnavailable, match=r"exited with code 3; last output:\nmissing torch, say"):
        await broken.start()


async def test_a_dropped_event_connection_does_not_lose_the_prompt(engine: ComfyEngine, settings) -> None:
    """Every connection to ComfyUI goes through a loopback proxy that we cut mid-prompt."""
    async with _Proxy(engine.url) as proxy:
        attached = settings.model_copy(update={"comfy": settings.comfy.model_copy(update={"mode": "attach", "url": proxy.url})})
        async with ComfyEngine(attached) as other:
            sampling = asyncio.Event()
            job = asyncio.create_task(other.run("txt2img", {**LONG, "steps": 30, "width": 64, "height": 64},
                                                on_progress=lambda p: p.step and sampling.set()))
            await asyncio.wait_for(sampling.wait(), 60)
            await proxy.cut()
            before = proxy.connections
            outputs = await asyncio.wait_for(job, 120)
    assert image_of(outputs[0].data).size == (64, 64)
    assert proxy.cuts == 1 and proxy.connections > before  # it reconnected, and the prompt finished


class _Proxy:
    """A TCP proxy on 127.0.0.1 whose open connections can all be cut at once."""

    def __init__(self, target_url: str) -> None:
        host, port = target_url.removeprefix("http://").split(":")
        self._target = (host, int(port))
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.cuts = self.connections = 0

    async def __aenter__(self) -> _Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()
        await self.cut()
        await self._server.wait_closed()
        self.cuts -= 1

    async def cut(self) -> None:
        self.cuts += 1
        for writer in list(self._writers):
            writer.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self._target)
        self._writers |= {writer, up_writer}
        pipes = [asyncio.create_task(self._pipe(reader, up_writer)), asyncio.create_task(self._pipe(up_reader, writer))]
        self._pipes.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self._pipes.difference_update(pipes)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        with contextlib.suppress(ConnectionError, OSError, RuntimeError):
            writer.write_eof()


async def test_a_malformed_event_does_not_end_the_event_stream() -> None:
    """ComfyUI's event socket sends frames that are not events, then drops: the client reads past
    them and reconnects (a dead event task would leave every later prompt waiting for nothing)."""
    from aiohttp import web

    from agent.comfy.client import ComfyClient

    connections = 0

    async def events(request: web.Request) -> web.WebSocketResponse:
        nonlocal connections
        connections += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        for frame in ("{not json", '["a list, not an event"]', '{"type": "executing", "data": "not a dict"}',
                      '{"type": "status", "data": {"status": {}}}'):
            await ws.send_str(frame)
        if connections == 1:
            await ws.close()  # dropped: the client must come back
        else:
            async for _ in ws:  # until the client closes
                pass
        return ws

    app = web.Application()
    app.router.add_get("/ws", events)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with ComfyClient(f"http://127.0.0.1:{port}") as client:
            async with asyncio.timeout(30):
                while connections < 2 or not client.connected:
                    await asyncio.sleep(0.05)
            assert client._events is not None and not client._events.done(), "the event task lives on"
    finally:
        await runner.cleanup()
