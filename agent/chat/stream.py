"""One chat against an OpenAI-compatible server (our llama-server, or Ollama, vLLM... in forward
mode), streamed: each piece of text is handed on as it arrives, the answer comes back whole.

Its failures are classified here: a prompt longer than the model's context or another refused
request is the caller's (InvalidRequest, naming the field); a server that is down, overloaded or
ends the stream early lost the chat (WorkerLost: the router runs it again); a server that refuses
this agent (its key, a model it no longer has) is this machine's fault (InfrastructureFault); the
server's own errors are execution errors. A connection that breaks (the server died under the
chat) is left to the link, which also calls it a lost worker.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from gpugate.errors import ExecutionError, FieldError, InfrastructureFault, InvalidRequest, JobFailed, WorkerLost


@dataclass
class ChatAnswer:
    content: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    first_token_s: float | None = None  # from sending the request to the first text
    generation_s: float = 0.0  # from the first text to the end

    def details(self) -> dict[str, Any]:
        """What the router keeps with the job's text (router/chat.py builds OpenAI's answer from it)."""
        tokens_out = self.usage.get("completion_tokens", 0)
        return {"finishReason": self.finish_reason or "stop", "usage": self.usage,
                "timeToFirstTokenMs": round(self.first_token_s * 1000, 1) if self.first_token_s is not None else None,
                "tokensPerSecond": round(tokens_out / self.generation_s, 1) if self.generation_s > 0 else None}


async def stream_chat(http: aiohttp.ClientSession, url: str, body: dict[str, Any],
                      on_text: Callable[[str], None], headers: dict[str, str] | None = None) -> ChatAnswer:
    """POST ``body`` to ``url`` (…/v1/chat/completions) with streaming on; ``on_text`` gets each
    piece of the answer. Leaving early (a cancelled job) closes the connection, which stops the
    server's generation."""
    answer = ChatAnswer()
    sent = time.monotonic()
    first: float | None = None
    request = {**body, "stream": True, "stream_options": {"include_usage": True}}
    done = False
    async with http.post(url, json=request, headers=headers) as response:
        if response.status != 200:
            raise _refused(response.status, await response.text())
        async for raw in response.content:
            line = raw.decode(errors="replace").strip()
            if not line.startswith("data:"):
                continue
            data = line.removeprefix("data:").strip()
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise _refused(None, data)
            if chunk.get("usage"):
                answer.usage = {k: int(v) for k, v in chunk["usage"].items() if isinstance(v, int)}
            for choice in chunk.get("choices") or ():
                text = (choice.get("delta") or {}).get("content")
                if text:
                    if first is None:
                        first = time.monotonic()
                        answer.first_token_s = first - sent
                    answer.content += text
                    on_text(text)
                if choice.get("finish_reason"):
                    answer.finish_reason = choice["finish_reason"]
    if not done and answer.finish_reason is None:
        raise WorkerLost("the chat server ended the stream before the answer did")
    if first is not None:
        answer.generation_s = time.monotonic() - first
    return answer


def _refused(status: int | None, text: str) -> JobFailed:
    """The server's error answer (``status`` None: an error event inside the stream) as one of ours."""
    try:
        error = json.loads(text).get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    error = error if isinstance(error, dict) else {"message": str(error)}
    message = error.get("message") or text[:500] or f"HTTP {status}"
    kind = error.get("type")
    if kind == "exceed_context_size_error":
        prompt, limit = error.get("n_prompt_tokens"), error.get("n_ctx")
        return InvalidRequest(FieldError("messages", f"the conversation is {prompt} tokens; this model's context is "
                                                     f"{limit} tokens (prompt and answer together)", "too_long"))
    if status in (401, 403):
        return InfrastructureFault(f"the chat server refused this agent (HTTP {status}): check chat.openai_key")
    if status == 404:
        return InfrastructureFault(f"the chat server does not have this model (any more): {message}")
    if status in (408, 429, 502, 503, 504):
        return WorkerLost(f"the chat server could not take the chat now (HTTP {status}): {message}")
    if (status is not None and 400 <= status < 500) or kind == "invalid_request_error":
        return InvalidRequest(FieldError("request", message))
    return ExecutionError(f"the chat server failed: {message}")
