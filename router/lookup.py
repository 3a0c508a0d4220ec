"""Finding jobs wherever they are: live (the queue's cache), finished (the store) or archived.

refIds are kept in the store for good (its refs table), so a refId names the same job after the
job was archived, and looking one up is one index read, never a scan of the monthly files. The
monthly archive files are read in a worker thread: one query per month, off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from .archive import Archive
from .store import Job, JobQuery, Store, store_call


class JobFinder:
    def __init__(self, live: Mapping[int, Job], store: Store, archive: Archive) -> None:
        self.live, self.store, self.archive = live, store, archive  # live: the queue's (none on the command line)

    async def get(self, job_id: int) -> Job | None:
        job = self.live.get(job_id) or await store_call(self.store, self.store.get_job, job_id)
        return job or await asyncio.to_thread(self.archive.get, job_id)

    async def get_by_ref(self, key_id: int | None, ref_id: str) -> Job | None:
        job_id = await store_call(self.store, self.store.job_id_by_ref, key_id, ref_id)
        return await self.get(job_id) if job_id is not None else None

    async def find(self, query: JobQuery) -> list[Job]:
        """Jobs matching ``query`` in the live store and the archive, newest first."""
        found = {j.id: j for j in await store_call(self.store, self.store.find_jobs, query)}
        if len(found) < query.limit:
            found |= {j.id: j for j in await asyncio.to_thread(self.archive.find, query) if j.id not in found}
        return sorted(found.values(), key=lambda j: -j.id)[:query.limit]
