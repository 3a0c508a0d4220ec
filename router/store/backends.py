"""Which store and archive a router uses: SQLite (the embedded default: data/router.db and monthly
files in data/archive/) or PostgreSQL when ``router.database_url`` names one."""

from __future__ import annotations

import threading

from gpugate.errors import ConfigError
from gpugate.settings import Settings

from ..archive import Archive, JobArchive
from . import Store
from .sqlite import SqliteStore


def open_store(settings: Settings, router: bool = False, give_up: threading.Event | None = None) -> Store:
    """``router``: for the router itself (on PostgreSQL, the one router of its database; a standby
    waits for it until ``give_up`` is set)."""
    if settings.router.standby and not settings.router.database_url:
        raise ConfigError("router.standby needs router.database_url: a standby waits on the PostgreSQL it shares "
                          "with the active router")
    if settings.router.shared and not settings.router.database_url:
        raise ConfigError("router.shared needs router.database_url: routers share the work through one PostgreSQL")
    if settings.router.shared and settings.router.standby:
        raise ConfigError("router.shared and router.standby exclude each other: shared routers all serve at once; "
                          "a standby waits for the one router of its database")
    if settings.router.database_url:
        from .postgres import PostgresStore  # psycopg is needed only then

        hold = None if not router else "shared" if settings.router.shared else "exclusive"
        return PostgresStore(settings.router.database_url, hold=hold, standby=router and settings.router.standby,
                             give_up=give_up)
    return SqliteStore(settings.router_db)


def open_archive(settings: Settings, store: Store) -> Archive:
    """Where ``store``'s finished jobs go: its own database's partitions, or monthly SQLite files."""
    if not isinstance(store, SqliteStore):
        from .postgres import PostgresArchive, PostgresStore

        if isinstance(store, PostgresStore):
            return PostgresArchive(store)
    return JobArchive(settings.archive_dir)
