"""Supervise a local HTTP server as a child process (ComfyUI, llama.cpp's llama-server): start,
wait for readiness, restart on death, stop.

Readiness is the server answering its health path (ComfyUI's ``/system_stats``, llama-server's
``/health``) with 200 while its PID is still alive: no fixed sleeps. Liveness is the same question
asked every ``liveness_every_s`` while it runs: a server that has not answered for
``liveness_timeout_s`` (wedged, or stopped) is killed. One that dies after it was up, or is killed
so, is restarted with exponential backoff and the ``on_exit`` callback is told first, so the jobs
it was running fail at once as "it died" instead of hanging. One that cannot come up at all is an
:class:`EngineUnavailable` with its last log lines. Its output goes line by line to the logger
named ``logger`` (``comfyui``, ``llama-server``). It gets SIGTERM when its parent dies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp

from gpugate.children import die_with_parent
from gpugate.errors import EngineUnavailable

log = logging.getLogger(__name__)

READY_POLL_S = 0.1
STABLE_AFTER_S = 60.0  # a run this long resets the restart backoff
STOP_GRACE_S = 10.0


class SupervisedServer:
    """One supervised server. Use ``async with`` or ``start()`` / ``stop()``."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        url: str,
        cwd: Path,
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 300.0,
        backoff_s: float = 1.0,
        backoff_max_s: float = 30.0,
        liveness_timeout_s: float = 60.0,
        liveness_every_s: float = 10.0,
        on_exit: Callable[[int], None] = lambda returncode: None,
        label: str = "ComfyUI",
        health_path: str = "/system_stats",
        logger: str = "comfyui",
    ) -> None:
        self.command = list(command)
        self.label, self._health_path = label, health_path
        self._child_log = logging.getLogger(logger)
        self.url = url
        self._cwd = cwd
        self._env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self._startup_timeout_s = startup_timeout_s
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self._liveness_timeout_s = liveness_timeout_s
        self._liveness_every_s = liveness_every_s
        self._on_exit = on_exit
        self._proc: asyncio.subprocess.Process | None = None
        self._pump: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self.restarts = 0

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    @property
    def is_ready(self) -> bool:
        return self._ready.is_set()

    async def __aenter__(self) -> SupervisedServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Launch the server and return once it answers; raise EngineUnavailable if it cannot."""
        async with aiohttp.ClientSession() as http:
            await self._launch_until_ready(http)
        self._supervisor = asyncio.create_task(self._supervise(), name=f"{self.label}-supervisor")

    async def wait_ready(self, timeout: float) -> None:
        """Wait while a restart is under way; EngineUnavailable if it takes longer than ``timeout``."""
        if self._ready.is_set():
            return
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            raise EngineUnavailable(f"{self.label} is not ready after {timeout:.0f}s") from None

    async def stop(self) -> None:
        """Stop supervising and end the process: SIGTERM, then SIGKILL after a grace period."""
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._terminate()

    async def _supervise(self) -> None:
        """Wait for the process to exit; unless we are stopping, report it and start it again."""
        delay = self._backoff_s
        async with aiohttp.ClientSession() as http:
            while not self._stopping:
                assert self._proc is not None
                started = time.monotonic()
                returncode = await self._exit_or_hang(http)
                self._ready.clear()  # before anything else: no new job may go to the dead one
                if not self._stopping:
                    log.warning(f"{self.label} exited", extra={"returncode": returncode, "pid": self._proc.pid})
                    self._on_exit(returncode)
                await self._drain_log()
                if self._stopping:
                    return
                if time.monotonic() - started > STABLE_AFTER_S:
                    delay = self._backoff_s
                while not self._stopping:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._backoff_max_s)
                    try:
                        await self._launch_until_ready(http)
                        self.restarts += 1
                        break
                    except EngineUnavailable as exc:
                        log.error(f"{self.label} restart failed", extra={"error": str(exc), "retry_in_s": delay})

    async def _exit_or_hang(self, http: aiohttp.ClientSession) -> int:
        """Wait for the process to exit; if it stops answering for ``liveness_timeout_s``, kill it first."""
        proc = self._proc
        assert proc is not None
        exited = asyncio.ensure_future(proc.wait())
        last_ok = time.monotonic()
        try:
            while True:
                probe = asyncio.ensure_future(self._answers(http, self._liveness_timeout_s))
                await asyncio.wait({exited, probe}, return_when=asyncio.FIRST_COMPLETED)
                if exited.done():
                    probe.cancel()
                    return exited.result()
                now = time.monotonic()
                if probe.result():
                    last_ok = now
                elif now - last_ok >= self._liveness_timeout_s:
                    log.error(f"{self.label} stopped answering; killing it", extra={"pid": proc.pid, "silent_s": round(now - last_ok)})
                    self._ready.clear()
                    proc.kill()
                    return await exited
                await asyncio.wait({exited}, timeout=self._liveness_every_s)
        finally:
            exited.cancel()

    async def _answers(self, http: aiohttp.ClientSession, timeout: float) -> bool:
        try:
            async with http.get(f"{self.url}{self._health_path}", timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _launch_until_ready(self, http: aiohttp.ClientSession) -> None:
        self._tail.clear()
        proc = await asyncio.create_subprocess_exec(
            *self.command,
            cwd=self._cwd,
            env=self._env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
        self._proc = proc
        log.info(f"{self.label} starting", extra={"pid": proc.pid, "url": self.url})
        self._pump = asyncio.create_task(self._pump_log(proc), name=f"{self.label}-log-{proc.pid}")
        exited = asyncio.create_task(proc.wait(), name=f"{self.label}-wait-{proc.pid}")
        answering = asyncio.create_task(self._poll_until_answering(http), name=f"{self.label}-ready-{proc.pid}")
        try:
            done, _ = await asyncio.wait(
                {exited, answering}, timeout=self._startup_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            answering.cancel()
            exited.cancel()
        if answering in done:
            self._ready.set()
            log.info(f"{self.label} ready", extra={"pid": proc.pid, "url": self.url})
            return
        if exited not in done:
            await self._terminate()
        await self._drain_log()
        why = f"exited with code {proc.returncode}" if exited in done else f"not answering after {self._startup_timeout_s:.0f}s"
        raise EngineUnavailable(f"{self.label} {why}; last output:\n" + "\n".join(self._tail))

    async def _poll_until_answering(self, http: aiohttp.ClientSession) -> None:
        while not await self._answers(http, 2.0):
            await asyncio.sleep(READY_POLL_S)

    async def _pump_log(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._tail.append(line)
                self._child_log.info(line, extra={"pid": proc.pid})

    async def _drain_log(self) -> None:
        """The log pump ends at the process's EOF; wait for it so no line is lost."""
        if self._pump is not None:
            await self._pump
            self._pump = None

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            log.info(f"{self.label} stopped", extra={"pid": proc.pid})
        await self._drain_log()

