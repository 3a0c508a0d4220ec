"""The agent's connection to the router: register, heartbeat, pull jobs, run them, report back.

One websocket (a pull: the agent asks for as many jobs as it has free slots, one more each time a
job ends), files by name (agent/files.py). Jobs belong to the agent, not to a connection:

- When the connection drops (the router restarts, the network blips), running jobs go on. The
  link reconnects with backoff and lists in its hello the jobs it holds (running, or answered but
  not acknowledged); the router says which it still leases to this agent. Answers wait for a
  connection, and are sent again until the router acknowledges them.
- On stop (SIGTERM) the agent drains: it tells the router it is leaving (no more offers), lets
  running jobs finish for ``agent.shutdown_grace_s`` and delivers their answers, then stops what
  is left and hands it back as ``shutdown`` (queued again without using an attempt).
- The router may refuse a connection (the name is taken by another agent, another wire version):
  the reason is logged and the link keeps trying, more slowly.
- Warm-up (``agent.warm_models``), once per process: the agent joins at once (the router sees it)
  but sends its first Pull only once each listed model is loaded by a tiny job on the runner that
  has it, and the router has been told they are loaded, so it sends the jobs for them here first.
  A model no runner has, or one that fails to load, is logged and skipped.

Faults are classified here, where they are met: a job's input missing from the router is an
infrastructure fault, an OSError (a full disk) too, a lost connection to the router during a file
transfer is retried on the next connection, and anything else is the runner's bug (execution
error), never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
import tempfile
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import aiohttp

from gpugate.errors import (
    ExecutionError, FieldError, InfrastructureFault, Interrupted, InvalidRequest, JobFailed, ShutDown, WorkerLost,
)
from gpugate.settings import Settings
from gpugate.wire import (
    WIRE_VERSION, Ack, Artifact, Capability, Delta, Done, Failed, Failure, Heartbeat, HeldJob, Hello, JobOffer, Leaving, Model,
    Progress, Pull, Refused, StopJob, Welcome, router_message, version_of,
)

from .files import RouterFiles
from .gpu import report_devices
from .runners import JobProgress, Runner, RunResult

log = logging.getLogger(__name__)
WARM_LIMIT_S = 900.0  # for warming every model in agent.warm_models: then the agent serves anyway
RECONNECT_MIN_S, RECONNECT_MAX_S = 0.2, 5.0
REFUSED_RETRY_S = 10.0  # after the router refused this agent (its name in use, another version)
HANDBACK_S = 10.0  # after the grace period: how long hand-backs may take to be acknowledged
FETCH_TRIES = 3
HTTP_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)


class StopReason(StrEnum):
    CANCELLED = "cancelled"  # the router stopped it (CancelJob): answer interrupted
    SHUTDOWN = "shutdown"  # this agent is stopping: hand it back
    DROPPED = "dropped"  # the router no longer leases it to us: forget it


@dataclass
class Work:
    """A job this agent holds, from its offer until the router acknowledges its answer."""

    offer: JobOffer
    session: str  # the session holding its lease (moves when a reconnect resumes it)
    task: asyncio.Task[None] | None = None
    answer: RunResult | Failure | None = None
    stored: list[Artifact] | None = None  # its outputs, once put in the router's store
    stop_reason: StopReason | None = None
    streamed: int = 0  # characters of text streamed so far (each Delta's offset)

    @property
    def held(self) -> HeldJob:
        return HeldJob(job_id=self.offer.job_id, attempt=self.offer.attempt, session=self.session)


@dataclass
class _Session:
    """One connection: its id, its files, and the messages waiting to go out on it."""

    id: str
    files: RouterFiles
    outbox: asyncio.Queue[str] = field(default_factory=asyncio.Queue)

    def send(self, message: Any) -> None:
        self.outbox.put_nowait(message.model_dump_json())


class Refusal(Exception):
    """The router would not take this connection (wire.Refused)."""


class RouterLink:
    def __init__(self, settings: Settings, runners: list[Runner]) -> None:
        if not settings.agent.router_url or not settings.agent.token:
            raise ValueError("agent.router_url and agent.token are needed to join a router")
        self.settings = settings
        self.urls = router_urls(settings.agent.router_url)
        self.url = self.urls[0]  # the router connected to, or tried last
        self.name = settings.agent.name or socket.gethostname()
        self.instance = secrets.token_hex(8)  # this process: the router tells a reconnect from a namesake
        self._runners = runners
        self._routes: dict[str, Runner] = {}  # capability -> runner, for every capability ever offered
        self._headers = {"Authorization": f"Bearer {settings.agent.token}"}
        self.work: dict[int, Work] = {}
        self.draining = False
        self.connected = asyncio.Event()
        self._session: _Session | None = None
        self._settled = asyncio.Event()  # no work held
        self._settled.set()
        self._answers = asyncio.Event()  # an answer is ready to be delivered
        self._warm = asyncio.Event()  # warm-up is over: jobs may be pulled

    # ---- lifetime ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Stay connected (reconnecting with backoff) until ``stop`` is set, then drain and leave."""
        connection = asyncio.create_task(self._stay_connected(), name="router-connection")
        warming = asyncio.create_task(self._warm_up(), name="warm-up")
        try:
            await stop.wait()
            await self._drain()
        finally:
            connection.cancel()
            tasks = [w.task for w in self.work.values() if w.task is not None]
            for task in [warming, *tasks]:
                task.cancel()
            await asyncio.gather(connection, warming, *tasks, return_exceptions=True)
            (self.settings.health_dir / f"{self.name}.json").unlink(missing_ok=True)

    async def _drain(self) -> None:
        """Take no more work, let running jobs finish within the grace period, hand back the rest."""
        self.draining = True
        if self._session is not None:
            self._session.send(Leaving())
        grace = self.settings.agent.shutdown_grace_s
        log.info("agent draining", extra={"agent": self.name, "jobs": len(self.work), "grace_s": grace})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), grace)
            return
        left = [w for w in self.work.values() if w.answer is None and w.task is not None]
        log.warning("grace period over; handing back unfinished jobs", extra={"jobs": [w.offer.job_id for w in left]})
        for work in left:
            self._stop(work, StopReason.SHUTDOWN)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settled.wait(), HANDBACK_S)

    async def _stay_connected(self) -> None:
        """Connect to the routers in turn (``agent.router_url`` may name several: a standby takes
        over when the active one dies), each lost or failed connection moving on to the next."""
        delay, turn = RECONNECT_MIN_S, 0
        while True:
            self.url = self.urls[turn % len(self.urls)]
            async with aiohttp.ClientSession(self.url, headers=self._headers, timeout=HTTP_TIMEOUT) as http:
                try:
                    await self._connection(http)
                    delay = RECONNECT_MIN_S
                except Refusal as exc:
                    log.error("router refused this agent", extra={"router": self.url, "agent": self.name, "error": str(exc)})
                    delay = REFUSED_RETRY_S
                except (aiohttp.ClientError, ConnectionError, TimeoutError) as exc:
                    log.warning("router unreachable", extra={"router": self.url, "error": str(exc) or type(exc).__name__})
                    turn += 1
                except Exception:  # a bug in a session must not end the agent: log it and reconnect
                    log.exception("router connection failed")
                finally:
                    self._session = None
                    self.connected.clear()
            await asyncio.sleep(delay if turn % len(self.urls) == 0 else RECONNECT_MIN_S)  # the next router at once
            delay = min(delay * 2, RECONNECT_MAX_S) if delay < REFUSED_RETRY_S else delay

    # ---- one connection ------------------------------------------------------------------------------

    async def _connection(self, http: aiohttp.ClientSession) -> None:
        async with http.ws_connect("/agent/ws", heartbeat=10, max_msg_size=16 * 2**20) as ws:
            await ws.send_str((await self._hello()).model_dump_json())
            welcome = await self._welcome(ws)
            session = _Session(welcome.session, await RouterFiles.for_session(http, welcome.store))
            self._resume(welcome, session)
            log.info("joined router", extra={"router": self.url, "agent": self.name, "session": session.id,
                                             "resumed": len(welcome.resumed)})
            if self.draining:
                session.send(Leaving())
            self._pull(session)
            self._session = session
            self._answers.set()  # answers waiting from before this connection go out now
            tasks = [asyncio.create_task(self._send(ws, session), name="send"),
                     asyncio.create_task(self._heartbeats(session), name="heartbeats"),
                     asyncio.create_task(self._deliver(session), name="deliver"),
                     asyncio.create_task(self._receive(ws, session), name="receive")]
            self.connected.set()
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    if not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _welcome(self, ws: aiohttp.ClientWebSocketResponse) -> Welcome:
        first = await ws.receive(timeout=30)
        if first.type is not aiohttp.WSMsgType.TEXT:
            raise ConnectionError(f"router closed the connection before welcoming us ({first.type.name})")
        version = version_of(first.data)
        if version is not None and version != WIRE_VERSION:
            raise Refusal(f"the router speaks wire protocol version {version}, this agent {WIRE_VERSION}: "
                          "run the same gpugate version on the router and its agents")
        message = router_message.validate_json(first.data)
        if isinstance(message, Refused):
            raise Refusal(message.reason)
        if not isinstance(message, Welcome):
            raise ConnectionError("router did not welcome us")
        return message

    def _resume(self, welcome: Welcome, session: _Session) -> None:
        """Jobs held from before: resumed ones now belong to this session, dropped ones are forgotten."""
        for job_id in welcome.resumed:
            if (work := self.work.get(job_id)) is not None:
                work.session = session.id
        for job_id in welcome.dropped:
            if (work := self.work.get(job_id)) is not None:
                log.info("router no longer leases this job to us; dropping it", extra={"job": job_id})
                self._stop(work, StopReason.DROPPED)
                self._forget(job_id)

    async def _send(self, ws: aiohttp.ClientWebSocketResponse, session: _Session) -> None:
        while True:
            await ws.send_str(await session.outbox.get())

    async def _receive(self, ws: aiohttp.ClientWebSocketResponse, session: _Session) -> None:
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            message = router_message.validate_json(msg.data)
            if isinstance(message, JobOffer):
                self._accept(message, session)
            elif isinstance(message, StopJob) and (work := self.work.get(message.job_id)) is not None \
                    and work.offer.attempt == message.attempt:
                log.info("job cancelled by the router", extra={"job": message.job_id, "attempt": message.attempt})
                self._stop(work, StopReason.CANCELLED)
            elif isinstance(message, Ack) and (work := self.work.get(message.job_id)) is not None \
                    and work.offer.attempt == message.attempt and work.answer is not None:
                self._forget(message.job_id)

    async def _heartbeats(self, session: _Session) -> None:
        last_models = await self._models()
        last_capabilities = self._capabilities()
        while True:
            await asyncio.sleep(self.settings.agent.heartbeat_s)
            models, capabilities = await self._models(), self._capabilities()
            _, devices = await asyncio.to_thread(report_devices, self.settings)  # NVML: off the event loop
            session.send(Heartbeat(devices=devices, loaded=self._loaded(),
                                   models=models if models != last_models else None,
                                   capabilities=capabilities if capabilities != last_capabilities else None))
            last_models, last_capabilities = models, capabilities
            await asyncio.to_thread(self._mark_alive)

    def _pull(self, session: _Session) -> None:
        """Ask for a job per free slot, unless draining or still warming up: the agent's slots
        (``agent.concurrency``), and those of each capability that has its own (chat)."""
        if not self._warm.is_set() or self.draining:
            return
        running = [w.offer.capability for w in self.work.values() if w.answer is None]
        pools = self._pools()
        free = self.settings.agent.concurrency - sum(c not in pools for c in running)
        if free > 0:
            session.send(Pull(slots=free))
        for capability, slots in pools.items():
            if (free := slots - running.count(capability)) > 0:
                session.send(Pull(slots=free, capability=capability))

    def _pools(self) -> dict[str, int]:
        """Capabilities with slots of their own -> how many."""
        return {c.name: c.slots for c in self._capabilities() if c.slots}

    # ---- warm-up ---------------------------------------------------------------------------------

    async def _warm_up(self) -> None:
        """Load each of ``agent.warm_models`` on the runner that has it (all within
        ``WARM_LIMIT_S``), then tell the router what is loaded and pull the first jobs (on the
        connection there is then, or on the next one). Whatever goes wrong, pulling starts."""
        try:
            if models := self.settings.agent.warm_models:
                log.info("warming models", extra={"agent": self.name, "models": ",".join(models)})
                warm: list[str] = []
                try:
                    async with asyncio.timeout(WARM_LIMIT_S):
                        for model in models:
                            await self._warm_one(model, warm)
                except TimeoutError:
                    log.warning("warming took too long; serving without the rest", extra={"limit_s": WARM_LIMIT_S})
                log.info("models warm", extra={"agent": self.name, "models": ",".join(warm) or "none"})
                _, devices = await asyncio.to_thread(report_devices, self.settings)
                if self._session is not None:
                    self._session.send(Heartbeat(devices=devices, loaded=self._loaded()))
        except Exception:  # never keep the agent from serving
            log.exception("warm-up failed; serving anyway")
        finally:
            self._warm.set()
            if self._session is not None:
                self._pull(self._session)

    async def _warm_one(self, model: str, warm: list[str]) -> None:
        try:
            for runner in self._runners:
                if await runner.warm(model):
                    warm.append(model)
                    return
            log.warning("no runner here has this model; not warming it", extra={"model": model})
        except Exception as exc:  # a model that does not load must not keep the agent from serving
            log.warning("warming a model failed", extra={"model": model, "error": f"{type(exc).__name__}: {exc}"})

    def _loaded(self) -> list[str]:
        return [m for r in self._runners for m in r.loaded()]

    # ---- jobs ------------------------------------------------------------------------------------

    def _accept(self, offer: JobOffer, session: _Session) -> None:
        if (earlier := self.work.get(offer.job_id)) is not None:  # an older attempt the router gave up on
            self._stop(earlier, StopReason.DROPPED)
        if self.draining:  # offered before the router read our Leaving: hand it straight back
            work = Work(offer, session.id, answer=Failure.of(ShutDown("the agent is shutting down")))
        else:
            work = Work(offer, session.id)
            work.task = asyncio.create_task(self._run(work), name=f"job-{offer.job_id}")
        self.work[offer.job_id] = work
        self._settled.clear()
        if work.answer is not None:
            self._answers.set()

    def _stop(self, work: Work, reason: StopReason) -> None:
        if work.task is not None and not work.task.done():
            work.stop_reason = reason
            work.task.cancel()

    def _forget(self, job_id: int) -> None:
        self.work.pop(job_id, None)
        if not self.work:
            self._settled.set()

    async def _run(self, work: Work) -> None:
        offer = work.offer
        extra = {"job": offer.job_id, "attempt": offer.attempt, "capability": offer.capability}
        log.info("job received", extra=extra)
        try:
            work.answer = await self._execute(work)
            log.info("job done", extra={**extra, "files": len(work.answer.files)})
        except JobFailed as exc:
            work.answer = Failure.of(exc)
            log.warning("job failed", extra={**extra, "kind": exc.kind.value, "error": exc.message})
        except asyncio.CancelledError:
            if work.stop_reason is StopReason.DROPPED or work.stop_reason is None:
                raise  # forgotten, or the agent is exiting
            failure = ShutDown("the agent shut down before the job finished") if work.stop_reason is StopReason.SHUTDOWN \
                else Interrupted("cancelled")
            work.answer = Failure.of(failure)
            log.info("job stopped", extra={**extra, "reason": work.stop_reason.value})
        except aiohttp.ClientError as exc:  # an engine's connection (an OSError too, but not a disk's)
            work.answer = Failure.of(WorkerLost(f"a connection failed during job {offer.job_id}: {exc}"))
            log.warning("job lost its connection", extra={**extra, "error": str(exc)})
        except OSError as exc:  # a full disk, a missing file: this machine's fault, not the request's
            work.answer = Failure.of(InfrastructureFault.of_os_error(exc, f"job {offer.job_id}"))
            log.warning("job failed on this agent", extra={**extra, "error": str(exc)})
        except Exception as exc:  # a bug must end the job with an answer, never hang it
            log.exception("job crashed", extra=extra)
            work.answer = Failure.of(ExecutionError(f"the agent failed: {type(exc).__name__}: {exc}"))
        self._answers.set()
        if self._session is not None and not self.draining:  # its slot is free (a later connection counts it anew)
            pooled = offer.capability if offer.capability in self._pools() else None
            self._session.send(Pull(slots=1, capability=pooled))

    async def _execute(self, work: Work) -> RunResult:
        offer = work.offer
        runner = self._route(offer.capability)

        def progress(p: JobProgress) -> None:
            if p.text is not None:  # counted even while disconnected: the router sees the gap
                offset, work.streamed = work.streamed, work.streamed + len(p.text)
                if self._session is not None:
                    self._session.send(Delta(job_id=offer.job_id, attempt=offer.attempt, offset=offset, text=p.text))
            elif self._session is not None:
                self._session.send(Progress(job_id=offer.job_id, attempt=offer.attempt, step=p.step, total=p.total,
                                            node=p.node))

        params: dict[str, Any] = dict(offer.params)
        if not offer.inputs:
            return await runner.run(offer.capability, f"{offer.job_id}-{offer.attempt}", params, progress)
        with tempfile.TemporaryDirectory(prefix=f"gpugate-inputs-{offer.job_id}-") as folder:  # downloads, if any
            for name, file in offer.inputs.items():
                params[name] = await self._fetch(name, file, Path(folder))
            return await runner.run(offer.capability, f"{offer.job_id}-{offer.attempt}", params, progress)

    def _route(self, capability: str) -> Runner:
        self._capabilities()  # learn what is offered now
        runner = self._routes.get(capability)
        if runner is None:
            raise InvalidRequest(FieldError("capability", f"this agent cannot run {capability}"))
        return runner

    async def _fetch(self, name: str, file: str, folder: Path) -> Path:
        """An input on local disk, from the router's store; a dropped connection is waited out."""
        for attempt in range(1, FETCH_TRIES + 1):
            session = await self._wait_session()
            try:
                return await session.files.fetch(file, folder)
            except aiohttp.ClientResponseError as exc:
                if exc.status == 404:
                    raise InfrastructureFault(f"input {name} is missing from the router's file store") from None
                raise WorkerLost(f"fetching input {name} failed: HTTP {exc.status}") from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                if attempt == FETCH_TRIES:
                    raise WorkerLost(f"fetching input {name} from the router failed: {exc}") from None
                await asyncio.sleep(RECONNECT_MIN_S * attempt)
        raise AssertionError("unreachable")

    async def _wait_session(self) -> _Session:
        while self._session is None:
            await self.connected.wait()
        return self._session

    # ---- answers -----------------------------------------------------------------------------------

    async def _deliver(self, session: _Session) -> None:
        """Send every answer not yet sent on this session (their files stored first); resent on the
        next session until acknowledged."""
        sent: set[tuple[int, int]] = set()  # (job, attempt)
        while True:
            await self._answers.wait()
            self._answers.clear()
            for work in [w for w in self.work.values() if w.answer is not None and _attempt(w) not in sent]:
                if work.session != session.id:
                    continue  # its lease is another session's (or was not resumed): not ours to answer
                session.send(await self._answer(work, session))
                sent.add(_attempt(work))

    async def _answer(self, work: Work, session: _Session) -> Done | Failed:
        offer, answer = work.offer, work.answer
        if isinstance(answer, Failure):
            return Failed(job_id=offer.job_id, attempt=offer.attempt, failure=answer)
        assert answer is not None
        if work.stored is None:
            try:
                work.stored = [await session.files.store_output(f) for f in answer.files]
            except aiohttp.ClientResponseError as exc:  # the router could not take them (its disk is full, say)
                work.answer = Failure.of(InfrastructureFault(f"the router refused the outputs: HTTP {exc.status}"))
                return Failed(job_id=offer.job_id, attempt=offer.attempt, failure=work.answer)
            except aiohttp.ClientError:  # the connection broke (an OSError too): the next one uploads again
                raise
            except OSError as exc:  # the shared store's disk is full, say
                work.answer = Failure.of(InfrastructureFault.of_os_error(exc, "storing the outputs"))
                return Failed(job_id=offer.job_id, attempt=offer.attempt, failure=work.answer)
        return Done(job_id=offer.job_id, attempt=offer.attempt, artifacts=work.stored, texts=answer.texts,
                    details=answer.details)

    # ---- what this agent offers -------------------------------------------------------------------

    async def _hello(self) -> Hello:
        cpu_only, devices = await asyncio.to_thread(report_devices, self.settings)
        return Hello(name=self.name, instance=self.instance, cpu_only=cpu_only, devices=devices,
                     models=await self._models(), capabilities=self._capabilities(),
                     concurrency=self.settings.agent.concurrency, held=[w.held for w in self.work.values()])

    def _capabilities(self) -> list[Capability]:
        offered = []
        for runner in self._runners:
            for capability in runner.capabilities():
                self._routes[capability.name] = runner
                offered.append(capability)
        return offered

    async def _models(self) -> list[Model]:
        models = []
        for runner in self._runners:
            try:
                models += await runner.models()
            except Exception:  # one runner's trouble must not silence the heartbeat
                log.exception("listing models failed", extra={"runner": type(runner).__name__})
        return models

    def _mark_alive(self) -> None:
        """What `gpugate health --agent` (the container's HEALTHCHECK) reads: connected as of now."""
        path = self.settings.health_dir / f"{self.name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_suffix(".part")
        part.write_text(json.dumps({"router": self.url, "time": time.time()}))
        part.replace(path)  # the health check never reads half a file


def router_urls(setting: str) -> list[str]:
    """The routers ``agent.router_url`` names: one URL, or several separated by commas or spaces."""
    return [u.rstrip("/") for u in setting.replace(",", " ").split()]


def _attempt(work: Work) -> tuple[int, int]:
    return work.offer.job_id, work.offer.attempt
