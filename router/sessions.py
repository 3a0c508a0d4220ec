"""The agents connected now: one session per connection, and each agent's recent record.

A session is one accepted connection (a new random id each time); what its agent reported
(devices, models, capabilities, loaded models) and how many jobs it asked for live here. Which
jobs it runs does not: that is each job's lease (router/store, router/queue.py).

Names: one live session per agent name. A connection under a name already connected is
- the same agent process reconnecting (same ``instance``, its old socket not yet noticed as
  dead): it replaces the old session, which is closed; the jobs it held move over with the new
  hello's ``held`` list;
- another process (a cloned host, a second agent given the same name, an agent restarted while
  its old connection still looks alive): refused with a message naming the name. It keeps
  retrying, and joins once the older one is gone (closed, or silent past the heartbeat timeout).
Refusing rather than replacing keeps two live agents from evicting each other in turn and
re-queuing each other's jobs at every reconnect. The router's own worker's name is reserved.

Routers that share a database (router.shared, router/peers.py) see each other's agents as
``peers``: sessions of other routers, rebuilt from the reports those routers keep in the store.
They count for what a router says (which models exist, why a job waits, whether it can ever run)
but are never sent anything. Session ids start with their router's id, so a router that dies
leaves leases that name it.

An agent that fails several jobs in a row for infrastructure reasons (its engine lost, disk full)
is paused for a while (``AgentHealth``): a broken agent fails jobs fastest and would otherwise
drain the queue. The record is kept by name, so a reconnect does not clear it.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpugate.errors import FailureKind
from gpugate.wire import Ack, Capability, Device, Heartbeat, Hello, JobOffer, Model, StopJob

from .retry import AGENT_FAULTS
from .scheduler import AgentView, model_memory

LOCAL_WORKER = "router"  # the router's own worker (router/local.py) joins under this name
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,127}$")
Send = Callable[[JobOffer | StopJob | Ack], Awaitable[None]]
Disconnect = Callable[[], Awaitable[object]]


class Refusal(Exception):
    """A connection the registry will not take; the message says why, for the agent's log."""


def is_local_worker(name: str | None) -> bool:
    """Whether ``name`` is a router's own worker: "router" (or "router@<router id>" on routers that share a database)."""
    return name is not None and (name == LOCAL_WORKER or name.startswith(f"{LOCAL_WORKER}@"))


def router_of(session_id: str | None) -> str | None:
    """The id of the router a session belongs to (session ids are "<router id>.<random>")."""
    return session_id.split(".", 1)[0] if session_id and "." in session_id else None


async def _elsewhere(*_: object) -> None:
    raise ConnectionError("the agent is connected to another router")


@dataclass
class AgentSession:
    id: str
    name: str
    instance: str
    send: Send
    disconnect: Disconnect
    cpu_only: bool
    devices: list[Device]
    models: list[Model]
    capabilities: dict[str, Capability]
    concurrency: int
    loaded: set[str] = field(default_factory=set)
    slots: int = 0  # jobs it asked for (pulls add, offers take)
    pools: dict[str, int] = field(default_factory=dict)  # the same, per capability that has slots of its own
    draining: bool = False  # it is shutting down: offered nothing more
    connected: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.monotonic)

    @property
    def free_vram(self) -> int:
        return max((d.vram_free for d in self.devices), default=0)

    def heard(self, beat: Heartbeat) -> None:
        self.devices = beat.devices
        self.loaded = set(beat.loaded)
        if beat.models is not None:
            self.models = beat.models
        if beat.capabilities is not None:
            self.capabilities = {c.name: c for c in beat.capabilities}

    def report(self, running: int) -> str:
        """What other routers know of this session (router/peers.py): JSON, read by ``of_report``."""
        return json.dumps({"name": self.name, "instance": self.instance, "session": self.id, "cpu_only": self.cpu_only,
                           "devices": [d.model_dump() for d in self.devices], "models": [m.model_dump() for m in self.models],
                           "capabilities": [c.model_dump() for c in self.capabilities.values()],
                           "concurrency": self.concurrency, "loaded": sorted(self.loaded), "slots": self.slots,
                           "pools": self.pools, "draining": self.draining, "connected": self.connected, "running": running},
                          separators=(",", ":"))

    @classmethod
    def of_report(cls, report: str) -> tuple[AgentSession, int]:
        """Another router's session as it reported it, and its running jobs; it can be sent nothing."""
        r: dict[str, Any] = json.loads(report)
        session = cls(r["session"], r["name"], r["instance"], _elsewhere, _elsewhere, r["cpu_only"],
                      [Device.model_validate(d) for d in r["devices"]], [Model.model_validate(m) for m in r["models"]],
                      {c["name"]: Capability.model_validate(c) for c in r["capabilities"]}, r["concurrency"],
                      set(r["loaded"]), r["slots"], r["pools"], r["draining"], r["connected"], math.inf)
        return session, r["running"]

    def view(self, running: int, paused: str | None) -> AgentView:
        return AgentView(self.name, self.capabilities, {(m.kind, m.name): model_memory(m.size, m.vram) for m in self.models},
                         self.free_vram, frozenset(self.loaded), running, 0 if self.draining else self.slots, paused,
                         {} if self.draining else dict(self.pools))

    def pulled(self, slots: int, capability: str | None) -> None:
        if capability is None:
            self.slots += slots
        else:
            self.pools[capability] = self.pools.get(capability, 0) + slots

    def can_take(self, capability: str) -> bool:
        """Whether it has a free slot for a job of ``capability`` now (and is not leaving)."""
        if self.draining or capability not in self.capabilities:
            return False
        return (self.pools.get(capability, 0) if capability in self.pools else self.slots) > 0

    def offered(self, capability: str) -> None:
        """A job of ``capability`` was sent: one slot less (its own, if it has slots of its own)."""
        if capability in self.pools:
            self.pools[capability] -= 1
        else:
            self.slots -= 1


@dataclass
class AgentHealth:
    """An agent's recent record: infrastructure failures in a row, and the pause they earned."""

    failures_in_row: int = 0
    paused_until: float = 0.0
    last_failure: str | None = None
    last_counted: float = -math.inf  # when the last failure that counted came

    def paused(self, now: float) -> str | None:
        """Why the agent takes no jobs now, or None."""
        if now >= self.paused_until:
            return None
        return (f"{self.failures_in_row} infrastructure failures in a row, the last: {self.last_failure}; "
                f"paused for {self.paused_until - now:.0f}s more")


ONE_INCIDENT_S = 5.0  # jobs that were running together and failed this soon after a counted fault: that fault


class SessionRegistry:
    def __init__(self, failure_limit: int = 3, pause_s: float = 60.0, router_id: str | None = None) -> None:
        self.router_id = router_id or secrets.token_hex(4)  # the prefix of this router's session ids
        self.sessions: dict[str, AgentSession] = {}  # agent name -> its live session (on this router)
        # agent name -> (its session on another router sharing the database, its running jobs): router/peers.py
        self.peers: dict[str, tuple[AgentSession, int]] = {}
        self.health: dict[str, AgentHealth] = {}  # agent name -> its record (outlives sessions)
        # workflow name -> its declaration as last reported: outlives a ComfyUI restart (which withdraws
        # the workflows for a while) and the agent's absence, so calls for it queue meanwhile
        self.declared: dict[str, Capability] = {}
        self._by_id: dict[str, AgentSession] = {}
        self._failure_limit, self._pause_s = failure_limit, pause_s

    def join(self, hello: Hello, send: Send, disconnect: Disconnect, *,
             local: bool = False) -> tuple[AgentSession, AgentSession | None]:
        """A new session for ``hello``, and the older session it replaces (to be closed), if any.
        Raises Refusal for a name that is malformed, reserved, or in use by another agent."""
        name = hello.name
        if not NAME.match(name):
            raise Refusal(f"agent name {name!r} is not allowed: use letters, digits, '.', '_', '@' and '-' "
                          "(at most 128), starting with a letter or digit; set agent.name")
        if is_local_worker(name) and not local:
            raise Refusal(f"agent name {name!r} is reserved for the router's own worker; set agent.name")
        older = self.sessions.get(name)
        if older is not None and older.instance != hello.instance:
            since = time.strftime("%H:%M:%S UTC", time.gmtime(older.connected))
            raise Refusal(f"an agent named {name!r} is already connected (since {since}); each agent needs its "
                          "own name: set agent.name (or GPUGATE_AGENT__NAME). Retrying in case it is leaving.")
        session = AgentSession(f"{self.router_id}.{secrets.token_hex(12)}", name, hello.instance, send, disconnect, hello.cpu_only,
                               hello.devices, hello.models, {c.name: c for c in hello.capabilities}, hello.concurrency)
        if older is not None:
            self._by_id.pop(older.id, None)
        self.sessions[name] = self._by_id[session.id] = session
        self._remember(hello.capabilities)
        return session, older

    def heard(self, session: AgentSession, beat: Heartbeat) -> None:
        session.heard(beat)
        self._remember(beat.capabilities or ())

    def _remember(self, capabilities: Iterable[Capability]) -> None:
        for capability in capabilities:
            if capability.params is not None:
                self.declared[capability.name] = capability

    def leave(self, session: AgentSession) -> bool:
        """Forget the session, unless a newer one under its name has replaced it."""
        if self.sessions.get(session.name) is session:
            del self.sessions[session.name]
            self._by_id.pop(session.id, None)
            return True
        return False

    def by_id(self, session_id: str | None) -> AgentSession | None:
        return self._by_id.get(session_id or "")

    def remote(self) -> list[AgentSession]:
        """The agents on other processes connected here (every one but the router's own worker)."""
        return [s for name, s in self.sessions.items() if not is_local_worker(name)]

    def everyone(self) -> list[AgentSession]:
        """Every agent connected to any router of this database: these and the peers."""
        return [*self.sessions.values(), *self.elsewhere()]

    def elsewhere(self) -> list[AgentSession]:
        """The agents connected to the other routers of this database."""
        return [s for name, (s, _) in self.peers.items() if name not in self.sessions]

    def views(self, running: Mapping[str, int], now: float) -> list[AgentView]:
        """What the scheduler sees: each session with its running jobs (by session id) and pause."""
        return [s.view(running.get(s.id, 0), self.paused(s.name, now)) for s in self.sessions.values()]

    def peer_views(self) -> list[AgentView]:
        """The agents of the other routers, as they last reported (never offered a job from here)."""
        return [s.view(running, None) for name, (s, running) in self.peers.items() if name not in self.sessions]

    def paused(self, name: str, now: float) -> str | None:
        health = self.health.get(name)
        return health.paused(now) if health is not None else None

    def silent_since(self, deadline: float) -> list[AgentSession]:
        return [s for s in self.sessions.values() if s.last_seen < deadline]

    def record(self, name: str, kind: FailureKind | None, message: str, now: float,
               started: float | None = None) -> None:
        """Count an attempt's end against the agent: a success clears its record, an infrastructure
        failure adds to it, and the limit in a row pauses it (longer each time it trips again).
        Jobs that were running when the agent last failed one (``started`` before it) and fail within
        ``ONE_INCIDENT_S`` of it are that same fault (a crash under several parallel chats), not more."""
        health = self.health.setdefault(name, AgentHealth())
        if kind is None:
            health.failures_in_row = 0
            return
        if kind not in AGENT_FAULTS:
            return
        health.last_failure = message[:200]
        if started is not None and started < health.last_counted and now - health.last_counted < ONE_INCIDENT_S:
            return  # lost with the fault already counted (a crash under several parallel jobs)
        health.last_counted = now
        health.failures_in_row += 1
        if health.failures_in_row >= self._failure_limit:
            trips = health.failures_in_row - self._failure_limit
            health.paused_until = now + min(self._pause_s * 2 ** trips, 3600.0)
