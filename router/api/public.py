"""The public API: generation calls (sync and Queue*); their files are served by files.py.

Handlers parse, hand over to the queue, and answer; the rules live in requests.py and queue.py.
"""

from __future__ import annotations

import json
import math
import time

from aiohttp import web

from gpugate.errors import FieldError, InvalidRequest

from ..artifacts import Intake
from ..callbacks import reply_to_problem
from ..limits import LimitExceeded
from ..state import ARTIFACTS, DISPATCHER, FINDER, KEY, LIMITER, MODELS, QUEUE, RETENTION, SETTINGS, SIGNER
from ..store import DuplicateRefId, Job, JobState, Key
from ..urls import Links
from .errors import ApiError, invalid
from .requests import APIS, ApiRequest, Echo, JobSpec, Limits, Tracked, Upload, parse, read_fields
from .responses import ErrorResponse, GenerationResponse, QueueResponse, failure_of, results_of, status_kind


PARAMS_MAX = 2**20  # bytes of a job's parameters as JSON (files travel apart)


def routes(echo: bool) -> list[web.RouteDef]:
    apis = {**APIS, **({"Echo": Echo} if echo else {})}
    out = []
    for name, model in apis.items():
        out.append(web.post(f"/api/{name}", _generation(model, sync=True)))
        out.append(web.post(f"/api/Queue{name}", _generation(model, sync=False)))
    return out


def _generation(model: type[ApiRequest], *, sync: bool):  # noqa: ANN202 - an aiohttp handler
    async def handle(request: web.Request) -> web.Response:
        app, key = request.app, request[KEY]
        if request.content_type == "multipart/form-data" and (problem := app[RETENTION].disk_problem()):
            raise ApiError(507, "InsufficientStorage", problem)
        async with app[ARTIFACTS].intake() as intake:  # uploads not kept by a submitted job are removed
            fields = await read_fields(request, Limits.of(app[SETTINGS].router), intake)
            job = await _submit(request, model, parse(model, fields), key, intake)
        if sync:
            return await answer_when_done(request, job, model)
        return web.json_response(_reference(request, job).body())

    return handle


async def answer_when_done(request: web.Request, job: Job, model: type[ApiRequest]) -> web.Response:
    """A sync call's answer: the finished job, or its reference at once when no connected agent
    can take it (no agent has the model, the memory, the workflow), or after the sync timeout."""
    app = request.app
    if job.state == JobState.QUEUED and app[DISPATCHER].cannot_place(job, time.time()) is not None:
        return web.json_response(_reference(request, job).body())
    finished = await app[QUEUE].wait_finished(job, app[SETTINGS].router.sync_timeout_s)
    if finished is not None:
        return _finished_response(request, model, finished)
    return web.json_response(_reference(request, job).body())


async def _submit(request: web.Request, model: type[ApiRequest], parsed: ApiRequest, key: Key, intake: Intake) -> Job:
    try:
        spec = parsed.job(request.app[MODELS])
    except InvalidRequest as exc:
        raise invalid(exc.errors) from None
    return await enqueue(request, model.__name__, spec, parsed, intake)


async def enqueue(request: web.Request, api: str, spec: JobSpec, parsed: ApiRequest | Tracked,
                  intake: Intake | None = None) -> Job:
    """Queue the job ``spec`` describes for the calling key (its uploads kept from ``intake``);
    a refId the key already used answers with the job it made."""
    app, key = request.app, request[KEY]
    if parsed.ref_id and (existing := await app[FINDER].get_by_ref(key.id, parsed.ref_id)) is not None \
            and existing.api == api:  # a retried request: the job it already made is the answer
        return existing
    if len(json.dumps(spec.params)) > PARAMS_MAX:  # a job travels to its agent in one websocket message
        raise ApiError(413, "RequestEntityTooLarge", f"the job's parameters are larger than {PARAMS_MAX // 2**20} MB")
    if parsed.reply_to and (problem := await reply_to_problem(parsed.reply_to,
                                                              app[SETTINGS].router.callback_allow_networks)):
        raise invalid([FieldError("replyTo", problem)])
    inputs = {}
    for name, file in spec.files.items():
        assert intake is not None
        received, ext = (file.file, file.info.extension) if isinstance(file, Upload) else (file, "")
        inputs[name] = await intake.keep(received, ext)
    try:  # right before the job is queued, nothing awaited between: concurrent requests count each other
        app[LIMITER].admit(key, app[QUEUE].live.values(), time.monotonic())
    except LimitExceeded as exc:
        await app[ARTIFACTS].remove(inputs.values())
        retry = {"Retry-After": str(math.ceil(exc.retry_after_s))} if exc.retry_after_s is not None else None
        raise ApiError(429, "TooManyRequests", exc.message, headers=retry) from None
    job = Job(id=0, api=api, capability=spec.capability, params=spec.params, inputs=inputs,
              model=spec.model, megapixels=spec.megapixels, max_attempts=app[SETTINGS].router.max_attempts, notes=spec.notes,
              key_id=key.id, ref_id=parsed.ref_id, tag=parsed.tag, reply_to=parsed.reply_to,
              base_url=base_url(request) if parsed.reply_to else None)
    try:
        return await app[QUEUE].submit(job)
    except DuplicateRefId:  # a retried request: the job it already made is the answer, with its own files
        app[LIMITER].refund(key)
        await app[ARTIFACTS].remove(inputs.values())
        existing = await app[FINDER].get_by_ref(key.id, parsed.ref_id or "")
        if existing is None or existing.api != job.api:
            raise invalid([FieldError("refId", "is already used by another request")]) from None
        return existing


def _reference(request: web.Request, job: Job) -> QueueResponse:
    kind = status_kind(APIS.get(job.api, Echo).results)
    return QueueResponse(job_id=job.id, ref_id=job.ref_id, job_state=job.state, status=request.app[QUEUE].status_text(job),
                         notes=job.notes,
                         status_url=f"{base_url(request)}/api/{kind}?jobId={job.id}")


def _finished_response(request: web.Request, model: type[ApiRequest], job: Job) -> web.Response:
    if job.state != JobState.COMPLETED:
        status, response_status = failure_of(job, model.field_names)
        return web.json_response(ErrorResponse(response_status=response_status).body(), status=status)
    return web.json_response(GenerationResponse(results=results_of(job, links(request))).body())


def base_url(request: web.Request) -> str:
    """Where clients reach this router: the configured public URL, else the one they called."""
    configured = request.app[SETTINGS].router.public_base_url
    return (configured or f"{request.scheme}://{request.host}").rstrip("/")


def links(request: web.Request) -> Links:
    """File URLs for an answer to this request: at the address the client used, freshly signed."""
    return Links(base_url(request), request.app[SIGNER], time.time())


