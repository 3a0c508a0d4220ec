"""API keys: random bearer tokens, stored only as their SHA-256 digest.

A key may be limited to a list of APIs; a limit naming ``X`` also allows ``QueueX``. Status
look-ups and artifacts are open to every valid key (for its own jobs). Agents never use client
keys: they present the router's agent token.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from .store import Key, Store

PREFIX = "gg_"
ALWAYS_ALLOWED = {"GetArtifactGenerationStatus", "GetTextGenerationStatus"}


@dataclass(frozen=True)
class NewKey:
    key: Key
    token: str  # shown once, never stored


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_key(store: Store, name: str, apis: tuple[str, ...] | None = None, admin: bool = False) -> NewKey:
    token = PREFIX + secrets.token_urlsafe(32)
    return NewKey(store.add_key(name, digest(token), token[:10], apis, admin, time.time()), token)


def authenticate(store: Store, authorization: str | None) -> Key | None:
    """The live key behind an ``Authorization: Bearer`` header, or None."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    key = store.key_by_digest(digest(authorization[len("Bearer "):].strip()))
    return key if key is not None and not key.revoked else None


def may_call(key: Key, api: str) -> bool:
    if key.apis is None or api in ALWAYS_ALLOWED:
        return True
    return api in key.apis or api.removeprefix("Queue") in key.apis
