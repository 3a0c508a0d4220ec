"""One exception tree for all of gpugate.

A job that cannot be done ends in a :class:`JobFailed` subclass. Its ``kind`` tells the caller what
to do next (the router's retry policy reads nothing else): fix the request, retry on a bigger GPU,
retry elsewhere, or give up. Lower layers (ComfyUI's answers, ffmpeg's exit codes) are translated
into this tree once, at their boundary.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar


class GpugateError(Exception):
    """Root of every error gpugate raises on purpose."""


class ConfigError(GpugateError):
    """The settings or a file they point at are unusable; the message says which and why."""


class ProvisionError(GpugateError):
    """Installing a pinned component failed (download, hash check, extraction)."""


class DownloadError(GpugateError):
    """A model download failed (HTTP error, connection lost past retries, wrong size or hash)."""


class EngineUnavailable(GpugateError):
    """An engine (ComfyUI) could not be started or reached within its time limit."""


class FailureKind(StrEnum):
    """What kind of failure ended a job; the router decides retries from this alone."""

    INVALID = "invalid"  # the request can never succeed as given: fail at once
    OUT_OF_MEMORY = "out_of_memory"  # retry on a device with more free memory
    EXECUTION = "execution_error"  # a step raised; the message names the node
    INTERRUPTED = "interrupted"  # stopped on purpose (cancel)
    WORKER_LOST = "worker_lost"  # the engine or agent died under the job: retry elsewhere
    INFRASTRUCTURE = "infrastructure"  # a fault of the machine (disk full, a file lost, a tool missing): retry elsewhere
    TIMEOUT = "timeout"  # ran past its time limit
    SHUTDOWN = "shutdown"  # handed back by an agent that is shutting down: queued again, no attempt used
    UNSCHEDULABLE = "unschedulable"  # no connected agent could take it for too long


@dataclass(frozen=True)
class FieldError:
    """One bad input: which field and why, in words a client can show."""

    field: str
    message: str
    code: str = "invalid"


class JobFailed(GpugateError):
    """A job ended without results. Subclasses fix ``kind``."""

    kind: ClassVar[FailureKind]

    def __init__(self, message: str, *, node_id: str | None = None, node_type: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.node_id = node_id
        self.node_type = node_type

    def to_dict(self) -> dict[str, Any]:
        """The failure as plain data, for logs and the wire."""
        out: dict[str, Any] = {"kind": self.kind.value, "message": self.message}
        if self.node_id is not None:
            out["node_id"] = self.node_id
            out["node_type"] = self.node_type
        return out


class InvalidRequest(JobFailed):
    """The request (parameters, workflow, files) is wrong; each bad field is listed."""

    kind = FailureKind.INVALID

    def __init__(self, errors: list[FieldError] | FieldError) -> None:
        self.errors = [errors] if isinstance(errors, FieldError) else list(errors)
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in self.errors))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["errors"] = [{"field": e.field, "message": e.message, "code": e.code} for e in self.errors]
        return out


class OutOfMemory(JobFailed):
    kind = FailureKind.OUT_OF_MEMORY


class ExecutionError(JobFailed):
    kind = FailureKind.EXECUTION


class Interrupted(JobFailed):
    kind = FailureKind.INTERRUPTED


class WorkerLost(JobFailed):
    kind = FailureKind.WORKER_LOST


class InfrastructureFault(JobFailed):
    """The machine failed the job, not the request: a full disk, a lost file, a missing tool."""

    kind = FailureKind.INFRASTRUCTURE

    @classmethod
    def of_os_error(cls, exc: OSError, doing: str) -> InfrastructureFault:
        """An operating-system error met while ``doing`` something, in words an operator can act on."""
        why = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exhausted",
               errno.ENOENT: "a file is missing", errno.EACCES: "permission denied", errno.EIO: "an I/O error",
               errno.EROFS: "the file system is read-only"}.get(exc.errno or 0, exc.strerror or type(exc).__name__)
        where = f" ({exc.filename})" if exc.filename else ""
        return cls(f"{doing} failed on this agent: {why}{where}")


class ShutDown(JobFailed):
    """The agent is stopping and hands the job back unfinished; the router queues it again."""

    kind = FailureKind.SHUTDOWN


class JobTimeout(JobFailed):
    kind = FailureKind.TIMEOUT
