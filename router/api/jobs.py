"""Jobs after submission: status (with progress), a live event stream, cancel, and the history.

Every look-up takes ``jobId`` or ``refId`` and finds the job live, finished or archived; a key
sees its own jobs, an admin key every job.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from typing import Any

from aiohttp import web
from pydantic import BaseModel, Field, ValidationError

from gpugate.errors import FieldError
from gpugate.wire import Delta

from ..state import FINDER, KEY, OUTCOMES, QUEUE
from ..events import CLOSING
from ..store import Job, JobQuery, JobState, Key
from .errors import ApiError, invalid
from .public import links
from .requests import APIS, read_fields
from .responses import JobSummary, JobsResponse, StatusResponse, status_of

STATUS_APIS = ("GetArtifactGenerationStatus", "GetTextGenerationStatus")
KEEPALIVE_S = 15.0
MAX_ID = 2**63  # SQLite's integers


def routes() -> list[web.RouteDef]:
    out = []
    for name, handler in ((n, get_status) for n in STATUS_APIS):
        out += [web.get(f"/api/{name}", handler), web.post(f"/api/{name}", handler)]
    out += [web.get("/api/CancelJob", cancel_job), web.post("/api/CancelJob", cancel_job),
            web.get("/api/GetJobEvents", job_events),
            web.get("/api/QueryJobs", query_jobs), web.post("/api/QueryJobs", query_jobs)]
    return out


async def find_job(request: web.Request, aliases: dict[str, str] | None = None) -> Job:
    """The caller's job named by jobId or refId (or an API's own name for them: ``aliases``, as
    AI Server's ``id``); 400 without either, 404 if not theirs or unknown."""
    key: Key = request[KEY]
    fields = {k.lower(): v for k, v in (await read_fields(request)).items()}
    for alias, name in (aliases or {}).items():
        if fields.get(alias.lower()) not in (None, "") and fields.get(name.lower()) in (None, ""):
            fields[name.lower()] = fields[alias.lower()]
    finder = request.app[FINDER]
    if fields.get("jobid") not in (None, ""):
        try:
            job_id = int(fields["jobid"])
        except (TypeError, ValueError):
            raise invalid([FieldError("jobId", "must be a number")]) from None
        if not 0 < job_id < MAX_ID:
            raise invalid([FieldError("jobId", "no job has this id", "out_of_range")])
        job = await finder.get(job_id)
    elif fields.get("refid"):
        job = await finder.get_by_ref(key.id, str(fields["refid"]))
    else:
        raise invalid([FieldError("jobId", "jobId or refId is required", "required")])
    if job is None or (job.key_id != key.id and not key.admin):
        raise ApiError(404, "NotFound", "no such job")
    return job


def _status(request: web.Request, job: Job) -> StatusResponse:
    queue = request.app[QUEUE]
    model = APIS.get(job.api)
    return status_of(job, links(request), queue.status_text(job), queue.progress.get(job.id),
                     model.field_names if model else {})


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(_status(request, await find_job(request)).body())


async def cancel_job(request: web.Request) -> web.Response:
    """Cancel a queued job (dropped) or a running one (stopped on its agent); both end Cancelled."""
    job = await find_job(request)
    if not await request.app[OUTCOMES].cancel(job, f"cancelled by key {request[KEY].id}"):
        raise ApiError(409, "InvalidState", f"job {job.id} has already ended: {job.state}")
    return web.json_response(_status(request, job).body())


async def job_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events for one job: its status now, on each progress, and when it ends (then the
    stream closes). Each event's data is the status body; the last one's event name is ``result``."""
    job = await find_job(request)
    queue, finder = request.app[QUEUE], request.app[FINDER]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    with queue.events.watch(job.id) as events, contextlib.suppress(ConnectionResetError):  # or the client left
        job = await finder.get(job.id) or job  # it may have finished before the watch began
        if job.state in (JobState.QUEUED, JobState.STARTED):
            await _event(response, "progress", _status(request, job))
        while job.state in (JobState.QUEUED, JobState.STARTED):
            try:
                async with asyncio.timeout(KEEPALIVE_S):
                    event = await events.get()
            except TimeoutError:
                await response.write(b": keep-alive\n\n")
                continue
            if isinstance(event, Job):
                job = event
            elif event is CLOSING:  # the router is stopping: the client reconnects to the next one
                return response
            elif isinstance(event, Delta):  # a chat's tokens: its status says nothing new
                continue
            else:
                await _event(response, "progress", _status(request, job))
        await _event(response, "result", _status(request, job))
        await response.write_eof()
    return response


async def _event(response: web.StreamResponse, name: str, status: StatusResponse) -> None:
    await response.write(f"event: {name}\ndata: {json.dumps(status.body())}\n\n".encode())


class JobFilter(BaseModel):
    """QueryJobs' fields; dates are ISO 8601 (a date or a date and time, UTC unless it says)."""

    ref_id: str | None = Field(None, alias="refId")
    tag: str | None = None
    key_id: int | None = Field(None, alias="keyId", ge=1, lt=MAX_ID)
    state: str | None = Field(None, pattern="^(Queued|Started|Completed|Failed|Cancelled)$")
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    limit: int = Field(100, ge=1, le=1000)

    def query(self, key: Key | None) -> JobQuery:
        """The search; a client key only ever sees its own jobs (None: an operator on the command line)."""
        return JobQuery(ref_id=self.ref_id, tag=self.tag, key_id=key.id if key and not key.admin else self.key_id,
                        state=self.state,
                        since=_timestamp(self.since), until=_timestamp(self.until), limit=self.limit)


def _timestamp(when: dt.datetime | None) -> float | None:
    if when is None:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


async def query_jobs(request: web.Request) -> web.Response:
    """Jobs by refId, tag, key (admin only), state and date, newest first, live and archived."""
    fields: dict[str, Any] = {k: v for k, v in (await read_fields(request)).items() if v not in ("", None)}
    try:
        filters = JobFilter.model_validate(fields)
    except ValidationError as exc:
        raise invalid([FieldError(".".join(map(str, e["loc"])) or "query", e["msg"]) for e in exc.errors()]) from None
    jobs = await request.app[FINDER].find(filters.query(request[KEY]))
    found = links(request)
    return web.json_response(JobsResponse(jobs=[JobSummary.of(j, found) for j in jobs]).body())
