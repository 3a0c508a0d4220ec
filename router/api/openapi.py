"""/openapi.json: an OpenAPI 3.1 document of every public API, generated from the pydantic models
that validate the requests (requests.py, jobs.py, admin.py) and shape the answers (responses.py).
There is no second copy to keep in step: a field added to a model appears here.
"""

from __future__ import annotations

import functools
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from gpugate import __version__

from ..chat import ChatRequest
from . import responses as r
from .admin import NewKeyRequest, RevokeKeyRequest, SetLimitsRequest
from .files import DeleteFileRequest, DeleteFilesRequest, DeleteFilesResponse
from .jobs import STATUS_APIS, JobFilter
from .requests import APIS, ApiRequest, Echo, Transform

REF = "#/components/schemas/{model}"
ERRORS = {"400": "A field is invalid (one entry per field)", "401": "No valid API key",
          "403": "This key may not call this API, or a signed URL is altered, forged or expired",
          "404": "No such job or file", "413": "An upload is too large", "500": "The job failed on its agent",
          "503": "No connected agent could take the job", "507": "The router's file store is low on space"}


def routes() -> list[web.RouteDef]:
    return [web.get("/openapi.json", serve)]


async def serve(request: web.Request) -> web.Response:
    from ..state import MODELS, SETTINGS

    return web.json_response(with_workflows(document(request.app[SETTINGS].router.echo_api), request.app[MODELS]))


def with_workflows(static: dict[str, Any], models: Any) -> dict[str, Any]:
    """The document plus, for each workflow a connected agent serves now, the schema of its
    arguments (``workflow.NAME``), referenced from ComfyWorkflow's ``args``."""
    schemas = dict(static["components"]["schemas"])
    served = models.workflows()
    for name, (capability, agents) in served.items():
        properties = {k: _param_schema(p) for k, p in (capability.params or {}).items()}
        schemas[f"workflow.{name}"] = {
            "type": "object", "title": name, "description": f"{capability.description} (served by {', '.join(agents)})",
            "properties": properties, "required": [k for k, p in (capability.params or {}).items() if p.required],
            "additionalProperties": False}
    if served:
        args = {"oneOf": [{"$ref": REF.format(model=f"workflow.{n}")} for n in served]}
        schemas["ComfyWorkflow"] = {**schemas["ComfyWorkflow"], "properties": {
            **schemas["ComfyWorkflow"]["properties"], "workflow": {"type": "string", "enum": list(served)}, "args": args}}
    return {**static, "components": {**static["components"], "schemas": schemas}}


def _param_schema(param: Any) -> dict[str, Any]:
    kinds = {"int": "integer", "seed": "integer", "float": "number", "bool": "boolean"}
    if param.type == "image":
        return {"type": "string", "format": "binary", "contentMediaType": "image/*", "description": param.description}
    schema: dict[str, Any] = {"type": kinds.get(param.type, "string"), "description": param.description}
    for key, value in (("minimum", param.min), ("maximum", param.max), ("multipleOf", param.step),
                       ("enum", param.values), ("default", param.default)):
        if value is not None:
            schema[key] = value
    return schema


@functools.cache
def document(echo: bool = False) -> dict[str, Any]:
    apis = {**APIS, **({"Echo": Echo} if echo else {})}
    inputs: list[type[BaseModel]] = [*apis.values(), r.JobLookup, JobFilter, NewKeyRequest, RevokeKeyRequest, SetLimitsRequest,
                                     DeleteFileRequest, DeleteFilesRequest, ChatRequest, QueuedChat]
    outputs: list[type[BaseModel]] = [r.GenerationResponse, r.QueueResponse, r.StatusResponse, r.ErrorResponse,
                                      r.JobsResponse, r.Dashboard, r.KeysResponse, r.NewKeyResponse, r.KeyInfo,
                                      DeleteFilesResponse]
    _, schemas = models_json_schema([(m, "validation") for m in inputs] + [(m, "serialization") for m in outputs],
                                    by_alias=True, ref_template=REF)
    paths: dict[str, Any] = {}
    for name, model in apis.items():
        group = "media" if issubclass(model, Transform) else ("speech" if name in ("SpeechToText", "TextToSpeech") else "generation")
        body = _request_body(model, schemas["$defs"][model.__name__])
        sync = {"anyOf": [_ref(r.GenerationResponse), _ref(r.QueueResponse)]}
        paths[f"/api/{name}"] = {"post": _operation(name, group, _summary(model), body, sync,
                                                    "The results; or, past the sync timeout, the job's reference")}
        paths[f"/api/Queue{name}"] = {"post": _operation(f"Queue{name}", group, f"Queue {_summary(model)[0].lower()}"
                                                         f"{_summary(model)[1:]}; poll the status or pass replyTo",
                                                         body, _ref(r.QueueResponse), "The job's reference")}
    lookup = _json_body(r.JobLookup)
    lookup_params = [_query("jobId", {"type": "integer"}), _query("refId", {"type": "string"})]
    for name in STATUS_APIS:
        paths[f"/api/{name}"] = _get_and_post(name, "jobs", "A job's state, progress while it runs, and results",
                                              lookup_params, lookup, _ref(r.StatusResponse))
    paths["/api/CancelJob"] = _get_and_post("CancelJob", "jobs", "Cancel a queued or running job",
                                            lookup_params, lookup, _ref(r.StatusResponse))
    paths["/api/GetJobEvents"] = {"get": _operation(
        "GetJobEvents", "jobs", "Server-sent events: the job's status on each progress, then its result", None,
        None, "text/event-stream; each event's data is a StatusResponse", params=lookup_params,
        content={"text/event-stream": {"schema": {"type": "string"}}})}
    filter_params = [_query(k, v) for k, v in schemas["$defs"]["JobFilter"]["properties"].items()]
    paths["/api/QueryJobs"] = _get_and_post("QueryJobs", "jobs", "Jobs by refId, tag, key, state and date",
                                            filter_params, _json_body(JobFilter), _ref(r.JobsResponse))
    paths["/api/GetDashboard"] = {"get": _operation("GetDashboard", "admin", "Agents, queue and recent jobs (admin)",
                                                    None, _ref(r.Dashboard), "The fleet now")}
    paths["/api/GetDashboardEvents"] = {"get": _operation(
        "GetDashboardEvents", "admin", "The dashboard as server-sent events, once a second (admin)", None, None,
        "text/event-stream; each event's data is a Dashboard", content={"text/event-stream": {"schema": {"type": "string"}}})}
    paths["/api/ListApiKeys"] = {"get": _operation("ListApiKeys", "admin", "The API keys (admin)", None,
                                                   _ref(r.KeysResponse), "The keys, never their tokens")}
    paths["/api/CreateApiKey"] = {"post": _operation("CreateApiKey", "admin", "Make an API key (admin)",
                                                     _json_body(NewKeyRequest), _ref(r.NewKeyResponse), "The new key")}
    paths["/api/RevokeApiKey"] = {"post": _operation("RevokeApiKey", "admin", "Revoke an API key (admin)",
                                                     _json_body(RevokeKeyRequest), _ref(r.KeyInfo), "The revoked key")}
    paths["/api/SetApiKeyLimits"] = {"post": _operation(
        "SetApiKeyLimits", "admin", "A key's weight, queued-job cap and jobs a minute (admin)",
        _json_body(SetLimitsRequest), _ref(r.KeyInfo), "The key with its new limits")}
    signed = [_query("exp", {"type": "integer"}), _query("sig", {"type": "string"}),
              _query("download", {"type": "boolean"})]
    name = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
    binary = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    paths["/artifacts/{name}"] = {"get": _operation(
        "GetArtifact", "files", "A result or uploaded file: by its signed URL (no key needed) or the owner's key",
        None, None, "The file", params=[name, *signed], content=binary)}
    paths["/variants/{variant}/{name}"] = {"get": _operation(
        "GetVariant", "files", "A WebP copy of an image at width=W, height=H or both (made once, then cached)",
        None, None, "The variant", content={"image/webp": {"schema": {"type": "string", "format": "binary"}}},
        params=[{"name": "variant", "in": "path", "required": True, "schema": {"type": "string", "examples": ["width=256"]}},
                name, *signed])}
    deleted = _ref(DeleteFilesResponse)
    paths["/api/DeleteFile"] = {
        "delete": _operation("DeleteFile", "files", "Delete one of your files (and its variants)", None, deleted,
                             "What was deleted", params=[{**_query("path", {"type": "string"}), "required": True}]),
        "post": _operation("DeleteFilePost", "files", "Delete one of your files (and its variants)",
                           _json_body(DeleteFileRequest), deleted, "What was deleted")}
    paths["/api/DeleteFiles"] = {"post": _operation(
        "DeleteFiles", "files", "Delete your files: each is deleted, missing or failed (not yours, or in use)",
        _json_body(DeleteFilesRequest), deleted, "What was deleted")}
    for name, summary in (("ActiveMediaModels", "The ids of the models some connected agent can serve now"),
                          ("QueryMediaModels", "Image models: catalog and agents, with family, tasks and defaults"),
                          ("QueryTextToSpeechVoices", "Piper voices: catalog and agents"),
                          ("GetComfyModels", "The model files connected agents' ComfyUIs can load"),
                          ("GetComfyWorkflows", "The workflows connected agents serve"),
                          ("GetComfyWorkflowInfo", "One workflow: description, parameters (types, limits, defaults), agents")):
        paths[f"/api/{name}"] = {"get": _operation(name, "discovery", summary, None, {"type": "object"}, "OK",
                                                   params=[_query(q, {"type": "string"}) for q in
                                                           {"QueryMediaModels": ("id", "skip", "take"),
                                                            "GetComfyWorkflowInfo": ("workflow",)}.get(name, ())])}
    _chat_paths(paths, lookup_params, lookup)
    paths["/metrics"] = {"get": _operation("GetMetrics", "admin", "Prometheus metrics (admin)", None, None,
                                           "Prometheus text format", content={"text/plain": {"schema": {"type": "string"}}})}
    paths["/health"] = {"get": {"operationId": "Health", "tags": ["admin"], "summary": "Liveness", "security": [],
                                "responses": {"200": {"description": "The router is up"}}}}
    return {"openapi": "3.1.0",
            "info": {"title": "gpugate", "version": __version__,
                     "description": "AI Server's public API on your own GPUs: generation, speech and media jobs, "
                                    "sync or queued, with signed ReplyTo callbacks."},
            "paths": paths,
            "components": {"schemas": schemas["$defs"],
                           "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                                          "description": "Authorization: Bearer <api key>"}}},
            "security": [{"apiKey": []}]}


class QueuedChat(BaseModel):
    """QueueOpenAiChatCompletion's body: the OpenAI request, and the job's refId, tag and replyTo."""

    model_config = ConfigDict(populate_by_name=True)
    request: ChatRequest
    ref_id: str | None = Field(None, alias="refId")
    tag: str | None = None
    reply_to: str | None = Field(None, alias="replyTo")


def _chat_paths(paths: dict[str, Any], lookup_params: list[dict[str, Any]], lookup: dict[str, Any]) -> None:
    """Chat: OpenAI's two endpoints and AI Server's chat APIs (router/api/chat.py)."""
    completion = {"type": "object", "description": "OpenAI's chat.completion object"}
    chat_body = _json_body(ChatRequest)
    paths["/v1/chat/completions"] = {"post": _operation(
        "CreateChatCompletion", "chat", "OpenAI's chat completion (stream: true answers server-sent chunks)",
        chat_body, completion, "OpenAI's chat.completion, or with stream: text/event-stream of chat.completion.chunk")}
    paths["/v1/models"] = {"get": _operation("ListModels", "chat", "OpenAI's model list: the chat models served now",
                                             None, {"type": "object"}, "OpenAI's list of models")}
    paths["/api/OpenAiChatCompletion"] = {"post": _operation(
        "OpenAiChatCompletion", "chat", "A chat (the OpenAI request, plus refId and tag); OpenAI's answer", chat_body,
        {"anyOf": [completion, _ref(r.QueueResponse)]}, "The answer; or, past the sync timeout, the job's reference")}
    paths["/api/QueueOpenAiChatCompletion"] = {"post": _operation(
        "QueueOpenAiChatCompletion", "chat", "Queue a chat; poll GetOpenAiChatStatus or pass replyTo",
        _json_body(QueuedChat), {"type": "object"}, "The job's reference: id, refId, statusUrl")}
    status = {"type": "object", "description": "jobId, refId, jobState, status, result (OpenAI's chat.completion)"}
    for name, summary in (("GetOpenAiChatStatus", "A chat's state and, once completed, its answer"),
                          ("GetOpenAiChat", "A chat job and its answer"),
                          ("WaitForOpenAiChat", "A chat's answer, waiting up to the sync timeout")):
        paths[f"/api/{name}"] = _get_and_post(name, "chat", summary, [*lookup_params, _query("id", {"type": "integer"})],
                                              lookup, status)
    paths["/api/ActiveAiModels"] = {"get": _operation("ActiveAiModels", "chat", "The chat models served now", None,
                                                      {"type": "object"}, "results: model ids")}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def _summary(model: type[BaseModel]) -> str:
    doc = (model.__dict__.get("__doc__") or "").strip()
    return doc.splitlines()[0] if doc else model.__name__


def _request_body(model: type[ApiRequest], schema: dict[str, Any]) -> dict[str, Any]:
    """Multipart always (files are parts); JSON too when the API takes no file."""
    has_files = any(p.get("format") == "binary" for p in schema.get("properties", {}).values())
    content = {"multipart/form-data": {"schema": _ref(model)}}
    if not has_files:
        content["application/json"] = {"schema": _ref(model)}
    return {"required": True, "content": content}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}


def _query(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _operation(operation_id: str, tag: str, summary: str, body: dict[str, Any] | None, schema: dict[str, Any] | None,
               description: str, params: list[dict[str, Any]] | None = None,
               content: dict[str, Any] | None = None) -> dict[str, Any]:
    ok = {"description": description, "content": content or {"application/json": {"schema": schema}}}
    operation: dict[str, Any] = {"operationId": operation_id, "tags": [tag], "summary": summary,
                                 "responses": {"200": ok, **{code: {"description": text, "content": {
                                     "application/json": {"schema": _ref(r.ErrorResponse)}}} for code, text in ERRORS.items()}}}
    if body is not None:
        operation["requestBody"] = body
    if params:
        operation["parameters"] = params
    return operation


def _get_and_post(name: str, tag: str, summary: str, params: list[dict[str, Any]], body: dict[str, Any],
                  schema: dict[str, Any]) -> dict[str, Any]:
    return {"get": _operation(name, tag, summary, None, schema, "OK", params=params),
            "post": _operation(f"{name}Post", tag, summary, body, schema, "OK")}
