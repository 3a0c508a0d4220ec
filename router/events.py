"""Who is watching which live job: sync calls waiting for the result, and event streams.

A watcher gets each Progress of the job (and each Delta, the text a chat streams), then the
finished Job. When the router shuts down every
watcher gets ``CLOSING`` instead, so a sync call answers with the job's reference (the job itself
lives on in the store) rather than being cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Final

from gpugate.wire import Delta, Progress

from .store import Job


class _Closing:
    def __repr__(self) -> str:
        return "CLOSING"


CLOSING: Final = _Closing()
JobEvent = Progress | Delta | Job | _Closing


class JobEvents:
    def __init__(self) -> None:
        self._watchers: dict[int, set[asyncio.Queue[JobEvent]]] = {}
        self.closing = False

    @contextlib.contextmanager
    def watch(self, job_id: int) -> Iterator[asyncio.Queue[JobEvent]]:
        """Events of a live job while the block runs: each Progress, then the finished Job (or CLOSING)."""
        events: asyncio.Queue[JobEvent] = asyncio.Queue()
        if self.closing:
            events.put_nowait(CLOSING)
        self._watchers.setdefault(job_id, set()).add(events)
        try:
            yield events
        finally:
            watchers = self._watchers.get(job_id, set())
            watchers.discard(events)
            if not watchers:
                self._watchers.pop(job_id, None)

    def notify(self, job_id: int, event: Progress | Delta | Job) -> None:
        for events in self._watchers.get(job_id, ()):
            events.put_nowait(event)

    def close(self) -> None:
        """The router is stopping: every watcher stops waiting."""
        self.closing = True
        for watchers in self._watchers.values():
            for events in watchers:
                events.put_nowait(CLOSING)

    async def wait_finished(self, job_id: int, timeout: float) -> Job | None:
        """The job once it finished, or None after ``timeout`` seconds or when the router stops.
        Call it only for a live job (one that finishes notifies its watchers)."""
        with self.watch(job_id) as events, contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while not isinstance(event := await events.get(), Job | _Closing):
                    pass
                return event if isinstance(event, Job) else None
        return None
