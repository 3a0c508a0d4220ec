"""What can run: the models and voices the catalog names and the connected agents serve, and the
workflows the agents serve, in AI Server's shapes (ActiveMediaModels, QueryMediaModels,
QueryTextToSpeechVoices, GetComfyModels) and gpugate's (GetComfyWorkflows, GetComfyWorkflowInfo).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gpugate.errors import FieldError
from gpugate.wire import Model

from ..families import TASKS
from ..models import ModelBook
from ..state import MODELS
from .errors import invalid
from .requests import read_fields

IMAGE_KINDS = ("checkpoints",)  # what TextToImage & co. load (bare diffusion models need a workflow of their own)
MEDIA_KINDS = (*IMAGE_KINDS, "upscale_models", "whisper", "piper")
TASK_APIS = {"txt2img": "TextToImage", "img2img": "ImageToImage", "inpaint": "ImageWithMask"}


def routes() -> list[web.RouteDef]:
    out = []
    for name, handler in (("ActiveMediaModels", active_media_models), ("QueryMediaModels", query_media_models),
                          ("QueryTextToSpeechVoices", query_voices), ("GetComfyModels", comfy_models),
                          ("GetComfyWorkflows", comfy_workflows), ("GetComfyWorkflowInfo", comfy_workflow_info)):
        out += [web.get(f"/api/{name}", handler), web.post(f"/api/{name}", handler)]
    return out


def ids_served(models: ModelBook, kind: str) -> list[str]:
    """The ids of ``kind`` some connected agent can serve now: catalog names and aliases of files an
    agent has, then files agents have that the catalog does not name."""
    reported = models.reported(kind)
    ids = [i for i in models.catalog.ids(kind) if (e := models.catalog.find(i, kind)) is not None and e.file in reported]
    named = {e.file for e in models.catalog.entries.values() if e.kind == kind}
    return ids + sorted(f for f in reported if f not in named)


async def active_media_models(request: web.Request) -> web.Response:
    models = request.app[MODELS]
    return web.json_response({"results": [i for kind in MEDIA_KINDS for i in ids_served(models, kind)]})


@dataclass(frozen=True)
class _Fleet:
    """Who has which model file now, read once per request."""

    holders: dict[tuple[str, str], dict[str, Model]]  # (kind, file) -> agent name -> what it reported
    loaded: frozenset[str]

    @classmethod
    def of(cls, models: ModelBook) -> _Fleet:
        holders: dict[tuple[str, str], dict[str, Model]] = {}
        loaded: set[str] = set()
        for session in models.agents():
            loaded |= session.loaded
            for m in session.models:
                holders.setdefault((m.kind, m.name), {})[session.name] = m
        return cls(holders, frozenset(loaded))


def media_model(models: ModelBook, fleet: _Fleet, id_: str, kind: str, file: str) -> dict[str, Any]:
    """One image model in AI Server's MediaModel shape, with its family's txt2img defaults."""
    entry = models.catalog.find(id_, kind)
    held = fleet.holders.get((kind, file), {})
    family_name = (entry.family if entry else None) or next((m.family for m in held.values() if m.family), None)
    family = models.families.get(family_name)
    defaults = family.recipes["txt2img"].defaults if family and "txt2img" in family.recipes else {}
    width, height = defaults.get("width"), defaults.get("height")
    return {"id": id_, "apiModels": {agent: file for agent in held}, "url": entry.files[0].url if entry and entry.files else None,
            "description": entry.description if entry else None, "family": family_name,
            "familyTitle": family.title if family and family.name == family_name else None,
            "width": width, "height": height, "aspectRatio": f"{width}:{height}" if width and height else None,
            "steps": defaults.get("steps"), "cfgScale": defaults.get("cfg"), "sampler": defaults.get("sampler"),
            "scheduler": defaults.get("scheduler"), "guidance": defaults.get("guidance"), "shift": defaults.get("shift"),
            "negativePrompt": family.negative_prompt if family else True, "modelType": "TextToImage",
            "supportedTasks": [TASK_APIS[t] for t in TASKS if family and t in family.recipes],
            "onDemand": file not in fleet.loaded, "available": bool(held),
            "sizeBytes": next((m.size for m in held.values() if m.size), None)}


async def query_media_models(request: web.Request) -> web.Response:
    """Catalog image models and the files agents report, with family, tasks and defaults; ``id``
    narrows to one (a name or alias), ``skip``/``take`` page."""
    models = request.app[MODELS]
    fleet = _Fleet.of(models)
    query = await read_fields(request)
    wanted = str(query.get("id") or "")
    rows = []
    for kind in IMAGE_KINDS:
        named = set()
        for entry in (e for e in models.catalog.entries.values() if e.kind == kind):
            named.add(entry.file)
            if not wanted or wanted == entry.name or wanted in entry.aliases:
                rows.append(media_model(models, fleet, entry.name, kind, entry.file))
        rows += [media_model(models, fleet, f, kind, f) for (k, f) in sorted(fleet.holders)
                 if k == kind and f not in named and (not wanted or wanted == f)]
    skip, take = _page(query)
    return web.json_response({"offset": skip, "total": len(rows), "results": rows[skip:skip + take]})


async def query_voices(request: web.Request) -> web.Response:
    models = request.app[MODELS]
    skip, take = _page(await read_fields(request))
    reported = models.reported("piper")
    rows = [{"id": e.name, "model": e.file, "aliases": list(e.aliases), "available": e.file in reported,
             "description": e.description} for e in models.catalog.entries.values() if e.kind == "piper"]
    named = {r["model"] for r in rows}
    rows += [{"id": f, "model": f, "aliases": [], "available": True, "description": ""} for f in sorted(reported)
             if f not in named]
    return web.json_response({"offset": skip, "total": len(rows), "results": rows[skip:skip + take]})


async def comfy_models(request: web.Request) -> web.Response:
    """The model files connected agents' ComfyUIs can load (every kind)."""
    files = {m.name for s in request.app[MODELS].agents() for m in s.models if m.kind not in ("whisper", "piper")}
    return web.json_response({"results": sorted(files)})


async def comfy_workflows(request: web.Request) -> web.Response:
    return web.json_response({"results": list(request.app[MODELS].workflows())})


async def comfy_workflow_info(request: web.Request) -> web.Response:
    models = request.app[MODELS]
    name = str((await read_fields(request)).get("workflow") or "")
    served = models.workflows()
    if name not in served:
        problem = "is required" if not name else f"no connected agent serves {name!r}; served: {', '.join(served) or 'none'}"
        raise invalid([FieldError("workflow", problem, "required" if not name else "unknown")])
    capability, agents = served[name]
    return web.json_response({"result": {
        "name": name, "description": capability.description, "agents": agents, "modelKind": capability.model_kind,
        "parameters": {k: p.model_dump(exclude_none=True) for k, p in (capability.params or {}).items()}}})


def _page(query: dict[str, Any]) -> tuple[int, int]:
    try:
        skip, take = int(query.get("skip") or 0), int(query.get("take") or 100)
    except (TypeError, ValueError):
        raise invalid([FieldError("skip", "skip and take must be whole numbers")]) from None
    return max(skip, 0), max(min(take, 1000), 0)
