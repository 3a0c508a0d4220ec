"""The queued jobs by what they need and whose they are: for each (capability, model), each API
key's queued job ids, oldest first. The dispatcher reads only the groups an agent could take now,
in the keys' fair order (``fair``), and stops once the free slots are used: a pass costs about the
jobs it hands out, not the length of the queue.

An id is added when its job is queued (submitted, queued again, read from the store); it is not
removed when the job leaves the queue: a reader skips ids whose job is no longer queued, and they
are dropped from the front of their line as it moves on, or all at once by ``compact``.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from .store import Job, JobState

Group = tuple[str, str | None]  # (capability, model)
KeyId = int | None


@dataclass
class _Line:
    """One key's queued ids in one group, in id order; ids before ``head`` are known to be gone."""

    ids: list[int] = field(default_factory=list)
    head: int = 0

    def add(self, job_id: int) -> None:
        if not self.ids or self.ids[-1] < job_id:
            self.ids.append(job_id)
        else:  # an older job queued again: back in its place
            self.ids.insert(bisect.bisect_left(self.ids, job_id, lo=self.head), job_id)


class Backlog:
    def __init__(self, live: Mapping[int, Job]) -> None:
        self._live = live
        self._lines: dict[Group, dict[KeyId, _Line]] = {}
        self._indexed: set[int] = set()

    def add(self, job: Job) -> None:
        """Index a job that is queued (again); an id already indexed is not added twice."""
        if job.state == JobState.QUEUED and job.id not in self._indexed:
            self._lines.setdefault((job.capability, job.model), {}).setdefault(job.key_id, _Line()).add(job.id)
            self._indexed.add(job.id)

    def groups(self) -> list[Group]:
        return list(self._lines)

    def keys(self, groups: Iterable[Group]) -> set[KeyId]:
        """The API keys with jobs indexed in ``groups``."""
        return {key for group in groups for key in self._lines.get(group, {})}

    def jobs(self, group: Group) -> Iterator[Job]:
        """The queued jobs of one group, oldest first per key."""
        for line in self._lines.get(group, {}).values():
            yield from (job for job_id in line.ids[line.head:] if (job := self._queued(job_id)) is not None)

    def fair(self, groups: Iterable[Group], served: Mapping[KeyId, float], weight: Callable[[KeyId], int],
             new: float) -> Iterator[Job]:
        """The queued jobs of ``groups`` in fair order (see ``interleave``), made as they are read."""
        by_key: dict[KeyId, list[_Line]] = {}
        for group in groups:
            for key, line in self._lines.get(group, {}).items():
                by_key.setdefault(key, []).append(line)
        try:
            yield from interleave({key: self._oldest_first(lines) for key, lines in by_key.items()}, served, weight, new)
        finally:
            for lines in by_key.values():
                for line in lines:
                    self._advance(line)

    def compact(self) -> None:
        """Drop every id whose job is no longer queued (those behind the front of their line too)."""
        for group, lines in list(self._lines.items()):
            for key, line in list(lines.items()):
                kept = [i for i in line.ids[line.head:] if self._queued(i) is not None]
                self._indexed.difference_update(set(line.ids) - set(kept))
                line.ids, line.head = kept, 0
                if not kept:
                    del lines[key]
            if not lines:
                del self._lines[group]

    def stale(self) -> int:
        """How many indexed ids are not queued jobs (a measure of when to compact)."""
        return len(self._indexed) - sum(1 for j in self._live.values() if j.state == JobState.QUEUED)

    def _queued(self, job_id: int) -> Job | None:
        job = self._live.get(job_id)
        return job if job is not None and job.state == JobState.QUEUED else None

    def _oldest_first(self, lines: list[_Line]) -> Iterator[Job]:
        """One key's queued jobs across its lines, by id (a merge: each line is in id order)."""
        heads = [(line.ids[line.head], n, line.head) for n, line in enumerate(lines) if line.head < len(line.ids)]
        heapq.heapify(heads)
        while heads:
            job_id, n, at = heapq.heappop(heads)
            if at + 1 < len(lines[n].ids):
                heapq.heappush(heads, (lines[n].ids[at + 1], n, at + 1))
            if (job := self._queued(job_id)) is not None:
                yield job

    def _advance(self, line: _Line) -> None:
        """Move the line's front past ids that are gone (handed out, most of them)."""
        while line.head < len(line.ids) and self._queued(line.ids[line.head]) is None:
            self._indexed.discard(line.ids[line.head])
            line.head += 1
        if line.head > 1024 and line.head * 2 > len(line.ids):
            line.ids, line.head = line.ids[line.head:], 0


def interleave(streams: Mapping[KeyId, Iterator[Job]], served: Mapping[KeyId, float],
               weight: Callable[[KeyId], int], new: float) -> Iterator[Job]:
    """Keys taking turns: ``weight`` jobs of each key a round (its stream's order), round after
    round; the key served least (``served``: its virtual time; ``new`` for a key not in it) takes
    its turn first in every round, ties to the key with the oldest job. Lazy: a reader that stops
    early pays only for what it read."""
    first = {key: job for key, stream in streams.items() if (job := next(stream, None)) is not None}
    active = [(key, max(1, weight(key))) for key in sorted(first, key=lambda k: (served.get(k, new), first[k].id))]
    while active:
        still = []
        for key, share in active:
            taken, done = 0, False
            while taken < share:
                job = first.pop(key, None) or next(streams[key], None)
                if job is None:
                    done = True
                    break
                yield job
                taken += 1
            if not done and (peek := next(streams[key], None)) is not None:
                first[key] = peek
                still.append((key, share))
        active = still
