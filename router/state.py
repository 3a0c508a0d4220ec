"""Typed keys for what the router's app shares between handlers."""

from __future__ import annotations

from aiohttp import web

from gpugate.settings import Settings

from .agents import AgentRegistry
from .archive import JobArchive
from .artifacts import ArtifactStore
from .callbacks import CallbackSender
from gpugate.catalog import Catalog
from .metrics import Metrics
from .queue import JobQueue
from .store import Key, Store

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)  # type: ignore[type-abstract]
QUEUE = web.AppKey("queue", JobQueue)
AGENTS = web.AppKey("agents", AgentRegistry)
ARTIFACTS = web.AppKey("artifacts", ArtifactStore)
CATALOG = web.AppKey("catalog", Catalog)
ARCHIVE = web.AppKey("archive", JobArchive)
CALLBACKS = web.AppKey("callbacks", CallbackSender)
METRICS = web.AppKey("metrics", Metrics)
KEY = web.RequestKey("key", Key | None)  # the caller's API key (None for agents)

__all__ = ["SETTINGS", "STORE", "QUEUE", "AGENTS", "ARTIFACTS", "CATALOG", "ARCHIVE", "CALLBACKS", "METRICS", "KEY",
           "Key"]
