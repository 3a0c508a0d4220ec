"""Who may call what: client keys for the public API and artifacts, the agent token for /agent/.

Every path but /health, /openapi.json, the pages' static files and signed file URLs (their
signature is their credential, router/urls.py) needs one: 401 without a valid credential, 403 for an
API the key may not call.
"""

from __future__ import annotations

import hmac
from typing import Any

from aiohttp import web

from ..keys import bearer, digest, may_call
from ..state import KEY, SETTINGS, STORE
from ..store import store_call
from .errors import ApiError
from .files import is_signed

OPEN = {"/", "/health", "/openapi.json", "/ui", "/ui/"}
OPENAI_PREFIX = "/v1/"  # OpenAI's paths: a key that may chat (OpenAiChatCompletion) may call them


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path in OPEN or request.path.startswith("/ui/static/"):
        return await handler(request)
    if is_signed(request):  # a signed file URL needs no key: the handler checks the signature
        request[KEY] = None
        return await handler(request)
    header = request.headers.get("Authorization")
    if request.path.startswith("/agent/"):
        token = request.app[SETTINGS].router.agent_token
        given = header.removeprefix("Bearer ").strip() if header and header.startswith("Bearer ") else ""
        if not token or not hmac.compare_digest(given.encode(), token.encode()):
            raise ApiError(401, "Unauthorized", "agents must present the router's agent token")
        request[KEY] = None
        return await handler(request)
    store, token = request.app[STORE], bearer(header)
    key = await store_call(store, store.key_by_digest, digest(token)) if token else None
    if key is not None and key.revoked:
        key = None
    if key is None:
        raise ApiError(401, "Unauthorized", "a valid API key is required: Authorization: Bearer <key>")
    api = request.path.removeprefix("/api/") if request.path.startswith("/api/") else \
        "OpenAiChatCompletion" if request.path.startswith(OPENAI_PREFIX) else None
    if api is not None and not may_call(key, api):
        raise ApiError(403, "Forbidden", f"this key may not call {api}")
    request[KEY] = key
    return await handler(request)
