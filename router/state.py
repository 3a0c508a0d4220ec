"""Typed keys for what the router's app shares between handlers."""

from __future__ import annotations

from aiohttp import web

from gpugate.catalog import Catalog
from gpugate.settings import Settings

from .archive import Archive
from .artifacts import ArtifactStore
from .callbacks import CallbackSender
from .dispatch import Dispatcher
from .limits import KeyLimiter
from .lookup import JobFinder
from .metrics import Metrics
from .models import ModelBook
from .outcomes import Outcomes
from .peers import Peers
from .queue import JobQueue
from .retention import Retention
from .sessions import SessionRegistry
from .store import Key, Store
from .urls import UrlSigner

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", Store)  # type: ignore[type-abstract]
QUEUE = web.AppKey("queue", JobQueue)
FINDER = web.AppKey("finder", JobFinder)
SESSIONS = web.AppKey("sessions", SessionRegistry)
DISPATCHER = web.AppKey("dispatcher", Dispatcher)
OUTCOMES = web.AppKey("outcomes", Outcomes)
ARTIFACTS = web.AppKey("artifacts", ArtifactStore)
RETENTION = web.AppKey("retention", Retention)
CATALOG = web.AppKey("catalog", Catalog)
MODELS = web.AppKey("models", ModelBook)
ARCHIVE = web.AppKey("archive", Archive)  # type: ignore[type-abstract]
CALLBACKS = web.AppKey("callbacks", CallbackSender)
METRICS = web.AppKey("metrics", Metrics)
SIGNER = web.AppKey("signer", UrlSigner)
LIMITER = web.AppKey("limiter", KeyLimiter)
PEERS = web.AppKey[Peers | None]("peers")  # None unless routers share the database (router.shared)
KEY = web.RequestKey("key", Key | None)  # the caller's API key (None for agents)

__all__ = ["SETTINGS", "STORE", "QUEUE", "FINDER", "SESSIONS", "DISPATCHER", "OUTCOMES", "ARTIFACTS", "RETENTION",
           "CATALOG", "MODELS", "ARCHIVE", "CALLBACKS", "METRICS", "SIGNER", "LIMITER", "PEERS", "KEY", "Key"]
