"""Which agent gets a job: a pure decision over what the agents reported.

A job goes only to an agent that can run its capability, has its model, and has enough free VRAM
for it (after an out-of-memory failure: more than the agent that failed had). Among those with a
free slot and not paused (router/sessions.py: an agent that failed jobs in a row), prefer one that
did not lose this job before (a preference, never a ban: with one agent the job runs there again),
then one that already has the model loaded (no swap), then the most free VRAM, then the fewest
running jobs. When none fits, the answer says why, in words a client can read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from gpugate.wire import Capability

GB = 1024**3
DEFAULT_VRAM_BASE = GB // 2  # activations, text encoders' scratch, CUDA context
DEFAULT_VRAM_PER_MEGAPIXEL = GB  # an SD1.5-class UNet + VAE decode, per output megapixel
MODEL_OVERHEAD = 1.2  # weights in memory take a little more than the file


@dataclass(frozen=True)
class AgentView:
    name: str
    capabilities: Mapping[str, Capability]
    models: Mapping[tuple[str, str], int | None]  # (kind, file name) -> bytes it takes loaded (sessions.py)
    free_vram: int  # the most free on any one of its devices
    loaded: frozenset[str] = frozenset()
    running: int = 0
    slots: int = 0  # jobs it asked for and has not been sent
    paused: str | None = None  # why it takes no jobs for now, if it does not
    pools: Mapping[str, int] = field(default_factory=dict)  # free slots of capabilities that have their own

    def free(self, capability: str) -> int:
        """Free slots for a job of ``capability``: its own slots if it has them, else the agent's."""
        return self.pools.get(capability, 0) if self.capabilities[capability].slots else self.slots

    def took(self, capability: str) -> AgentView:
        """This view once a job of ``capability`` was handed out."""
        if self.capabilities[capability].slots:
            return replace(self, pools={**self.pools, capability: max(self.free(capability) - 1, 0)}, running=self.running + 1)
        return replace(self, slots=max(self.slots - 1, 0), running=self.running + 1)


@dataclass(frozen=True)
class JobNeeds:
    capability: str
    model: str | None = None  # a model file of the capability's model_kind
    megapixels: float = 0.0  # output pixels x batch, in millions
    min_free_vram: int = 0  # after an out-of-memory failure: the agent must have more than this
    avoid: frozenset[str] = field(default_factory=frozenset)  # agents that lost this job before: chosen last


@dataclass(frozen=True)
class Unplaceable:
    reason: str
    busy: bool = False  # capable agents exist but none is free now: a wait, not a lack of capacity
    missing: bool = False  # no connected agent runs it or has its model at all (not merely memory now)


def model_memory(size: int | None, reported: int | None = None) -> int | None:
    """Bytes a model takes loaded: what its agent reported (an LLM: weights and KV cache), else its
    file's size and a little more."""
    return reported or (int(size * MODEL_OVERHEAD) if size else None)


def vram_needed(job: JobNeeds, capability: Capability, model_bytes: int | None) -> int:
    """Bytes a job needs: its model in memory (``model_memory``; None when already loaded) plus
    what its output size takes (overridable per workflow)."""
    base = DEFAULT_VRAM_BASE if capability.vram_base is None else capability.vram_base
    per_mp = DEFAULT_VRAM_PER_MEGAPIXEL if capability.vram_per_megapixel is None else capability.vram_per_megapixel
    return int((model_bytes or 0) + base + per_mp * job.megapixels)


def choose(job: JobNeeds, agents: Iterable[AgentView]) -> AgentView | Unplaceable:
    pool = list(agents)
    if not pool:
        return Unplaceable("no agent is connected", missing=True)
    able = [a for a in pool if job.capability in a.capabilities]
    if not able:
        return Unplaceable(f"no agent can run {job.capability}", missing=True)
    if job.model is not None:
        able = [a for a in able if (_kind(a, job), job.model) in a.models]
        if not able:
            return Unplaceable(f"no agent has model {job.model}", missing=True)
    needs = {a.name: _need(job, a) for a in able}
    fits = [a for a in able if a.free_vram >= needs[a.name] and (not job.min_free_vram or a.free_vram > job.min_free_vram)]
    if not fits:
        most = max(a.free_vram for a in able)
        need = max(min(needs.values()), job.min_free_vram + 1)
        return Unplaceable(f"needs about {need / GB:.1f} GB VRAM, the most free is {most / GB:.1f} GB")
    ready = [a for a in fits if a.free(job.capability) > 0 and a.paused is None]
    if not ready:
        if all(a.paused for a in fits):
            return Unplaceable(f"waiting: agent {fits[0].name} is paused ({fits[0].paused})", busy=True)
        return Unplaceable(f"waiting for a free agent ({len(fits)} able, all busy)", busy=True)
    return min(ready, key=lambda a: (a.name in job.avoid, job.model not in a.loaded, -a.free_vram, a.running, a.name))


def _kind(agent: AgentView, job: JobNeeds) -> str:
    return agent.capabilities[job.capability].model_kind or "checkpoints"


def _need(job: JobNeeds, agent: AgentView) -> int:
    """What the job needs on this agent; a model it has loaded is in memory already (its free VRAM
    is what is left beside it)."""
    loaded = job.model is None or job.model in agent.loaded
    return vram_needed(job, agent.capabilities[job.capability],
                       None if loaded else agent.models.get((_kind(agent, job), job.model)))
