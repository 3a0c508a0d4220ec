"""The callback outbox on the real SQLite store, and the pure parts of delivery: backoff,
address rules and signatures."""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
from pathlib import Path

from gpugate.settings import Router as RouterSettings
from router.callbacks import address_problem, next_attempt_at, sign
from router.store import Delivery, Job, JobState
from router.store.sqlite import SqliteStore


def _job(store: SqliteStore) -> Job:
    return store.add_job(Job(id=0, api="Echo", capability="echo", params={}, inputs={}, model=None, megapixels=0,
                             max_attempts=1, created=1000.0))


def _delivery(job: Job, created: float = 1000.0) -> Delivery:
    return Delivery(id=0, job_id=job.id, key_id=None, url="https://example.com/hook", webhook_id="msg_1", body="{}",
                    created=created, next_at=created)


def test_a_delivery_is_stored_with_the_finish_and_only_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "router.db")
    job = _job(store)
    job.state = JobState.COMPLETED
    assert store.finish(job, 1001.0, _delivery(job))
    assert not store.finish(job, 1002.0, _delivery(job)), "a second finish neither finishes nor delivers again"
    [due] = store.due_deliveries(2000.0, 10)
    assert due.job_id == job.id and store.due_deliveries(999.0, 10) == []
    due.attempts, due.next_at, due.last_error = 1, 3000.0, "answered HTTP 503"
    store.update_delivery(due)
    assert store.due_deliveries(2000.0, 10) == [] and store.next_delivery_at() == 3000.0
    assert store.forget_deliveries(5000.0) == 0, "pending deliveries are never dropped"
    due.state = "delivered"
    store.update_delivery(due)
    assert store.next_delivery_at() is None
    assert store.forget_deliveries(999.0) == 0 and store.forget_deliveries(5000.0) == 1
    store.close()


def test_backoff_doubles_up_to_its_cap_and_stops_after_the_give_up_period() -> None:
    settings = RouterSettings(callback_retry_s=5, callback_retry_max_s=60, callback_give_up_s=3600)
    delivery = Delivery(id=1, job_id=1, key_id=None, url="", webhook_id="", body="", created=0.0)
    waits = []
    for attempts in range(1, 7):
        delivery.attempts = attempts
        waits.append(next_attempt_at(delivery, 100.0, settings) - 100.0)  # type: ignore[operator]
    assert waits == [5, 10, 20, 40, 60, 60]
    assert next_attempt_at(delivery, 3590.0, settings) is None


def test_only_public_addresses_receive_callbacks_unless_a_network_is_allowed() -> None:
    ip = ipaddress.ip_address
    for private in ("127.0.0.1", "10.0.0.1", "192.168.1.5", "169.254.169.254", "::1", "fd00::1", "0.0.0.0"):
        assert address_problem([ip(private)], []) is not None, private
    assert address_problem([ip("93.184.216.34")], []) is None
    assert address_problem([ip("93.184.216.34"), ip("10.1.2.3")], []) is not None, "every resolved address counts"
    assert address_problem([ip("10.1.2.3")], ["10.0.0.0/8"]) is None


def test_the_signature_is_standard_webhooks_v1() -> None:
    secret = "whsec_" + base64.b64encode(b"k" * 24).decode()
    expected = base64.b64encode(hmac.new(b"k" * 24, b"msg_1.1700000000.{}", hashlib.sha256).digest()).decode()
    assert sign(secret, "msg_1", 1700000000, b"{}") == f"v1,{expected}"


def test_files_from_an_earlier_version_are_read_and_brought_up_to_date(tmp_path: Path) -> None:
    import sqlite3

    from router.archive import JobArchive
    from router.store import JobQuery

    old = sqlite3.connect(tmp_path / "router.db")  # a live store before jobs had base_url and keys a webhook secret
    old.executescript("""
        CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, api TEXT NOT NULL, capability TEXT NOT NULL,
            params TEXT NOT NULL, inputs TEXT NOT NULL, model TEXT, megapixels REAL NOT NULL, max_attempts INTEGER NOT NULL,
            key_id INTEGER, ref_id TEXT, tag TEXT, reply_to TEXT, state TEXT NOT NULL, attempt INTEGER NOT NULL DEFAULT 0,
            agent TEXT, excluded TEXT NOT NULL DEFAULT '[]', min_free_vram INTEGER NOT NULL DEFAULT 0, results TEXT,
            error TEXT, created REAL NOT NULL, started REAL, finished REAL);
        CREATE TABLE api_keys (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, digest TEXT NOT NULL UNIQUE,
            prefix TEXT NOT NULL, apis TEXT, admin INTEGER NOT NULL, created REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0);
        INSERT INTO jobs (api, capability, params, inputs, megapixels, max_attempts, state, created, finished)
            VALUES ('Echo', 'echo', '{}', '{}', 0, 1, 'Completed', 1000, 1001);
        INSERT INTO api_keys (name, digest, prefix, admin, created) VALUES ('old', 'd', 'gg_', 0, 1000);""")
    (tmp_path / "archive").mkdir()
    old.execute("VACUUM INTO ?", (str(tmp_path / "archive" / "1970-01.db"),))  # an archive of that version
    old.close()
    store = SqliteStore(tmp_path / "router.db")
    assert store.get_job(1).base_url is None and store.get_key(1).webhook_secret is None  # type: ignore[union-attr]
    archived = JobArchive(tmp_path / "archive")
    assert [j.id for j in archived.find(JobQuery(state="Completed"))] == [1], "read as it is, read-only"
    archived.put(store.finished_before(2000.0, 10))  # and written to: brought up to date first
    assert archived.get(1).base_url is None  # type: ignore[union-attr]
    store.close()
