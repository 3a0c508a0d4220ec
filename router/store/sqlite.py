"""The store on SQLite: one file in the data folder, WAL journal.

``synchronous=NORMAL`` with WAL: every commit is in the log file before the call returns, so a
crash or kill of the router loses nothing; only a power cut can undo the latest commits (an
operator who needs that too sets ``PRAGMA synchronous=FULL`` at the cost of an fsync per change).
Calls run on the event loop's thread: each is a few tens of microseconds, less than a hand-off to
a worker thread would cost (see bench/router.py).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from . import DuplicateRefId, Job, JobState, Key

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    api TEXT NOT NULL, capability TEXT NOT NULL, params TEXT NOT NULL, inputs TEXT NOT NULL,
    model TEXT, megapixels REAL NOT NULL, max_attempts INTEGER NOT NULL,
    key_id INTEGER, ref_id TEXT, tag TEXT, reply_to TEXT,
    state TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, agent TEXT,
    excluded TEXT NOT NULL DEFAULT '[]', min_free_vram INTEGER NOT NULL DEFAULT 0,
    results TEXT, error TEXT, created REAL NOT NULL, started REAL, finished REAL
);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_ref ON jobs (coalesce(key_id, 0), ref_id) WHERE ref_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (state) WHERE state IN ('Queued', 'Started');
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, digest TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL, apis TEXT, admin INTEGER NOT NULL, created REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
"""

_JOB_COLUMNS = ("api", "capability", "params", "inputs", "model", "megapixels", "max_attempts", "key_id", "ref_id",
                "tag", "reply_to", "state", "attempt", "agent", "excluded", "min_free_vram", "results", "error",
                "created", "started", "finished")
_JSON = {"params", "inputs", "excluded", "results", "error"}


class SqliteStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: each statement is its own transaction
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")  # `gpugate keys` may write while the router runs
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    # ---- jobs ------------------------------------------------------------------------------------

    def add_job(self, job: Job) -> Job:
        values = [_encode(c, getattr(job, c)) for c in _JOB_COLUMNS]
        try:
            cur = self._db.execute(
                f"INSERT INTO jobs ({', '.join(_JOB_COLUMNS)}) VALUES ({', '.join('?' * len(_JOB_COLUMNS))})", values)
        except sqlite3.IntegrityError as exc:
            raise DuplicateRefId(job.ref_id) from exc
        job.id = cur.lastrowid or 0
        return job

    def get_job(self, job_id: int) -> Job | None:
        return _job(self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def get_job_by_ref(self, key_id: int | None, ref_id: str) -> Job | None:
        row = self._db.execute("SELECT * FROM jobs WHERE coalesce(key_id, 0) = ? AND ref_id = ?",
                               (key_id or 0, ref_id)).fetchone()
        return _job(row)

    def unfinished_jobs(self) -> list[Job]:
        rows = self._db.execute("SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY id", (JobState.QUEUED, JobState.STARTED))
        return [j for j in map(_job, rows) if j is not None]

    def claim(self, job_id: int, agent: str, attempt: int, now: float) -> bool:
        cur = self._db.execute(
            "UPDATE jobs SET state = ?, agent = ?, attempt = ?, started = ? WHERE id = ? AND state = ?",
            (JobState.STARTED, agent, attempt, now, job_id, JobState.QUEUED))
        return cur.rowcount == 1

    def requeue(self, job: Job, now: float) -> bool:
        cur = self._db.execute(
            "UPDATE jobs SET state = ?, agent = NULL, excluded = ?, min_free_vram = ? "
            "WHERE id = ? AND state = ? AND attempt = ?",
            (JobState.QUEUED, json.dumps(job.excluded), job.min_free_vram, job.id, JobState.STARTED, job.attempt))
        return cur.rowcount == 1

    def finish(self, job: Job, now: float) -> bool:
        """Record a final state; only the attempt that holds the job (or a queued job) can."""
        cur = self._db.execute(
            "UPDATE jobs SET state = ?, results = ?, error = ?, finished = ? "
            "WHERE id = ? AND attempt = ? AND state IN (?, ?)",
            (job.state, _encode("results", job.results), _encode("error", job.error), now, job.id, job.attempt,
             JobState.QUEUED, JobState.STARTED))
        return cur.rowcount == 1

    # ---- keys ------------------------------------------------------------------------------------

    def add_key(self, name: str, digest: str, prefix: str, apis: tuple[str, ...] | None, admin: bool, now: float) -> Key:
        cur = self._db.execute("INSERT INTO api_keys (name, digest, prefix, apis, admin, created) VALUES (?, ?, ?, ?, ?, ?)",
                               (name, digest, prefix, json.dumps(apis) if apis is not None else None, int(admin), now))
        return Key(cur.lastrowid or 0, name, prefix, apis, admin, now, False)

    def key_by_digest(self, digest: str) -> Key | None:
        row = self._db.execute("SELECT * FROM api_keys WHERE digest = ?", (digest,)).fetchone()
        return _key(row) if row else None

    def list_keys(self) -> list[Key]:
        return [_key(r) for r in self._db.execute("SELECT * FROM api_keys ORDER BY id")]

    def revoke_key(self, key_id: int) -> bool:
        return self._db.execute("UPDATE api_keys SET revoked = 1 WHERE id = ? AND revoked = 0", (key_id,)).rowcount == 1


def _encode(column: str, value: Any) -> Any:
    return json.dumps(value) if column in _JSON and value is not None else value


def _job(row: sqlite3.Row | None) -> Job | None:
    if row is None:
        return None
    data = {c: (json.loads(row[c]) if c in _JSON and row[c] is not None else row[c]) for c in _JOB_COLUMNS}
    return Job(id=row["id"], **data)


def _key(row: sqlite3.Row) -> Key:
    apis = tuple(json.loads(row["apis"])) if row["apis"] is not None else None
    return Key(row["id"], row["name"], row["prefix"], apis, bool(row["admin"]), row["created"], bool(row["revoked"]))
