"""The protocol between agents and the router: JSON messages over one websocket per agent.

Versioned: ``hello`` and ``welcome`` carry ``WIRE_VERSION``, and each side refuses a peer of another
version (``version_of`` reads it before anything else is validated, so the refusal names both
versions). Typed with pydantic so each side validates what it receives in one place.

Agent -> router: hello, heartbeat, pull (free slots), progress, delta (streamed text), done, failed,
leaving.
Router -> agent: welcome (or refused), job, stop (a cancelled job), ack (an answer was recorded).

Who runs a job is a lease: the job's attempt, held by one agent *session* (one per connection,
named in the welcome). An agent that reconnects lists the jobs it still holds (``Hello.held``:
running, or answered but not yet acknowledged); the router moves each lease that still stands to
the new session (``Welcome.resumed``) and tells it which to forget (``Welcome.dropped``). Answers
count only from the session holding the lease. Files travel over HTTP under the router's names,
unless the agent sees the router's file store itself (same host, or a shared volume: ``Welcome.store``); then it
reads its inputs and writes its outputs there directly (layout: gpugate/filestore.py).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from .errors import FailureKind, JobFailed

WIRE_VERSION = 4  # 4: chat (Delta, a capability's own slots, models' memory and context)


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Device(_Message):
    """A GPU (or, on a CPU-only host, the CPU with its RAM) and its memory in bytes."""

    index: int
    name: str
    vram_total: int
    vram_free: int


class Model(_Message):
    kind: str
    name: str
    size: int | None = None
    family: str | None = None  # sd15, sdxl, flux1-schnell, ... (gpugate/families.py), when the agent could tell
    vram: int | None = None  # bytes it takes loaded, where the agent knows better than its size (an LLM: + KV cache)
    context: int | None = None  # an LLM's context per request, in tokens


class WorkflowParam(_Message):
    """One parameter a workflow declares (agent/comfy/workflows.py), as callers see it."""

    type: str  # string | int | float | bool | seed | choice | model | image
    description: str = ""
    required: bool = False
    default: Any = None
    min: float | None = None
    max: float | None = None
    step: int | None = None
    values: list[str] | None = None  # what a choice or model accepts, as ComfyUI lists it on this agent
    kind: str | None = None  # a model parameter's kind (checkpoints, ...)


class Capability(_Message):
    """Something the agent can run (a workflow, echo), with its memory estimate if it has one."""

    name: str
    model_kind: str | None = None  # the kind of model it loads, when it takes one
    vram_base: int | None = None  # bytes on top of the model
    vram_per_megapixel: int | None = None  # bytes per output megapixel (x batch)
    description: str = ""
    params: dict[str, WorkflowParam] | None = None  # a workflow's declared parameters; None: not a workflow
    slots: int | None = None  # jobs of it at once in slots of its own (chat: llama.cpp's), apart from concurrency


class Artifact(_Message):
    """An output the agent uploaded; ``name`` is what the router stored it under."""

    name: str
    file_name: str
    media_type: str
    size: int


class Failure(_Message):
    kind: FailureKind
    message: str
    node_id: str | None = None
    node_type: str | None = None
    errors: list[dict[str, str]] = Field(default_factory=list)  # field, message, code

    @classmethod
    def of(cls, exc: JobFailed) -> Failure:
        return cls.model_validate(exc.to_dict())


# ---- agent -> router ------------------------------------------------------------------------------


class HeldJob(_Message):
    """A job an agent holds: attempt ``attempt``, leased to its session ``session``."""

    job_id: int
    attempt: int
    session: str


class Hello(_Message):
    type: Literal["hello"] = "hello"
    version: int = WIRE_VERSION
    name: str
    instance: str  # new each time the agent process starts: tells a reconnect from a second agent
    cpu_only: bool
    devices: list[Device]
    models: list[Model]
    capabilities: list[Capability]
    concurrency: int
    held: list[HeldJob] = Field(default_factory=list)


class Heartbeat(_Message):
    type: Literal["heartbeat"] = "heartbeat"
    devices: list[Device]
    loaded: list[str] = Field(default_factory=list)  # model files in memory now
    models: list[Model] | None = None  # sent when the inventory changed
    capabilities: list[Capability] | None = None  # sent when they changed (ComfyUI down or back)


class Pull(_Message):
    """The agent can take ``slots`` more jobs (on top of those already asked for): of ``capability``
    in its own slots (Capability.slots), or of any other capability when None."""

    type: Literal["pull"] = "pull"
    slots: int
    capability: str | None = None


class Progress(_Message):
    type: Literal["progress"] = "progress"
    job_id: int
    attempt: int
    step: int | None = None
    total: int | None = None
    node: str | None = None


class Delta(_Message):
    """Text a running job produced (a chat's next tokens), sent as soon as the agent has it;
    ``offset`` is where it starts in this attempt's text (deltas lost while the agent reconnects
    leave a gap the router can see)."""

    type: Literal["delta"] = "delta"
    job_id: int
    attempt: int
    offset: int
    text: str


class Done(_Message):
    type: Literal["done"] = "done"
    job_id: int
    attempt: int
    artifacts: list[Artifact] = Field(default_factory=list)
    texts: list[str] = Field(default_factory=list)
    details: dict[str, Any] | None = None  # extras of the first text result (language, segments...)


class Failed(_Message):
    type: Literal["failed"] = "failed"
    job_id: int
    attempt: int
    failure: Failure


class Leaving(_Message):
    """The agent is shutting down: offer it nothing more. Its running jobs still answer (or come
    back as ``shutdown`` failures, which use no attempt)."""

    type: Literal["leaving"] = "leaving"


AgentMessage = Annotated[Hello | Heartbeat | Pull | Progress | Delta | Done | Failed | Leaving, Field(discriminator="type")]
agent_message = TypeAdapter(AgentMessage)


# ---- router -> agent ------------------------------------------------------------------------------


class SharedStore(_Message):
    """The router's file store, for agents that can see the same folder: ``token`` is also in the
    folder's STORE_ID_FILE, so an agent uses the folder only when what it sees at ``path`` is this
    router's store (not another store, or an empty folder, at the same path)."""

    path: str
    token: str


class Welcome(_Message):
    type: Literal["welcome"] = "welcome"
    version: int = WIRE_VERSION
    session: str  # this connection's session: the leases of the jobs it is sent are held by it
    store: SharedStore | None = None
    resumed: list[int] = Field(default_factory=list)  # held jobs whose leases moved to this session
    dropped: list[int] = Field(default_factory=list)  # held jobs to forget: finished, cancelled or given to another


class Refused(_Message):
    """The router will not take this connection; ``reason`` says why (sent before it closes)."""

    type: Literal["refused"] = "refused"
    reason: str


class JobOffer(_Message):
    """A job for the agent to run now; ``inputs`` maps parameter names to the router's file names."""

    type: Literal["job"] = "job"
    job_id: int
    attempt: int
    capability: str
    params: dict[str, Any]
    inputs: dict[str, str] = Field(default_factory=dict)


class StopJob(_Message):
    """The job was cancelled: stop it (interrupt ComfyUI, kill ffmpeg, end whisper) and answer ``interrupted``."""

    type: Literal["stop"] = "stop"
    job_id: int
    attempt: int


class Ack(_Message):
    """The router recorded the agent's answer for this attempt (or found it stale): forget the job."""

    type: Literal["ack"] = "ack"
    job_id: int
    attempt: int


RouterMessage = Annotated[Welcome | Refused | JobOffer | StopJob | Ack, Field(discriminator="type")]
router_message = TypeAdapter(RouterMessage)


def version_of(raw: str | bytes) -> int | None:
    """The ``version`` a hello or welcome claims, read before the rest is validated (a peer of
    another version may send fields this one does not know); None if there is none."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return version if isinstance(version, int) else None
