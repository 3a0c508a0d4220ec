"""The public API: generation calls (sync and Queue*), status look-ups and artifacts.

Handlers parse, hand over to the queue, and answer; the rules live in requests.py and queue.py.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gpugate.errors import FieldError

from ..store import DuplicateRefId, Job, JobState, Key
from ..state import ARTIFACTS, CATALOG, KEY, QUEUE, SETTINGS
from .errors import ApiError, failure_status, invalid
from .requests import APIS, ApiRequest, Echo, Upload, parse, read_fields

STATUS_APIS = ("GetArtifactGenerationStatus", "GetTextGenerationStatus")


def routes(echo: bool) -> list[web.RouteDef]:
    apis = {**APIS, **({"Echo": Echo} if echo else {})}
    out = []
    for name, model in apis.items():
        out.append(web.post(f"/api/{name}", _generation(model, sync=True)))
        out.append(web.post(f"/api/Queue{name}", _generation(model, sync=False)))
    for name in STATUS_APIS:
        out += [web.get(f"/api/{name}", get_status), web.post(f"/api/{name}", get_status)]
    out.append(web.get("/artifacts/{name}", get_artifact))
    return out


def _generation(model: type[ApiRequest], *, sync: bool):  # noqa: ANN202 - an aiohttp handler
    async def handle(request: web.Request) -> web.Response:
        app, key = request.app, request[KEY]
        fields = await read_fields(request, int(app[SETTINGS].router.max_upload_mb * 2**20))
        parsed = parse(model, fields)
        job = await _submit(request, model, parsed, key)
        if sync:
            finished = await app[QUEUE].wait_finished(job.id, app[SETTINGS].router.sync_timeout_s)
            if finished is not None:
                return _finished_response(request, model, finished)
        return web.json_response(_reference(request, job))

    return handle


async def _submit(request: web.Request, model: type[ApiRequest], parsed: ApiRequest, key: Key) -> Job:
    app = request.app
    spec = parsed.job(app[CATALOG])
    inputs = {}
    for name, file in spec.files.items():
        data, ext = (file.data, file.info.extension) if isinstance(file, Upload) else (file, "")
        inputs[name] = await app[ARTIFACTS].put(data, ext)
    job = Job(id=0, api=model.__name__, capability=spec.capability, params=spec.params, inputs=inputs,
              model=spec.model, megapixels=spec.megapixels, max_attempts=app[SETTINGS].router.max_attempts,
              key_id=key.id, ref_id=parsed.ref_id, tag=parsed.tag, reply_to=parsed.reply_to)
    try:
        return app[QUEUE].submit(job)
    except DuplicateRefId:  # a retried request: the job it already made is the answer
        existing = app[QUEUE].get_by_ref(key.id, parsed.ref_id or "")
        if existing is None or existing.api != job.api:
            raise invalid([FieldError("refId", "is already used by another request")]) from None
        return app[QUEUE].get(existing.id) or existing


def _reference(request: web.Request, job: Job) -> dict[str, Any]:
    base = _base_url(request)
    model = APIS.get(job.api, Echo)
    kind = "GetTextGenerationStatus" if model.results == "text" else "GetArtifactGenerationStatus"
    return {"jobId": job.id, "refId": job.ref_id, "jobState": job.state, "status": request.app[QUEUE].status_text(job),
            "statusUrl": f"{base}/api/{kind}?jobId={job.id}", "responseStatus": None}


def _finished_response(request: web.Request, model: type[ApiRequest], job: Job) -> web.Response:
    if job.state != JobState.COMPLETED:
        status, response_status = failure_status(job.error or {}, model.field_names)
        return web.json_response({"responseStatus": response_status}, status=status)
    return web.json_response({"results": _results(request, job), "responseStatus": None})


def _results(request: web.Request, job: Job) -> list[dict[str, Any]]:
    if not job.results:
        return []
    base = _base_url(request)
    artifacts = [{"url": f"{base}/artifacts/{a['name']}", "fileName": a["name"], "provider": job.agent}
                 for a in job.results.get("artifacts", [])]
    texts = [{"text": t} for t in job.results.get("texts", [])]
    if texts and job.results.get("details"):
        texts[0].update(job.results["details"])
    return artifacts + texts


def _base_url(request: web.Request) -> str:
    configured = request.app[SETTINGS].router.public_base_url
    return (configured or f"{request.scheme}://{request.host}").rstrip("/")


async def get_status(request: web.Request) -> web.Response:
    key: Key = request[KEY]
    fields = await read_fields(request, 2**20)
    fields = {k.lower(): v for k, v in fields.items()}
    queue = request.app[QUEUE]
    job = None
    if fields.get("jobid") not in (None, ""):
        try:
            job = queue.get(int(fields["jobid"]))
        except (TypeError, ValueError):
            raise invalid([FieldError("jobId", "must be a number")]) from None
    elif fields.get("refid"):
        job = queue.get_by_ref(key.id, str(fields["refid"]))
        job = job and (queue.get(job.id) or job)
    else:
        raise invalid([FieldError("jobId", "jobId or refId is required", "required")])
    if job is None or (job.key_id != key.id and not key.admin):
        raise ApiError(404, "NotFound", "no such job")
    body: dict[str, Any] = {"jobId": job.id, "refId": job.ref_id, "jobState": job.state,
                            "status": queue.status_text(job), "results": _results(request, job), "responseStatus": None}
    if job.state in (JobState.FAILED, JobState.CANCELLED):
        model = APIS.get(job.api)
        body["responseStatus"] = failure_status(job.error or {}, model.field_names if model else {})[1]
    return web.json_response(body)


async def get_artifact(request: web.Request) -> web.StreamResponse:
    path = request.app[ARTIFACTS].path(request.match_info["name"])
    if path is None:
        raise ApiError(404, "NotFound", "no such artifact")
    return web.FileResponse(path, headers={"Cache-Control": "public, max-age=31536000, immutable"})
