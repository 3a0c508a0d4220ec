"""What an agent can run, one module per capability family. Each runner says what it offers and
runs one job at a time per call; the link (agent/link.py) moves jobs and files."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from gpugate.wire import Capability, Model


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
    step: int | None
    total: int | None
    node: str | None


class Runner(Protocol):
    def capabilities(self) -> list[Capability]: ...

    async def models(self) -> list[Model]: ...

    def loaded(self) -> list[str]: ...

    async def run(self, capability: str, job_id: str, params: dict[str, Any],
                  on_progress: Callable[[JobProgress], None]) -> RunResult: ...


class WithoutModels:
    """For runners that load no model files (echo, ffmpeg): nothing to list, nothing loaded."""

    async def models(self) -> list[Model]:
        return []

    def loaded(self) -> list[str]:
        return []
