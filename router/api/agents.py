"""The agents' side of the router: one websocket per agent, plus file transfer over HTTP."""

from __future__ import annotations

import logging
import time

from aiohttp import WSMsgType, web
from pydantic import ValidationError

from gpugate.filestore import extension_for
from gpugate.wire import Done, Failed, Heartbeat, Hello, JobOffer, Progress, Pull, StopJob, Welcome, agent_message

from ..state import AGENTS, ARTIFACTS, QUEUE, SETTINGS
from .errors import ApiError

log = logging.getLogger(__name__)


def routes() -> list[web.RouteDef]:
    return [web.get("/agent/ws", agent_socket), web.post("/agent/artifacts", upload_artifact),
            web.get("/agent/files/{name}", download_file)]


async def agent_socket(request: web.Request) -> web.WebSocketResponse:
    """An agent's session: hello first, then heartbeats, pulls, progress and outcomes until it closes."""
    app = request.app
    ws = web.WebSocketResponse(heartbeat=app[SETTINGS].router.heartbeat_timeout_s / 3, max_msg_size=16 * 2**20)
    await ws.prepare(request)
    first = await ws.receive()
    try:
        hello = agent_message.validate_json(first.data) if first.type is WSMsgType.TEXT else None
    except ValidationError:
        hello = None
    if not isinstance(hello, Hello):
        await ws.close(code=4400, message=b"expected hello")
        return ws

    async def send(message: JobOffer | StopJob) -> None:
        await ws.send_str(message.model_dump_json())

    agent = app[AGENTS].join(hello, send, ws.close)
    queue = app[QUEUE]
    log.info("agent joined", extra={"agent": agent.name, "capabilities": ",".join(agent.capabilities),
                                    "models": len(agent.models), "free_vram": agent.free_vram})
    await ws.send_str(Welcome(store=app[ARTIFACTS].shared).model_dump_json())
    try:
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            try:
                message = agent_message.validate_json(msg.data)
            except ValidationError as exc:
                log.warning("bad message from agent", extra={"agent": agent.name, "error": str(exc)[:300]})
                continue
            agent.last_seen = time.monotonic()
            if isinstance(message, Pull):
                agent.slots += message.slots
                queue.wake()
            elif isinstance(message, Heartbeat):
                agent.heard(message)
                queue.wake()
            elif isinstance(message, Progress):
                queue.on_progress(agent, message)
            elif isinstance(message, Done):
                queue.on_done(agent, message)
            elif isinstance(message, Failed):
                queue.on_failed(agent, message)
    finally:
        if app[AGENTS].leave(agent):
            log.warning("agent left", extra={"agent": agent.name, "running": len(agent.running)})
            queue.agent_lost(agent)
    return ws


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
