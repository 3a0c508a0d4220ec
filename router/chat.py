"""Chat jobs: OpenAI's chat request, checked, as a job for an agent; and the job as OpenAI's answer.

One request model serves OpenAI's ``POST /v1/chat/completions`` and AI Server's
``OpenAiChatCompletion`` / ``QueueOpenAiChatCompletion`` (its ``request`` field). Every job keeps
a seed (the client's, or one chosen here), so an attempt run again after its agent died gives the
same text, and a stream that already sent part of it goes on where it was (router/api/chat.py).
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from gpugate.errors import FieldError, InvalidRequest
from gpugate.params import TEXT_MAX

from .api.errors import failure_status
from .models import ModelBook
from .store import Job, JobState

KIND = "llm"
CAPABILITY = "chat"
API = "OpenAiChatCompletion"  # the API every chat job is recorded under (keys allowed it may use /v1/chat/completions)
MESSAGES_MAX = 1024
SEED_MAX = 2**31 - 1  # llama.cpp's seeds are 32-bit


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TextPart(_Open):
    type: Literal["text"]
    text: Annotated[str, Field(max_length=TEXT_MAX)]


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[str, Field(max_length=TEXT_MAX)] | list[TextPart] | None = None
    name: str | None = None

    def plain(self) -> dict[str, Any]:
        """The message as the model server takes it: text content (parts joined); developer is system."""
        content = self.content if isinstance(self.content, str) or self.content is None \
            else "".join(p.text for p in self.content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name:
            out["name"] = self.name
        return out


class ResponseFormat(_Open):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and not (self.json_schema or {}).get("schema"):
            raise ValueError("json_schema.schema is required when type is json_schema")
        return self


class StreamOptions(_Open):
    include_usage: bool = False


class ChatRequest(_Open):
    """OpenAI's chat completion request (the fields AI Server's DTO carries, and stream_options)."""

    model: Annotated[str, Field(min_length=1, max_length=512)]
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MESSAGES_MAX)]
    max_tokens: Annotated[int | None, Field(ge=1, le=2**20)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1, le=2**20)] = None
    temperature: Annotated[float | None, Field(ge=0, le=2)] = None
    top_p: Annotated[float | None, Field(ge=0, le=1)] = None
    seed: Annotated[int | None, Field(ge=-(2**63), lt=2**63)] = None  # OpenAI's int64; llama.cpp's 32 bits
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    response_format: ResponseFormat | None = None
    frequency_penalty: Annotated[float | None, Field(ge=-2, le=2)] = None
    presence_penalty: Annotated[float | None, Field(ge=-2, le=2)] = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    logprobs: bool | None = None  # not supported yet: true is refused
    top_logprobs: Annotated[int | None, Field(ge=0, le=20)] = None
    n: Annotated[int | None, Field(ge=1, le=1)] = None  # one choice per request
    stream: bool = False
    stream_options: StreamOptions | None = None
    tools: list[dict[str, Any]] | None = None
    user: str | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list[dict[str, Any]] | None) -> None:
        if v:
            raise ValueError("tool calling is not supported yet; send the request without tools")
        return None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | None) -> bool | None:
        if v:
            raise ValueError("log probabilities are not supported yet; leave logprobs out")
        return v

    @field_validator("messages")
    @classmethod
    def _some_content(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if all(not m.plain()["content"] for m in v):
            raise ValueError("every message is empty: at least one needs content")
        return v

    def job_params(self, models: ModelBook) -> tuple[dict[str, Any], str, list[str]]:
        """The job's parameters, the model file and notes; InvalidRequest naming the field."""
        ref = models.resolve(self.model, KIND)
        max_tokens = self.max_completion_tokens or self.max_tokens
        context = models.context_of(KIND, ref.file)
        if context is not None and max_tokens is not None and max_tokens >= context:
            field = "max_completion_tokens" if self.max_completion_tokens else "max_tokens"
            raise InvalidRequest(FieldError(field, f"is {max_tokens}; model {self.model}'s context is {context} tokens "
                                                   "(prompt and answer together)", "out_of_range"))
        params: dict[str, Any] = {
            "model": ref.file, "model_id": self.model, "messages": [m.plain() for m in self.messages],
            "max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "seed": self.seed % SEED_MAX if self.seed is not None else secrets.randbelow(SEED_MAX),
            "stop": self.stop, "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
            "logit_bias": self.logit_bias,
            "response_format": self.response_format.model_dump(exclude_none=True) if self.response_format else None,
        }
        return {k: v for k, v in params.items() if v is not None}, ref.file, list(ref.notes)


def completion_id(job: Job) -> str:
    return f"chatcmpl-{job.id}"


def completion(job: Job) -> dict[str, Any] | None:
    """A completed chat job as OpenAI's chat.completion object (None until it completed)."""
    if job.state != JobState.COMPLETED or not job.results:
        return None
    texts = job.results.get("texts") or [""]
    details = job.results.get("details") or {}
    usage = details.get("usage") or {}
    return {"id": completion_id(job), "object": "chat.completion", "created": int(job.created),
            "model": job.params.get("model_id", job.model), "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": texts[0], "refusal": None},
                         "logprobs": None, "finish_reason": details.get("finishReason", "stop")}],
            "usage": {"prompt_tokens": usage.get("prompt_tokens", 0), "completion_tokens": usage.get("completion_tokens", 0),
                      "total_tokens": usage.get("total_tokens", 0)}}


def chunk(job: Job, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    """One chat.completion.chunk of a streamed answer."""
    return {"id": completion_id(job), "object": "chat.completion.chunk", "created": int(job.created),
            "model": job.params.get("model_id", job.model), "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(job: Job, final: dict[str, Any]) -> dict[str, Any]:
    """The last chunk when the client asked for usage (stream_options.include_usage): no choices."""
    return {**chunk(job, {}), "choices": [], "usage": final["usage"]}


def chat_status_body(job: Job, status: str) -> dict[str, Any]:
    """GetOpenAiChatStatus' answer (also the body of a chat job's callback)."""
    body = {"id": job.id, "jobId": job.id, "refId": job.ref_id, "jobState": job.state, "status": status, "result": completion(job),
            "responseStatus": None}
    if job.state in (JobState.FAILED, JobState.CANCELLED):
        body["responseStatus"] = failure_status(job.error or {}, {})[1]
    return body
