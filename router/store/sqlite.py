"""The store on SQLite: one file in the data folder, WAL journal.

``synchronous=NORMAL`` with WAL: every commit is in the log file before the call returns, so a
crash or kill of the router loses nothing; only a power cut can undo the latest commits (an
operator who needs that too sets ``PRAGMA synchronous=FULL`` at the cost of an fsync per change).
Calls run on the event loop's thread (router/store ``store_call``): each is a few tens of
microseconds, less than a hand-off to a worker thread would cost (see bench/router.py).

Files made by earlier versions are brought up to date when opened: missing columns are added, and
the refs and files tables (version 2) are filled from the jobs they hold (``backfill`` does the
same for archived jobs; router/archive.py).
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from . import Delivery, DuplicateRefId, Job, JobQuery, JobState, Key, KeyLimits, StoredFile, query_sql

SCHEMA_VERSION = 2  # PRAGMA user_version: 2 = leases, refs and files
JOBS_TABLE = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    api TEXT NOT NULL, capability TEXT NOT NULL, params TEXT NOT NULL, inputs TEXT NOT NULL,
    model TEXT, megapixels REAL NOT NULL, max_attempts INTEGER NOT NULL,
    key_id INTEGER, ref_id TEXT, tag TEXT, reply_to TEXT, base_url TEXT,
    state TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0, failures INTEGER NOT NULL DEFAULT 0, agent TEXT,
    session TEXT, lease_expires REAL, avoid TEXT NOT NULL DEFAULT '[]', min_free_vram INTEGER NOT NULL DEFAULT 0,
    notes TEXT NOT NULL DEFAULT '[]', results TEXT, error TEXT, created REAL NOT NULL, started REAL, finished REAL
);
"""
SCHEMA = JOBS_TABLE + """
DROP INDEX IF EXISTS jobs_ref;
CREATE INDEX IF NOT EXISTS jobs_ref_id ON jobs (ref_id) WHERE ref_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (state) WHERE state IN ('Queued', 'Started');
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished) WHERE finished IS NOT NULL;
CREATE TABLE IF NOT EXISTS refs (
    key_id INTEGER NOT NULL, ref_id TEXT NOT NULL, job_id INTEGER NOT NULL, PRIMARY KEY (key_id, ref_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (
    name TEXT PRIMARY KEY, job_id INTEGER NOT NULL, key_id INTEGER, label TEXT, finished REAL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS files_job ON files (job_id);
CREATE INDEX IF NOT EXISTS files_finished ON files (finished) WHERE finished IS NOT NULL;
CREATE TABLE IF NOT EXISTS api_keys (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, digest TEXT NOT NULL UNIQUE,
    prefix TEXT NOT NULL, apis TEXT, admin INTEGER NOT NULL, created REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0, webhook_secret TEXT,
    weight INTEGER NOT NULL DEFAULT 1, max_queued INTEGER, per_minute INTEGER
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INTEGER NOT NULL, key_id INTEGER, url TEXT NOT NULL,
    webhook_id TEXT NOT NULL, body TEXT NOT NULL, created REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL, state TEXT NOT NULL, last_error TEXT
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (next_at) WHERE state = 'pending';
"""

JOB_COLUMNS = ("api", "capability", "params", "inputs", "model", "megapixels", "max_attempts", "key_id", "ref_id",
               "tag", "reply_to", "base_url", "state", "attempt", "failures", "agent", "session", "lease_expires",
               "avoid", "min_free_vram", "notes", "results", "error", "created", "started", "finished")
# columns newer than the first stores and archives, added when such a file is opened
ADDED_JOB_COLUMNS = {"base_url": "TEXT", "failures": "INTEGER NOT NULL DEFAULT 0", "session": "TEXT",
                     "lease_expires": "REAL", "avoid": "TEXT NOT NULL DEFAULT '[]'",
                     "notes": "TEXT NOT NULL DEFAULT '[]'"}
KEY_LIMIT_COLUMNS = {"weight": "INTEGER NOT NULL DEFAULT 1", "max_queued": "INTEGER", "per_minute": "INTEGER"}
_JSON = {"params", "inputs", "avoid", "notes", "results", "error"}
_DELIVERY_COLUMNS = ("job_id", "key_id", "url", "webhook_id", "body", "created", "attempts", "next_at", "state",
                     "last_error")


class SqliteStore:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, isolation_level=None)  # autocommit: each statement is its own transaction
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=5000")  # `gpugate keys` may write while the router runs
        add_missing_columns(self._db, {"jobs": ADDED_JOB_COLUMNS, "api_keys": {"webhook_secret": "TEXT", **KEY_LIMIT_COLUMNS},
                                        "files": {"key_id": "INTEGER", "label": "TEXT"}})
        self._db.executescript(SCHEMA)
        if self.needs_backfill():
            self.backfill(self.find_jobs(JobQuery(limit=2**62)))

    def close(self) -> None:
        self._db.close()

    # ---- jobs ------------------------------------------------------------------------------------

    def add_job(self, job: Job) -> Job:
        """Insert a queued job with its refId and input files, in one transaction."""
        values = [encode(c, getattr(job, c)) for c in JOB_COLUMNS]
        with self._transaction():
            cur = self._db.execute(
                f"INSERT INTO jobs ({', '.join(JOB_COLUMNS)}) VALUES ({', '.join('?' * len(JOB_COLUMNS))})", values)
            job.id = cur.lastrowid or 0
            if job.ref_id is not None:
                try:
                    self._db.execute("INSERT INTO refs (key_id, ref_id, job_id) VALUES (?, ?, ?)",
                                     (job.key_id or 0, job.ref_id, job.id))
                except sqlite3.IntegrityError as exc:
                    raise DuplicateRefId(job.ref_id) from exc
            self._db.executemany("INSERT OR IGNORE INTO files (name, job_id, key_id, label) VALUES (?, ?, ?, ?)",
                                 [(name, job.id, job.key_id, label) for name, label in inputs_of(job)])
        return job

    def get_job(self, job_id: int) -> Job | None:
        return job_of(self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())

    def get_jobs(self, job_ids: list[int]) -> list[Job]:
        rows = self._db.execute(f"SELECT * FROM jobs WHERE id IN ({', '.join('?' * len(job_ids))})", job_ids).fetchall()
        return [j for j in map(job_of, rows) if j is not None]

    def job_id_by_ref(self, key_id: int | None, ref_id: str) -> int | None:
        row = self._db.execute("SELECT job_id FROM refs WHERE key_id = ? AND ref_id = ?", (key_id or 0, ref_id)).fetchone()
        return row[0] if row else None

    def unfinished_jobs(self) -> list[Job]:
        rows = self._db.execute("SELECT * FROM jobs WHERE state IN (?, ?) ORDER BY id", (JobState.QUEUED, JobState.STARTED))
        return [j for j in map(job_of, rows) if j is not None]

    def claim(self, job: Job, agent: str, session: str, now: float) -> bool:
        """Give the next attempt of a queued job to ``session``; False if it is no longer queued."""
        cur = self._db.execute(
            "UPDATE jobs SET state = ?, agent = ?, session = ?, lease_expires = NULL, attempt = attempt + 1, started = ? "
            "WHERE id = ? AND state = ? AND attempt = ?",
            (JobState.STARTED, agent, session, now, job.id, JobState.QUEUED, job.attempt))
        return cur.rowcount == 1

    def requeue(self, job: Job) -> bool:
        """Queue a running attempt again (with what the retry policy decided); only that attempt, under
        the lease its caller saw (a lease that moved meanwhile is not the caller's to give up), can."""
        cur = self._db.execute(
            "UPDATE jobs SET state = ?, agent = NULL, session = NULL, lease_expires = NULL, avoid = ?, "
            "min_free_vram = ?, failures = ? WHERE id = ? AND state = ? AND attempt = ? AND session IS ?",
            (JobState.QUEUED, json.dumps(job.avoid), job.min_free_vram, job.failures, job.id, JobState.STARTED,
             job.attempt, job.session))
        return cur.rowcount == 1

    def finish(self, job: Job, now: float, delivery: Delivery | None = None) -> bool:
        """Record a final state, its output files and its callback in one transaction; only the
        attempt that holds the job (or a queued job) can."""
        with self._transaction():
            cur = self._db.execute(
                "UPDATE jobs SET state = ?, results = ?, error = ?, finished = ?, lease_expires = NULL, failures = ? "
                "WHERE id = ? AND attempt = ? AND state IN (?, ?)",
                (job.state, encode("results", job.results), encode("error", job.error), now, job.failures, job.id,
                 job.attempt, JobState.QUEUED, JobState.STARTED))
            if cur.rowcount != 1:
                return False
            self._db.executemany("INSERT OR IGNORE INTO files (name, job_id, key_id, label) VALUES (?, ?, ?, ?)",
                                 [(name, job.id, job.key_id, label) for name, label in outputs_of(job)])
            self._db.execute("UPDATE files SET finished = ? WHERE job_id = ?", (now, job.id))
            if delivery is not None:
                values = [getattr(delivery, c) for c in _DELIVERY_COLUMNS]
                delivery.id = self._db.execute(
                    f"INSERT INTO deliveries ({', '.join(_DELIVERY_COLUMNS)}) VALUES ({', '.join('?' * len(values))})",
                    values).lastrowid or 0
        return True

    def set_lease_expiry(self, job: Job, expires: float | None) -> bool:
        """Start (or stop) the clock on the lease ``job.session`` holds on ``job.attempt``."""
        return self._db.execute(
            "UPDATE jobs SET lease_expires = ? WHERE id = ? AND attempt = ? AND session = ? AND state = ?",
            (expires, job.id, job.attempt, job.session, JobState.STARTED)).rowcount == 1

    def move_lease(self, job: Job, session: str) -> bool:
        """Hand the lease ``job.session`` holds on ``job.attempt`` to ``session`` (an agent came back)."""
        return self._db.execute(
            "UPDATE jobs SET session = ?, lease_expires = NULL WHERE id = ? AND attempt = ? AND session = ? AND state = ?",
            (session, job.id, job.attempt, job.session, JobState.STARTED)).rowcount == 1

    def find_jobs(self, query: JobQuery) -> list[Job]:
        return find_jobs(self._db, query)

    def finished_before(self, when: float, limit: int) -> list[Job]:
        rows = self._db.execute("SELECT * FROM jobs WHERE finished IS NOT NULL AND finished < ? ORDER BY id LIMIT ?",
                                (when, limit))
        return [j for j in map(job_of, rows) if j is not None]

    def forget_jobs(self, job_ids: list[int]) -> None:
        with self._transaction():
            self._db.executemany("DELETE FROM jobs WHERE id = ? AND finished IS NOT NULL", [(i,) for i in job_ids])

    # ---- refIds and files of jobs made by earlier versions -------------------------------------------

    def needs_backfill(self) -> bool:
        return self._db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION

    def backfill(self, jobs: Iterable[Job]) -> None:
        """Record the refIds and files of jobs stored before they were kept apart (idempotent)."""
        jobs = list(jobs)
        with self._transaction():
            self._db.executemany("INSERT OR IGNORE INTO refs (key_id, ref_id, job_id) VALUES (?, ?, ?)",
                                 [(j.key_id or 0, j.ref_id, j.id) for j in jobs if j.ref_id is not None])
            self._db.executemany("INSERT OR IGNORE INTO files (name, job_id, key_id, label, finished) VALUES (?, ?, ?, ?, ?)",
                                 [(name, j.id, j.key_id, label, j.finished) for j in jobs
                                  for name, label in (*inputs_of(j), *outputs_of(j))])

    def mark_current(self) -> None:
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # ---- files the jobs own ------------------------------------------------------------------------

    def file(self, name: str) -> StoredFile | None:
        row = self._db.execute("SELECT * FROM files WHERE name = ?", (name,)).fetchone()
        return StoredFile(row["name"], row["job_id"], row["key_id"], row["label"]) if row else None

    def owned_files(self, names: list[str]) -> set[str]:
        """Which of ``names`` belong to a job (the rest are orphans)."""
        found: set[str] = set()
        for start in range(0, len(names), 500):
            batch = names[start:start + 500]
            rows = self._db.execute(f"SELECT name FROM files WHERE name IN ({', '.join('?' * len(batch))})", batch)
            found.update(r[0] for r in rows)
        return found

    def expired_files(self, finished_before: float, limit: int) -> list[str]:
        rows = self._db.execute("SELECT name FROM files WHERE finished IS NOT NULL AND finished < ? LIMIT ?",
                                (finished_before, limit))
        return [r[0] for r in rows]

    def forget_files(self, names: list[str]) -> None:
        with self._transaction():
            self._db.executemany("DELETE FROM files WHERE name = ?", [(n,) for n in names])

    # ---- callback deliveries -----------------------------------------------------------------------

    def due_deliveries(self, now: float, limit: int) -> list[Delivery]:
        rows = self._db.execute("SELECT * FROM deliveries WHERE state = 'pending' AND next_at <= ? ORDER BY next_at LIMIT ?",
                                (now, limit))
        return [Delivery(id=r["id"], **{c: r[c] for c in _DELIVERY_COLUMNS}) for r in rows]

    def next_delivery_at(self) -> float | None:
        return self._db.execute("SELECT min(next_at) FROM deliveries WHERE state = 'pending'").fetchone()[0]

    def claim_delivery(self, delivery: Delivery, until: float) -> bool:
        """Lease a due delivery for one attempt (until ``until``); False if it was taken meanwhile."""
        return self._db.execute("UPDATE deliveries SET attempts = attempts + 1, next_at = ? WHERE id = ? AND attempts = ? "
                                "AND state = 'pending'", (until, delivery.id, delivery.attempts)).rowcount == 1

    def update_delivery(self, delivery: Delivery) -> None:
        self._db.execute("UPDATE deliveries SET attempts = ?, next_at = ?, state = ?, last_error = ? WHERE id = ?",
                         (delivery.attempts, delivery.next_at, delivery.state, delivery.last_error, delivery.id))

    def forget_deliveries(self, before: float) -> int:
        """Drop delivered and given-up deliveries made before ``before``; pending ones stay."""
        return self._db.execute("DELETE FROM deliveries WHERE state != 'pending' AND created < ?", (before,)).rowcount

    # ---- keys ------------------------------------------------------------------------------------

    def add_key(self, name: str, digest: str, prefix: str, apis: tuple[str, ...] | None, admin: bool, now: float,
                webhook_secret: str | None = None, limits: KeyLimits = KeyLimits()) -> Key:
        cur = self._db.execute(
            "INSERT INTO api_keys (name, digest, prefix, apis, admin, created, webhook_secret, weight, max_queued, "
            "per_minute) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, digest, prefix, json.dumps(apis) if apis is not None else None, int(admin), now, webhook_secret,
             limits.weight, limits.max_queued, limits.per_minute))
        return Key(cur.lastrowid or 0, name, prefix, apis, admin, now, False, webhook_secret, limits)

    def set_key_limits(self, key_id: int, limits: KeyLimits) -> bool:
        return self._db.execute("UPDATE api_keys SET weight = ?, max_queued = ?, per_minute = ? WHERE id = ?",
                                (limits.weight, limits.max_queued, limits.per_minute, key_id)).rowcount == 1

    def key_by_digest(self, digest: str) -> Key | None:
        row = self._db.execute("SELECT * FROM api_keys WHERE digest = ?", (digest,)).fetchone()
        return _key(row) if row else None

    def get_key(self, key_id: int) -> Key | None:
        row = self._db.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return _key(row) if row else None

    def list_keys(self) -> list[Key]:
        return [_key(r) for r in self._db.execute("SELECT * FROM api_keys ORDER BY id")]

    def revoke_key(self, key_id: int) -> bool:
        return self._db.execute("UPDATE api_keys SET revoked = 1 WHERE id = ? AND revoked = 0", (key_id,)).rowcount == 1

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")


def inputs_of(job: Job) -> list[tuple[str, str]]:
    """A job's uploaded files: (stored name, a readable name: the field's)."""
    return [(name, field + Path(name).suffix) for field, name in job.inputs.items()]


def outputs_of(job: Job) -> list[tuple[str, str]]:
    """A job's output files: (stored name, the name its agent gave it)."""
    return [(a["name"], a.get("file_name") or a["name"]) for a in (job.results or {}).get("artifacts", [])]


def add_missing_columns(db: sqlite3.Connection, tables: dict[str, dict[str, str]]) -> None:
    """Bring a file made by an earlier gpugate up to date: add the columns it lacks (to tables it has)."""
    for table, columns in tables.items():
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        for name, kind in columns.items():
            if have and name not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")


def find_jobs(db: sqlite3.Connection, query: JobQuery) -> list[Job]:
    """Jobs matching ``query``, newest first; shared by the live store and the monthly archives."""
    sql, args = query_sql("jobs", query, "?")
    return [j for j in map(job_of, db.execute(sql, args)) if j is not None]


def encode(column: str, value: Any) -> Any:
    return json.dumps(value) if column in _JSON and value is not None else value


def job_of(row: sqlite3.Row | None) -> Job | None:
    """A job from its row; columns an older file lacks (read-only archives) keep their defaults."""
    if row is None:
        return None
    present = set(row.keys())
    data = {c: (json.loads(row[c]) if c in _JSON and row[c] is not None else row[c]) for c in JOB_COLUMNS if c in present}
    if "avoid" not in present and "excluded" in present:  # the name before exclusion became a preference
        data["avoid"] = json.loads(row["excluded"] or "[]")
    return Job(id=row["id"], **{**data, "state": JobState(data["state"])})


def _key(row: sqlite3.Row) -> Key:
    apis = tuple(json.loads(row["apis"])) if row["apis"] is not None else None
    return Key(row["id"], row["name"], row["prefix"], apis, bool(row["admin"]), row["created"], bool(row["revoked"]),
               row["webhook_secret"], KeyLimits(row["weight"], row["max_queued"], row["per_minute"]))
