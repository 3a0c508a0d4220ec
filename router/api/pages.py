"""The built-in pages: dashboard, keys, playground and API explorer, one static app under /ui/.

The page itself holds no data and needs no key; everything it shows comes from the API with the
key the user typed in (kept in the browser's localStorage, sent as a bearer header, never in a URL).
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

UI = Path(__file__).resolve().parent.parent / "ui"


def routes() -> list[web.RouteDef]:
    return [web.get("/", _to_ui), web.get("/ui", _to_ui), web.get("/ui/", index),
            web.static("/ui/static", UI, append_version=True)]


async def _to_ui(request: web.Request) -> web.Response:
    raise web.HTTPFound("/ui/")


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(UI / "index.html", headers={"Cache-Control": "no-cache"})
