"""API keys: random bearer tokens, stored only as their SHA-256 digest.

A key may be limited to a list of APIs; a limit naming ``X`` also allows ``QueueX``. Status
look-ups, job events, cancel, the job history and artifacts are open to every valid key (for its
own jobs). Agents never use client
keys: they present the router's agent token.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .store import Key, KeyLimits, Store

PREFIX = "gg_"
# about the key's own jobs, so open to every key
ALWAYS_ALLOWED = {"GetArtifactGenerationStatus", "GetTextGenerationStatus", "GetJobEvents", "CancelJob", "QueryJobs",
                  "GetOpenAiChatStatus", "GetOpenAiChat", "WaitForOpenAiChat"}


@dataclass(frozen=True)
class NewKey:
    key: Key
    token: str  # shown once, never stored


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_key(store: Store, name: str, apis: tuple[str, ...] | None = None, admin: bool = False,
               limits: KeyLimits = KeyLimits()) -> NewKey:
    """A new key, with its own webhook secret for signing its jobs' callbacks."""
    token = PREFIX + secrets.token_urlsafe(32)
    return NewKey(store.add_key(name, digest(token), token[:10], apis, admin, time.time(), new_webhook_secret(),
                                limits), token)


def new_webhook_secret() -> str:
    """A Standard Webhooks secret: ``whsec_`` and base64 of 24 random bytes."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def read_or_make(path: Path, make: Callable[[], str]) -> str:
    """A secret kept in a file readable by its owner only, made on first use."""
    if path.exists():
        return path.read_text().strip()
    value = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(value + "\n")
    return value


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, or None."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    return authorization[len("Bearer "):].strip() or None


def authenticate(store: Store, authorization: str | None) -> Key | None:
    """The live key behind an ``Authorization: Bearer`` header, or None."""
    token = bearer(authorization)
    key = store.key_by_digest(digest(token)) if token else None
    return key if key is not None and not key.revoked else None


def may_call(key: Key, api: str) -> bool:
    if key.apis is None or api in ALWAYS_ALLOWED:
        return True
    return api in key.apis or api.removeprefix("Queue") in key.apis
