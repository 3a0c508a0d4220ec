"""For operators (admin keys only): API keys, the live dashboard's data, and /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from ..keys import create_key
from ..sessions import router_of
from ..state import CALLBACKS, FINDER, KEY, METRICS, QUEUE, RETENTION, SESSIONS, STORE
from ..store import JobQuery, JobState, Key, KeyLimits, store_call
from .errors import ApiError
from .public import links
from .requests import read_fields, validate_fields
from .responses import AgentInfo, Dashboard, DeviceInfo, JobSummary, KeyInfo, KeysResponse, NewKeyResponse

DASHBOARD_EVERY_S = 1.0


def routes() -> list[web.RouteDef]:
    return [web.get("/api/ListApiKeys", list_keys), web.post("/api/CreateApiKey", create),
            web.post("/api/RevokeApiKey", revoke), web.post("/api/SetApiKeyLimits", set_limits), web.get("/api/GetDashboard", dashboard),
            web.get("/api/GetDashboardEvents", dashboard_events), web.get("/metrics", metrics)]


def _admin(request: web.Request) -> Key:
    key: Key = request[KEY]
    if not key.admin:
        raise ApiError(403, "Forbidden", "an admin key is required")
    return key


def _key_info(key: Key) -> KeyInfo:
    return KeyInfo.model_validate({**key.__dict__, "apis": list(key.apis) if key.apis is not None else None,
                                   **key.limits.__dict__})


async def list_keys(request: web.Request) -> web.Response:
    _admin(request)
    store = request.app[STORE]
    return web.json_response(KeysResponse(keys=[_key_info(k) for k in await store_call(store, store.list_keys)]).body())


def _api_list(value: Any) -> Any:
    return [a.strip() for a in value.split(",") if a.strip()] if isinstance(value, str) else value


class LimitsRequest(BaseModel):
    """A key's limits (router/limits.py): its weight when keys take turns, its queued jobs at most,
    its jobs a minute at most (absent: no limit)."""

    model_config = ConfigDict(populate_by_name=True)
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    max_queued: Annotated[int | None, Field(ge=1, le=10**7, alias="maxQueued")] = None
    per_minute: Annotated[int | None, Field(ge=1, le=10**7, alias="perMinute")] = None

    def limits(self) -> KeyLimits:
        return KeyLimits(self.weight, self.max_queued, self.per_minute)


class NewKeyRequest(LimitsRequest):
    name: Annotated[str, Field(max_length=200)] = ""
    apis: Annotated[list[str] | None, BeforeValidator(_api_list)] = None  # a list or "A,B"; none: every API
    admin: bool = False


class RevokeKeyRequest(BaseModel):
    id: Annotated[int, Field(ge=1, lt=2**63)]


class SetLimitsRequest(LimitsRequest):
    id: Annotated[int, Field(ge=1, lt=2**63)]


async def create(request: web.Request) -> web.Response:
    _admin(request)
    asked: NewKeyRequest = validate_fields(NewKeyRequest, await read_fields(request))
    new = await store_call(request.app[STORE], create_key, request.app[STORE], asked.name,
                           tuple(asked.apis) if asked.apis else None, asked.admin, asked.limits())
    return web.json_response(NewKeyResponse(key=_key_info(new.key), token=new.token,
                                            webhook_secret=new.key.webhook_secret or "").body())


async def revoke(request: web.Request) -> web.Response:
    _admin(request)
    asked: RevokeKeyRequest = validate_fields(RevokeKeyRequest, await read_fields(request))
    store = request.app[STORE]
    if not await store_call(store, store.revoke_key, asked.id):
        raise ApiError(404, "NotFound", f"no active key {asked.id}")
    return web.json_response(_key_info(next(k for k in await store_call(store, store.list_keys) if k.id == asked.id)).body())


async def set_limits(request: web.Request) -> web.Response:
    """A key's weight, queued-job cap and rate (each absent one: none; the weight: 1)."""
    _admin(request)
    asked: SetLimitsRequest = validate_fields(SetLimitsRequest, await read_fields(request))
    store = request.app[STORE]
    if not await store_call(store, store.set_key_limits, asked.id, asked.limits()):
        raise ApiError(404, "NotFound", f"no key {asked.id}")
    key = await store_call(store, store.get_key, asked.id)
    assert key is not None
    return web.json_response(_key_info(key).body())


async def _dashboard(request: web.Request) -> Dashboard:
    app = request.app
    queue = app[QUEUE]
    live = list(queue.live.values())
    waiting: dict[str, int] = {}
    for job in live:
        if job.state == JobState.QUEUED:
            waiting[job.api] = waiting.get(job.api, 0) + 1
    sessions, now = app[SESSIONS], time.time()
    here = {a.id for a in sessions.remote()}
    agents = [AgentInfo(name=a.name, cpu_only=a.cpu_only, devices=[DeviceInfo.model_validate(d.model_dump()) for d in a.devices],
                        loaded=sorted(a.loaded), running=sorted(j.id for j in queue.leases_of([a.id])),
                        capabilities=sorted(a.capabilities), models=len(a.models), paused=sessions.paused(a.name, now),
                        draining=a.draining, router=None if a.id in here else router_of(a.id))
              for a in sorted(sessions.remote() + sessions.elsewhere(), key=lambda a: a.name)]
    problem, found = app[RETENTION].disk_problem(), links(request)
    return Dashboard(agents=agents, queue=waiting, running=sum(j.state == JobState.STARTED for j in live),
                     recent=[JobSummary.of(j, found) for j in await app[FINDER].find(JobQuery(limit=20))],
                     throughput=app[METRICS].throughput(now), problems=[problem] if problem else [])


async def dashboard(request: web.Request) -> web.Response:
    _admin(request)
    return web.json_response((await _dashboard(request)).body())


async def dashboard_events(request: web.Request) -> web.StreamResponse:
    """The dashboard's data as server-sent events, once a second while the client listens."""
    _admin(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    with contextlib.suppress(ConnectionResetError):  # the page was closed
        while True:
            await response.write(f"event: dashboard\ndata: {json.dumps((await _dashboard(request)).body())}\n\n".encode())
            await asyncio.sleep(DASHBOARD_EVERY_S)
    return response


async def metrics(request: web.Request) -> web.Response:
    _admin(request)
    app = request.app
    text = app[METRICS].render(app[QUEUE].live.values(), app[SESSIONS], app[CALLBACKS].outcomes, app[RETENTION])
    return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
