"""Finished jobs, out of the live store: one SQLite file per month, data/archive/YYYY-MM.db.

Each file holds the live store's jobs table (request, result names, timings, agent, key, error),
filed by the month the job was queued (UTC). The mover copies a batch of old finished jobs into
their files, then deletes them from the live store; a crash between the two only repeats the copy,
which replaces rows by id. Queries run over the live store and the archive alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from typing import Any, Protocol

from .store import Job, JobQuery, Store, store_call
from .store.sqlite import ADDED_JOB_COLUMNS, JOB_COLUMNS, JOBS_TABLE, add_missing_columns, encode, find_jobs, job_of

log = logging.getLogger(__name__)
BATCH = 500
INDEXES = """
CREATE INDEX IF NOT EXISTS jobs_ref_id ON jobs (ref_id, key_id);
CREATE INDEX IF NOT EXISTS jobs_tag ON jobs (tag);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created);
"""


def month_of(when: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(when))


class Archive(Protocol):
    """Finished jobs out of the live store, queried the same way (JobArchive: monthly SQLite files;
    router/store/postgres.py PostgresArchive: monthly partitions)."""

    def files(self) -> list[Any]: ...  # what an earlier version made, to bring up to date
    def month(self, path: Any) -> list[Job]: ...
    def put(self, jobs: list[Job]) -> None: ...
    def find(self, query: JobQuery) -> list[Job]: ...
    def get(self, job_id: int) -> Job | None: ...
    def close(self) -> None: ...


class JobArchive:
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def files(self) -> list[Path]:
        """The monthly files, newest first."""
        return sorted(self.folder.glob("[0-9][0-9][0-9][0-9]-[0-9][0-9].db"), reverse=True)

    def put(self, jobs: list[Job]) -> None:
        by_month: dict[str, list[Job]] = {}
        for job in jobs:
            by_month.setdefault(month_of(job.created), []).append(job)
        self.folder.mkdir(parents=True, exist_ok=True)
        columns = ("id", *JOB_COLUMNS)
        sql = f"INSERT OR REPLACE INTO jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
        for month, batch in by_month.items():
            with self._open(self.folder / f"{month}.db", create=True) as db, db:
                db.executemany(sql, [[job.id, *(encode(c, getattr(job, c)) for c in JOB_COLUMNS)] for job in batch])

    def find(self, query: JobQuery) -> list[Job]:
        found: list[Job] = []
        for path in self.files():
            month = path.stem
            if (query.since is not None and month < month_of(query.since)) or len(found) >= query.limit:
                break
            if query.until is not None and month > month_of(query.until):
                continue
            with self._open(path) as db:
                found += find_jobs(db, dataclasses.replace(query, limit=query.limit - len(found)))
        return found

    def get(self, job_id: int) -> Job | None:
        for path in self.files():
            with self._open(path) as db:
                if (job := job_of(db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())) is not None:
                    return job
        return None

    def close(self) -> None:
        return None  # each call opens and closes its file

    def month(self, path: Path) -> list[Job]:
        """Every job in one monthly file."""
        with self._open(path) as db:
            return [j for j in map(job_of, db.execute("SELECT * FROM jobs")) if j is not None]

    @staticmethod
    @contextlib.contextmanager
    def _open(path: Path, create: bool = False) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(path if create else f"file:{path}?mode=ro", uri=not create)
        db.row_factory = sqlite3.Row
        try:
            if create:
                add_missing_columns(db, {"jobs": ADDED_JOB_COLUMNS})
                db.executescript(JOBS_TABLE + INDEXES)
            yield db
        finally:
            db.close()


async def bring_up_to_date(store: Store, archive: Archive) -> None:
    """Once, for a store made by an earlier version: record the refIds and files of archived jobs
    in the live store, so refIds stay unique and retention finds the files (in a worker thread)."""
    if not store.needs_backfill():
        return
    for path in archive.files():
        store.backfill(await asyncio.to_thread(archive.month, path))
    store.mark_current()
    log.info("store brought up to date")


async def archive_finished(store: Store, archive: Archive, older_than_s: float) -> int:
    """Move finished jobs older than ``older_than_s`` into the archive; how many moved. The archive
    is written in a worker thread; the live store is called through ``store_call``."""
    moved = 0
    while jobs := await store_call(store, store.finished_before, time.time() - older_than_s, BATCH):
        await asyncio.to_thread(archive.put, jobs)
        await store_call(store, store.forget_jobs, [j.id for j in jobs])
        moved += len(jobs)
    return moved


async def keep_archiving(store: Store, archive: Archive, older_than_s: float, every_s: float) -> None:
    """The router's archiving task."""
    while True:
        try:
            if moved := await archive_finished(store, archive, older_than_s):
                log.info("jobs archived", extra={"jobs": moved})
        except Exception:  # a full disk, say: the jobs stay in the live store; try again later
            log.exception("archiving failed; retrying")
        await asyncio.sleep(every_s)

