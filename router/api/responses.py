"""What the public API answers, as typed models: the handlers, the ReplyTo callbacks and the
OpenAPI document all use these, so the document cannot drift from the answers.

Field names are AI Server's (camelCase). Builders here are pure: a job and its links (router/urls.py:
where clients reach the router, signed) in, a response model out.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from pydantic.alias_generators import to_camel

from gpugate.wire import Progress

from ..store import Job, JobState
from ..urls import Links
from .errors import failure_status


class _Response(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)

    def body(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


class ResponseError(_Response):
    error_code: str
    field_name: str
    message: str


class ResponseStatus(_Response):
    """Why a call or a job failed; ``errors`` has one entry per bad field."""

    error_code: str
    message: str
    errors: list[ResponseError] = Field(default_factory=list)


class ErrorResponse(_Response):
    response_status: ResponseStatus


class Segment(_Response):
    start: float
    end: float
    text: str


class GenerationResult(_Response):
    """A file (url, fileName, provider) or a text (text; with language and segments for speech)."""

    url: str | None = None
    file_name: str | None = None
    provider: str | None = None
    text: str | None = None
    language: str | None = None
    duration: float | None = None
    segments: list[Segment] | None = None

    @model_serializer(mode="wrap")
    def _present_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """A file result has url/fileName/provider, a text result text (and details): nothing else."""
        return {k: v for k, v in handler(self).items() if v is not None}


class GenerationResponse(_Response):
    results: list[GenerationResult]
    response_status: ResponseStatus | None = None


class QueueResponse(_Response):
    job_id: int
    ref_id: str | None
    job_state: str
    status: str
    status_url: str
    notes: list[str] = Field(default_factory=list)  # what the router decided for the request (a family's defaults, ...)
    response_status: ResponseStatus | None = None


class JobProgress(_Response):
    """How far a running job is: ``step`` of ``total`` in ``stage`` (a ComfyUI node, say)."""

    step: int | None = None
    total: int | None = None
    stage: str | None = None


class StatusResponse(_Response):
    """GetArtifactGenerationStatus / GetTextGenerationStatus, and the body of a ReplyTo callback."""

    job_id: int
    ref_id: str | None
    job_state: str
    status: str
    progress: JobProgress | None = None
    results: list[GenerationResult] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    response_status: ResponseStatus | None = None


class JobLookup(_Response):
    """Names a job: by ``jobId``, or by the ``refId`` the caller gave it."""

    job_id: int | None = None
    ref_id: str | None = None


class JobSummary(_Response):
    """A job in the history: what was asked, who ran it, when, and how it ended."""

    job_id: int
    ref_id: str | None
    api: str
    tag: str | None
    key_id: int | None
    job_state: str
    agent: str | None
    attempts: int
    queued: dt.datetime
    started: dt.datetime | None
    finished: dt.datetime | None
    request: dict[str, Any]  # the parameters (uploaded files are in inputs)
    inputs: dict[str, str]  # field -> URL of the uploaded file
    results: list[GenerationResult]
    notes: list[str]
    error: dict[str, Any] | None

    @classmethod
    def of(cls, job: Job, links: Links) -> JobSummary:
        return cls(job_id=job.id, ref_id=job.ref_id, api=job.api, tag=job.tag, key_id=job.key_id, job_state=job.state,
                   agent=job.agent, attempts=job.attempt, queued=_when(job.created), started=_when(job.started),
                   finished=_when(job.finished), request=job.params,
                   inputs={k: links.file(v) for k, v in job.inputs.items()},
                   results=results_of(job, links), notes=job.notes, error=job.error)


class JobsResponse(_Response):
    jobs: list[JobSummary]


def _when(timestamp: float | None) -> Any:
    return dt.datetime.fromtimestamp(timestamp, dt.UTC) if timestamp is not None else None


def status_kind(results: str) -> str:
    """The status API for an API's result kind."""
    return "GetTextGenerationStatus" if results == "text" else "GetArtifactGenerationStatus"


def results_of(job: Job, links: Links) -> list[GenerationResult]:
    """A job's results; file URLs are signed (router/urls.py), so they work without a header."""
    if not job.results:
        return []
    files = [GenerationResult(url=links.file(a["name"]), file_name=a["name"], provider=job.agent)
             for a in job.results.get("artifacts", [])]
    texts = [GenerationResult(text=t) for t in job.results.get("texts", [])]
    if texts and job.results.get("details"):  # speech's language and segments (a chat's answer has its own shape)
        details = {k: v for k, v in job.results["details"].items() if k in GenerationResult.model_fields}
        texts[0] = GenerationResult.model_validate({"text": texts[0].text, **details})
    return files + texts


def status_text(job: Job, waiting_reason: str | None = None, progress: Progress | None = None) -> str:
    """The one-line ``status`` of a job: why it waits, how far it runs, or how it ended."""
    if job.state == JobState.QUEUED:
        return waiting_reason or "Queued"
    if job.state == JobState.STARTED:
        if progress is not None and progress.total:
            return f"running on {job.agent}: {progress.node or 'step'} {progress.step}/{progress.total}"
        return f"running on {job.agent}" + (f": {progress.node}" if progress is not None and progress.node else "")
    if job.error:
        return str(job.error.get("message", job.state))
    return job.state


def failure_of(job: Job, field_names: dict[str, str]) -> tuple[int, ResponseStatus]:
    status, body = failure_status(job.error or {}, field_names)
    return status, ResponseStatus.model_validate(body)


def status_of(job: Job, links: Links, text: str, progress: Progress | None,
              field_names: dict[str, str]) -> StatusResponse:
    answer = StatusResponse(job_id=job.id, ref_id=job.ref_id, job_state=job.state, status=text,
                            results=results_of(job, links), notes=job.notes)
    if job.state == JobState.STARTED and progress is not None:
        answer.progress = JobProgress(step=progress.step, total=progress.total, stage=progress.node)
    if job.state in (JobState.FAILED, JobState.CANCELLED):
        answer.response_status = failure_of(job, field_names)[1]
    return answer


class DeviceInfo(_Response):
    index: int
    name: str
    vram_total: int
    vram_free: int


class AgentInfo(_Response):
    name: str
    cpu_only: bool
    devices: list[DeviceInfo]
    loaded: list[str]  # model files in memory
    running: list[int]  # job ids
    capabilities: list[str]
    models: int
    paused: str | None = None  # why it takes no jobs for now (infrastructure failures in a row)
    draining: bool = False  # shutting down: finishing its jobs, taking no more
    router: str | None = None  # routers sharing a database: the id of the one it is connected to (None: this one)


class Dashboard(_Response):
    """The fleet now: agents, the queue, recent jobs, and jobs finished per minute over the last hour."""

    agents: list[AgentInfo]
    queue: dict[str, int]  # API -> jobs waiting
    running: int
    recent: list[JobSummary]
    throughput: list[int]
    problems: list[str] = Field(default_factory=list)  # what an operator must fix (the disk filling up)


class KeyInfo(_Response):
    id: int
    name: str
    prefix: str
    apis: list[str] | None  # None: every API
    admin: bool
    created: dt.datetime
    revoked: bool
    weight: int = 1  # its jobs a turn when keys take turns
    max_queued: int | None = None  # its jobs that may wait at once
    per_minute: int | None = None  # its jobs it may submit a minute


class KeysResponse(_Response):
    keys: list[KeyInfo]


class NewKeyResponse(_Response):
    """A new key: the token and its webhook secret are shown this once."""

    key: KeyInfo
    token: str
    webhook_secret: str
