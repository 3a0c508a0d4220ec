"""What an agent can run, one module per capability family. Each runner says what it offers and
runs one job at a time per call; the link (agent/link.py) moves jobs and files. Input files reach a
runner as paths (agent/files.py), which it only reads: they may be the router's own files."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from gpugate.wire import Capability, Model


T = TypeVar("T")


class Stopped(Exception):
    """Raised inside blocking work that saw its stop event (the job was cancelled)."""


async def stoppable(work: Callable[[threading.Event], T]) -> T:
    """Run blocking ``work`` in a thread. If the job is cancelled, set the event ``work`` checks
    between steps (segments, sentences) and wait for the thread to end before the cancellation goes
    on, so a model is never in use by a stopped job and the next one at once."""
    stop = threading.Event()
    future = asyncio.ensure_future(asyncio.to_thread(work, stop))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        stop.set()
        with contextlib.suppress(Stopped):
            await future
        raise


@dataclass(frozen=True)
class OutputFile:
    file_name: str
    media_type: str
    data: bytes


@dataclass(frozen=True)
class RunResult:
    files: list[OutputFile] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    details: dict[str, Any] | None = None  # structured extras of a text result (language, segments...)


@dataclass(frozen=True)
class JobProgress:
    step: int | None = None
    total: int | None = None
    node: str | None = None
    text: str | None = None  # streamed output (a chat's next tokens), sent on at once


class Runner(Protocol):
    def capabilities(self) -> list[Capability]: ...

    async def models(self) -> list[Model]: ...

    def loaded(self) -> list[str]: ...

    async def warm(self, model: str) -> bool:
        """Load ``model`` so it is in ``loaded()``; False when this runner has no such model, an
        exception when it has it but loading it failed."""
        ...

    async def run(self, capability: str, job_id: str, params: dict[str, Any],
                  on_progress: Callable[[JobProgress], None]) -> RunResult: ...


class WithoutModels:
    """For runners that load no model files (echo, ffmpeg): nothing to list, load or warm."""

    async def models(self) -> list[Model]:
        return []

    def loaded(self) -> list[str]:
        return []

    async def warm(self, model: str) -> bool:
        return False
