"""The agents' side of the router: one websocket per agent session, plus file transfer over HTTP.

A session begins with the agent's hello: its wire version is checked first (another version is
refused with a message naming both), then its name (router/sessions.py), then the jobs it still
holds are resumed or dropped (router/outcomes.py), and the welcome names the session. Then
heartbeats, pulls, progress and answers until the socket closes; each answer is acknowledged so
the agent can forget the job. The router closing (shutdown) is not the agent failing: the agent
keeps running its jobs and brings them back to the next router.
"""

from __future__ import annotations

import logging
import time

from aiohttp import WSCloseCode, WSMsgType, web
from pydantic import ValidationError

from gpugate.filestore import extension_for
from gpugate.wire import (
    WIRE_VERSION, Ack, Delta, Done, Failed, Heartbeat, Hello, JobOffer, Leaving, Progress, Pull, Refused, StopJob, Welcome,
    agent_message, version_of,
)

from ..peers import Peers
from ..sessions import AgentSession, Refusal, SessionRegistry
from ..state import ARTIFACTS, DISPATCHER, OUTCOMES, PEERS, SESSIONS, SETTINGS
from .errors import ApiError

log = logging.getLogger(__name__)
HELLO_TIMEOUT_S = 30.0
CLOSE_REFUSED = 4409  # the agent logs the reason and tries again later
CLOSE_WRONG_VERSION = 4426


def routes() -> list[web.RouteDef]:
    return [web.get("/agent/ws", agent_socket), web.post("/agent/artifacts", upload_artifact),
            web.get("/agent/files/{name}", download_file)]


async def agent_socket(request: web.Request) -> web.WebSocketResponse:
    app = request.app
    ws = web.WebSocketResponse(heartbeat=app[SETTINGS].router.heartbeat_timeout_s / 3, max_msg_size=16 * 2**20)
    await ws.prepare(request)
    try:
        first = await ws.receive(timeout=HELLO_TIMEOUT_S)
    except TimeoutError:
        await _refuse(ws, "no hello within 30s", CLOSE_REFUSED)
        return ws
    hello = await _hello(ws, first.data if first.type is WSMsgType.TEXT else None)
    if hello is None:
        return ws

    async def send(message: JobOffer | StopJob | Ack) -> None:
        await ws.send_str(message.model_dump_json())

    peers = app[PEERS]
    try:
        session, replaced = app[SESSIONS].join(hello, send, ws.close)
        if peers is not None:
            await _admit(peers, app[SESSIONS], session)
    except Refusal as exc:
        log.warning("agent refused", extra={"agent": hello.name, "error": str(exc)})
        await _refuse(ws, str(exc), CLOSE_REFUSED)
        return ws
    outcomes, dispatcher = app[OUTCOMES], app[DISPATCHER]
    try:  # from here on the session ends (and its leases start their clock) however the socket ends
        resumed, dropped = await outcomes.resume(session, hello.held)
        if replaced is not None:  # the same agent's older connection, not yet noticed as dead
            log.warning("agent reconnected; closing its older connection", extra={"agent": session.name})
            await replaced.disconnect()
        log.info("agent joined", extra={"agent": session.name, "session": session.id,
                                        "capabilities": ",".join(session.capabilities), "models": len(session.models),
                                        "free_vram": session.free_vram})
        await ws.send_str(Welcome(session=session.id, store=app[ARTIFACTS].shared, resumed=resumed,
                                  dropped=dropped).model_dump_json())
        dispatcher.wake()
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            try:
                message = agent_message.validate_json(msg.data)
            except ValidationError as exc:
                log.warning("bad message from agent", extra={"agent": session.name, "error": str(exc)[:300]})
                continue
            session.last_seen = time.monotonic()
            if isinstance(message, Pull):
                session.pulled(message.slots, message.capability)
                dispatcher.wake()
            elif isinstance(message, Heartbeat):
                request.app[SESSIONS].heard(session, message)
                dispatcher.wake()
            elif isinstance(message, Progress | Delta):
                outcomes.progress(session, message)
            elif isinstance(message, Done | Failed):
                if isinstance(message, Done):
                    await outcomes.done(session, message)
                else:
                    await outcomes.failed(session, message)
                await send(Ack(job_id=message.job_id, attempt=message.attempt))
            elif isinstance(message, Leaving):
                session.draining = True
                log.info("agent leaving", extra={"agent": session.name})
    finally:
        if app[SESSIONS].leave(session):
            log.warning("agent left", extra={"agent": session.name, "session": session.id})
        await outcomes.session_closed(session)
        dispatcher.wake()
        if peers is not None:
            await peers.left(session)
    return ws


async def _admit(peers: Peers, sessions: SessionRegistry, session: AgentSession) -> None:
    """The routers sharing the database take this session, or it is refused (Refusal): its name is
    another process's, connected to another router; or the database could not say (it retries)."""
    try:
        admitted = await peers.admit(session)
    except Exception as exc:
        log.exception("agent's name could not be checked across routers", extra={"agent": session.name})
        sessions.leave(session)
        raise Refusal(f"the router could not check the agent's name with the other routers ({type(exc).__name__}); "
                      "retrying") from exc
    if not admitted:
        sessions.leave(session)
        raise Refusal(f"an agent named {session.name!r} is connected to another router of this database; each agent "
                      "needs its own name: set agent.name (or GPUGATE_AGENT__NAME). Retrying in case it is leaving.")


async def _hello(ws: web.WebSocketResponse, raw: str | None) -> Hello | None:
    """The agent's hello, or None once it has been refused (another version, or not a hello)."""
    version = version_of(raw) if raw is not None else None
    if version is not None and version != WIRE_VERSION:
        await _refuse(ws, f"this router speaks wire protocol version {WIRE_VERSION}, the agent {version}: "
                          "run the same gpugate version on the router and its agents", CLOSE_WRONG_VERSION)
        return None
    try:
        hello = agent_message.validate_json(raw) if raw is not None else None
    except ValidationError as exc:
        await _refuse(ws, f"expected a hello: {str(exc)[:300]}", WSCloseCode.POLICY_VIOLATION)
        return None
    if not isinstance(hello, Hello):
        await _refuse(ws, "expected a hello first", WSCloseCode.POLICY_VIOLATION)
        return None
    return hello


async def _refuse(ws: web.WebSocketResponse, reason: str, code: int) -> None:
    await ws.send_str(Refused(reason=reason).model_dump_json())
    await ws.close(code=code, message=reason[:120].encode())


async def close_all(app: web.Application) -> None:
    """On router shutdown: close every agent's socket as "going away". Their jobs keep running and
    their leases wait for the next router (router/queue.py recover)."""
    for session in list(app[SESSIONS].remote()):
        await session.disconnect()


async def upload_artifact(request: web.Request) -> web.Response:
    """An agent's output file, streamed into the store; answered with its name."""
    ext = extension_for(request.query.get("fileName", ""), request.content_type)
    async with request.app[ARTIFACTS].intake() as intake:
        received = await intake.receive(request.content.iter_any())
        return web.json_response({"name": await intake.keep(received, ext)})


async def download_file(request: web.Request) -> web.StreamResponse:
    path = request.app[ARTIFACTS].path(request.match_info["name"])
    if path is None:
        raise ApiError(404, "NotFound", "no such file")
    return web.FileResponse(path)
