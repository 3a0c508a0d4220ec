"""What a key may add to the queue: at most ``max_queued`` of its jobs waiting, at most
``per_minute`` submitted a minute (a token bucket that refills evenly). Past either, the request
is a 429 that names the limit, with Retry-After for the rate; nothing is queued.

Checked when a job is submitted (router/api/public.py ``enqueue``), for every API. A key's weight
(its share when keys take turns) is the dispatcher's (router/dispatch.py ``fair_order``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass

from .store import Job, JobState, Key, Store, store_call


class LimitExceeded(Exception):
    """A key's limit refuses a job; ``retry_after_s`` when waiting helps (the rate)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message, self.retry_after_s = message, retry_after_s


@dataclass
class _Bucket:
    tokens: float
    updated: float


class KeyLimiter:
    def __init__(self) -> None:
        self._buckets: dict[int, _Bucket] = {}

    def admit(self, key: Key, live: Iterable[Job], now: float) -> None:
        """Take one job of ``key`` (``live``: the queue's live jobs; ``now``: a monotonic clock) or
        raise LimitExceeded. The rate is a token bucket of ``per_minute`` that refills evenly: a burst
        of at most ``per_minute`` jobs, and ``per_minute`` a minute on average."""
        limits = key.limits
        if limits.max_queued is not None:
            queued = sum(1 for j in live if j.key_id == key.id and j.state == JobState.QUEUED)
            if queued >= limits.max_queued:
                raise LimitExceeded(f"key {key.id} may have at most {limits.max_queued} queued jobs (maxQueued) and "
                                    f"has {queued}: wait for some to start")
        if limits.per_minute is not None:
            rate = limits.per_minute / 60.0
            bucket = self._buckets.setdefault(key.id, _Bucket(float(limits.per_minute), now))
            bucket.tokens = min(float(limits.per_minute), bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens < 1.0:
                wait = (1.0 - bucket.tokens) / rate
                raise LimitExceeded(f"key {key.id} may submit {limits.per_minute} jobs a minute (perMinute); "
                                    f"try again in {math.ceil(wait)}s", wait)
            bucket.tokens -= 1.0

    def refund(self, key: Key) -> None:
        """Give back the job ``admit`` took (the request made no new job after all)."""
        if (bucket := self._buckets.get(key.id)) is not None and key.limits.per_minute is not None:
            bucket.tokens = min(float(key.limits.per_minute), bucket.tokens + 1.0)


class KeyWeights:
    """Each key's weight for the dispatcher, read from the store at most every ``ttl_s`` (a key's
    limits rarely change; a change takes effect within that): ``refresh`` before a pass reads
    what is due (through ``store_call``), so the pass itself only looks up."""

    def __init__(self, store: Store, ttl_s: float = 5.0) -> None:
        self.store, self.ttl_s = store, ttl_s
        self._known: dict[int, tuple[float, int]] = {}

    async def refresh(self, key_ids: Iterable[int | None]) -> None:
        now = time.monotonic()
        for key_id in key_ids:
            known = self._known.get(key_id) if key_id is not None else None
            if key_id is not None and (known is None or now - known[0] > self.ttl_s):
                key = await store_call(self.store, self.store.get_key, key_id)
                self._known[key_id] = (now, key.limits.weight if key is not None else 1)

    def __call__(self, key_id: int | None) -> int:
        if key_id is None:
            return 1
        known = self._known.get(key_id)
        return known[1] if known is not None else 1
