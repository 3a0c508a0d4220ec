"""The agents connected now: what each reported (devices, models, capabilities, loaded models),
what it runs, how many more jobs it asked for, and when it was last heard from."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from gpugate.wire import Capability, Device, Heartbeat, Hello, JobOffer, Model, StopJob

from .scheduler import AgentView

LOCAL_WORKER = "router"  # the router's own worker (router/local.py) joins under this name
Send = Callable[[JobOffer | StopJob], Awaitable[None]]
Disconnect = Callable[[], Awaitable[object]]


@dataclass
class ConnectedAgent:
    name: str
    send: Send
    disconnect: Disconnect
    cpu_only: bool
    devices: list[Device]
    models: list[Model]
    capabilities: dict[str, Capability]
    concurrency: int
    loaded: set[str] = field(default_factory=set)
    running: set[int] = field(default_factory=set)
    slots: int = 0  # jobs it asked for (pulls add, offers take)
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def free_vram(self) -> int:
        return max((d.vram_free for d in self.devices), default=0)

    def view(self) -> AgentView:
        return AgentView(self.name, self.capabilities, {(m.kind, m.name): m.size for m in self.models},
                         self.free_vram, frozenset(self.loaded), len(self.running), self.slots)

    def heard(self, beat: Heartbeat) -> None:
        self.last_seen = time.monotonic()
        self.devices = beat.devices
        self.loaded = set(beat.loaded)
        if beat.models is not None:
            self.models = beat.models


class AgentRegistry:
    def __init__(self) -> None:
        self.agents: dict[str, ConnectedAgent] = {}

    def join(self, hello: Hello, send: Send, disconnect: Disconnect) -> ConnectedAgent:
        agent = ConnectedAgent(hello.name, send, disconnect, hello.cpu_only, hello.devices, hello.models,
                               {c.name: c for c in hello.capabilities}, hello.concurrency)
        self.agents[hello.name] = agent
        return agent

    def leave(self, agent: ConnectedAgent) -> bool:
        """Forget the agent, unless a newer connection under its name has replaced it."""
        if self.agents.get(agent.name) is agent:
            del self.agents[agent.name]
            return True
        return False

    def remote(self) -> list[ConnectedAgent]:
        """The agents on other processes (every one but the router's own worker)."""
        return [a for name, a in self.agents.items() if name != LOCAL_WORKER]

    def views(self) -> list[AgentView]:
        return [a.view() for a in self.agents.values()]

    def silent_since(self, deadline: float) -> list[ConnectedAgent]:
        return [a for a in self.agents.values() if a.last_seen < deadline]
