"""The echo capability: a job that does nothing, to measure the router and the link alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpugate.wire import Capability

from . import JobProgress, RunResult, WithoutModels


class EchoRunner(WithoutModels):
    def capabilities(self) -> list[Capability]:
        return [Capability(name="echo", vram_base=0, vram_per_megapixel=0)]

    async def run(self, capability: str, job_id: str, params: dict[str, Any],
                  on_progress: Callable[[JobProgress], None]) -> RunResult:
        return RunResult(texts=[str(params.get("text", ""))])
