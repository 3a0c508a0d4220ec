"""The echo capability: a job that does nothing, to measure the router and the link alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpugate.wire import Capability, Model

from . import JobProgress, RunResult


class EchoRunner:
    def capabilities(self) -> list[Capability]:
        return [Capability(name="echo", vram_base=0, vram_per_megapixel=0)]

    async def models(self) -> list[Model]:
        return []

    def loaded(self) -> list[str]:
        return []

    async def run(self, capability: str, job_id: str, params: dict[str, Any],
                  on_progress: Callable[[JobProgress], None]) -> RunResult:
        return RunResult(texts=[str(params.get("text", ""))])
