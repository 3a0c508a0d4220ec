"""Chat: OpenAI's ``POST /v1/chat/completions`` (plain or streamed) and ``GET /v1/models``, and AI
Server's OpenAiChatCompletion, QueueOpenAiChatCompletion, GetOpenAiChatStatus, GetOpenAiChat,
WaitForOpenAiChat and ActiveAiModels.

A chat is a job like any other (queue, keys, QueryJobs, archives, callbacks, cancel); what the
agent streams reaches the client as it comes: each Delta of the job becomes an SSE chunk. A client
that leaves a stream cancels its job, which stops the generation on the agent. If the agent dies
mid-answer, the job runs again with the same seed, and the stream goes on after the text the
client already has.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from gpugate.errors import FieldError, InvalidRequest
from gpugate.wire import Delta

from ..chat import API, CAPABILITY, KIND, ChatRequest, chat_status_body, chunk, completion, usage_chunk
from ..events import CLOSING
from ..state import DISPATCHER, FINDER, MODELS, OUTCOMES, QUEUE, SETTINGS
from ..store import Job, JobState
from .discovery import ids_served
from .errors import ApiError, failure_status, invalid, openai_type
from .jobs import find_job
from .public import base_url, enqueue
from .requests import JobSpec, Tracked, read_fields

KEEPALIVE_S = 15.0
DISCONNECT_POLL_S = 1.0  # how often an unstreamed chat's wait looks whether its client is still there


def routes() -> list[web.RouteDef]:
    out = [web.post("/v1/chat/completions", openai_completions), web.get("/v1/models", openai_models),
           web.get("/v1/models/{model}", openai_model),
           web.post(f"/api/{API}", chat_sync), web.post(f"/api/Queue{API}", chat_queue)]
    for name, handler in (("GetOpenAiChatStatus", chat_status), ("GetOpenAiChat", chat_status),
                          ("WaitForOpenAiChat", wait_for_chat), ("ActiveAiModels", active_models)):
        out += [web.get(f"/api/{name}", handler), web.post(f"/api/{name}", handler)]
    return out


def _parse(fields: dict[str, Any], prefix: str = "") -> ChatRequest:
    try:
        return ChatRequest.model_validate(fields)
    except ValidationError as exc:
        raise invalid([FieldError(prefix + _where(e["loc"]), str(e["msg"]).removeprefix("Value error, "),
                                  "required" if e["type"] == "missing" else "invalid") for e in exc.errors()]) from None


def _where(loc: tuple[Any, ...]) -> str:
    """A pydantic location as OpenAI names parameters: messages[0].role."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "body"


async def _submit(request: web.Request, chat: ChatRequest, tracked: Tracked, prefix: str = "") -> Job:
    try:
        params, model, notes = chat.job_params(request.app[MODELS])
    except InvalidRequest as exc:
        raise invalid([FieldError(prefix + e.field, e.message, e.code) for e in exc.errors]) from None
    return await enqueue(request, API, JobSpec(CAPABILITY, params, {}, model, 0.0, notes), tracked)


# ---- OpenAI ---------------------------------------------------------------------------------------


async def openai_completions(request: web.Request) -> web.StreamResponse:
    fields = await _json(request)
    chat = _parse(fields)
    job = await _submit(request, chat, Tracked(ref_id=None))
    if chat.stream:
        return await _stream(request, job, include_usage=bool(chat.stream_options and chat.stream_options.include_usage))
    finished = await _until_finished(request, job)
    if finished is None:  # the client left (its chat was cancelled): nobody reads this
        return web.Response(status=499, text="client closed the request")
    if finished.state != JobState.COMPLETED:
        raise _failure(finished)
    return web.json_response(completion(finished))


def _failure(job: Job) -> ApiError:
    """A chat that ended without an answer, as the error its client gets (naming the field, if a field was wrong)."""
    status, body = failure_status(job.error or {}, {})
    errors = [FieldError(e["field"], e["message"], e.get("code", "invalid")) for e in (job.error or {}).get("errors", [])]
    return ApiError(status, body["errorCode"], body["message"], errors)


async def openai_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": i, "object": "model", "created": 0, "owned_by": "gpugate"}
                                                         for i in ids_served(request.app[MODELS], KIND)]})


async def openai_model(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    if model not in ids_served(request.app[MODELS], KIND):
        raise ApiError(404, "model_not_found", f"the model {model!r} is not served now",
                       [FieldError("model", f"{model!r} is not served now", "model_not_found")])
    return web.json_response({"id": model, "object": "model", "created": 0, "owned_by": "gpugate"})


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise invalid([FieldError("body", "must be a JSON object (Content-Type: application/json)")]) from None
    if not isinstance(body, dict):
        raise invalid([FieldError("body", "must be a JSON object")])
    return body


async def _until_finished(request: web.Request, job: Job) -> Job | None:
    """The job once it ended. A job no connected agent could take is cancelled and answered with
    the reason at once (an OpenAI client does not come back for it); so is one whose client left,
    or that runs past ``router.chat_timeout_s`` (None: the client left). When the router stops
    meanwhile the job goes on (503: its client may ask GetOpenAiChatStatus, or again)."""
    app = request.app
    queue = app[QUEUE]
    if job.state == JobState.QUEUED and (reason := app[DISPATCHER].cannot_place(job, time.time())) is not None:
        await app[OUTCOMES].cancel(job, reason)
        raise ApiError(503, "Unschedulable", reason)
    deadline = time.monotonic() + app[SETTINGS].router.chat_timeout_s
    while (finished := await queue.wait_finished(job, min(DISCONNECT_POLL_S, deadline - time.monotonic()))) is None:
        if queue.events.closing:
            raise ApiError(503, "ShuttingDown", f"the router is restarting; chat {job.id} goes on: ask "
                                                f"GetOpenAiChatStatus?jobId={job.id}")
        if request.transport is None or request.transport.is_closing():
            await app[OUTCOMES].cancel(job, "the client left")
            return None
        if time.monotonic() >= deadline:
            await app[OUTCOMES].cancel(job, "ran past router.chat_timeout_s")
            raise ApiError(504, "Timeout", f"the chat did not finish within {app[SETTINGS].router.chat_timeout_s:.0f}s")
    return finished


async def _stream(request: web.Request, job: Job, include_usage: bool) -> web.StreamResponse:
    """The answer as server-sent events: OpenAI's chunks as the agent streams, then [DONE]. The
    response starts with the first text (or a keep-alive), so a chat refused before any text (a
    conversation longer than the context) is still an HTTP error like the unstreamed call's."""
    app = request.app
    queue, finder = app[QUEUE], app[FINDER]
    if job.state == JobState.QUEUED and (reason := app[DISPATCHER].cannot_place(job, time.time())) is not None:
        await app[OUTCOMES].cancel(job, reason)
        raise ApiError(503, "Unschedulable", reason)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})

    async def send(data: dict[str, Any] | str) -> None:
        if not response.prepared:
            await response.prepare(request)
            await send(chunk(job, {"role": "assistant", "content": ""}))
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        await response.write(f"data: {text}\n\n".encode())

    deadline = time.monotonic() + app[SETTINGS].router.chat_timeout_s
    with queue.events.watch(job.id) as events:
        try:
            text = SentText()
            job = await finder.get(job.id) or job  # it may have ended before the watch began
            while job.state in (JobState.QUEUED, JobState.STARTED):
                if time.monotonic() >= deadline:
                    await app[OUTCOMES].cancel(job, "ran past router.chat_timeout_s")
                    deadline = math.inf  # its end arrives as an event
                try:
                    async with asyncio.timeout(min(KEEPALIVE_S, max(deadline - time.monotonic(), 0.01))):
                        event = await events.get()
                except TimeoutError:
                    if not response.prepared:
                        await response.prepare(request)
                    await response.write(b": keep-alive\n\n")
                    continue
                if isinstance(event, Delta):
                    if new := text.add(event.attempt, event.offset, event.text):
                        await send(chunk(job, {"content": new}))
                elif isinstance(event, Job):
                    job = event
                elif event is CLOSING:
                    await send({"error": {"message": f"the router is restarting; chat {job.id} goes on: ask "
                                                     f"GetOpenAiChatStatus?jobId={job.id}",
                                          "type": "server_error", "param": None, "code": "shutdown"}})
                    return response
            final = completion(job)
            if final is None and not response.prepared:  # nothing sent yet: an HTTP error, as without stream
                raise _failure(job)
            if final is None:
                error = _failure(job)
                await send({"error": {"message": error.message, "type": openai_type(error.status),
                                      "param": error.errors[0].field if error.errors else None, "code": error.code}})
            elif (rest := text.rest(final["choices"][0]["message"]["content"])) is None:
                await send({"error": {"message": "the chat's agent failed mid-answer and the answer made again "
                                                 "differs from what was streamed; ask again", "type": "server_error",
                                      "param": None, "code": "diverged"}})
            else:
                if rest:
                    await send(chunk(job, {"content": rest}))
                await send(chunk(job, {}, final["choices"][0]["finish_reason"]))
                if include_usage:
                    await send(usage_chunk(job, final))
            await send("[DONE]")
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):  # the client left: stop generating for it
            with contextlib.suppress(Exception):
                await app[OUTCOMES].cancel(job, "the client closed the stream")
            raise
    return response


class SentText:
    """What a stream has sent of a chat's text, across attempts: a piece is sent once it extends
    what the client has. A gap (deltas lost while the agent reconnected) stops the pieces of that
    attempt: the final text fills in the rest. An attempt run again (its agent died) is sent only
    past what the client has; if it differs from it (``rest`` is None), the stream says so."""

    def __init__(self) -> None:
        self.sent = ""
        self.attempt: int | None = None
        self.current = ""  # this attempt's text so far
        self.broken = False  # this attempt had a gap or differs from what was sent

    def add(self, attempt: int, offset: int, piece: str) -> str:
        """What to send of ``piece`` (which starts at ``offset`` of attempt ``attempt``'s text)."""
        if attempt != self.attempt:
            self.attempt, self.current, self.broken = attempt, "", False
        if self.broken or offset != len(self.current):
            self.broken = True
            return ""
        before, sent = len(self.current), len(self.sent)
        self.current += piece
        if before < sent:  # catching up with what an earlier attempt sent: it must say the same
            same = self.sent.startswith(self.current) if len(self.current) <= sent else self.current.startswith(self.sent)
            if not same:
                self.broken = True
                return ""
        if len(self.current) <= sent:
            return ""
        new = self.current[sent:]
        self.sent = self.current
        return new

    def rest(self, final: str) -> str | None:
        """What the client still lacks of the final text; None if what it has is not its beginning."""
        return final[len(self.sent):] if final.startswith(self.sent) else None


# ---- AI Server --------------------------------------------------------------------------------------


async def chat_sync(request: web.Request) -> web.Response:
    """OpenAiChatCompletion: the OpenAI request's fields plus refId and tag; the OpenAI answer."""
    fields = await read_fields(request)
    chat = _parse(fields)
    if chat.stream:
        raise invalid([FieldError("stream", "use POST /v1/chat/completions to stream")])
    job = await _submit(request, chat, _tracked(fields))
    finished = await request.app[QUEUE].wait_finished(job, request.app[SETTINGS].router.sync_timeout_s)
    if finished is None:
        return web.json_response(_reference(request, job))
    if finished.state != JobState.COMPLETED:
        status, body = failure_status(finished.error or {}, {})
        return web.json_response({"responseStatus": body}, status=status)
    return web.json_response(completion(finished))


async def chat_queue(request: web.Request) -> web.Response:
    """QueueOpenAiChatCompletion: {refId, provider, replyTo, tag, request: <OpenAI request>}."""
    fields = await read_fields(request)
    body = fields.get("request")
    if isinstance(body, str):
        with contextlib.suppress(ValueError):
            body = json.loads(body)
    if not isinstance(body, dict):
        raise invalid([FieldError("request", "is required: the OpenAI chat request, as an object", "required")])
    chat = _parse(body, "request.")
    job = await _submit(request, chat, _tracked(fields), "request.")
    return web.json_response(_reference(request, job))


def _tracked(fields: dict[str, Any]) -> Tracked:
    try:
        tracked = Tracked.model_validate({k: v for k, v in fields.items() if k.lower() in ("refid", "tag", "replyto")})
    except ValidationError as exc:
        raise invalid([FieldError(str(e["loc"][0]), e["msg"]) for e in exc.errors()]) from None
    return tracked


def _reference(request: web.Request, job: Job) -> dict[str, Any]:
    return {"id": job.id, "jobId": job.id, "refId": job.ref_id, "jobState": job.state,
            "status": request.app[QUEUE].status_text(job), "statusUrl": f"{base_url(request)}/api/GetOpenAiChatStatus?jobId={job.id}",
            "responseStatus": None}


async def _chat_job(request: web.Request) -> Job:
    job = await find_job(request, aliases={"id": "jobId"})
    if job.capability != CAPABILITY:
        raise ApiError(404, "NotFound", f"job {job.id} is not a chat")
    return job


async def chat_status(request: web.Request) -> web.Response:
    job = await _chat_job(request)
    return web.json_response(chat_status_body(job, request.app[QUEUE].status_text(job)))


async def wait_for_chat(request: web.Request) -> web.Response:
    """The chat once it ended, waiting up to ``router.sync_timeout_s``; its status if still running."""
    job = await _chat_job(request)
    job = await request.app[QUEUE].wait_finished(job, request.app[SETTINGS].router.sync_timeout_s) or job
    return web.json_response(chat_status_body(job, request.app[QUEUE].status_text(job)))


async def active_models(request: web.Request) -> web.Response:
    return web.json_response({"results": ids_served(request.app[MODELS], KIND), "responseStatus": None})
