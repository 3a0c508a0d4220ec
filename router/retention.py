"""How long the file store keeps files, and what it does when the disk runs low.

Every stored file belongs to one job (the store's files table: inputs when the job is accepted,
outputs when it completes). A job's files are deleted ``retention_days`` after it finished (0 keeps
them for good); those of a live job never are. Files no job owns are orphans: the outputs of an
attempt that was cancelled or superseded are deleted as soon as its answer arrives (stale); any
other orphan (an agent that died between writing an output and reporting it, a request whose job
was never made) once it is older than ``orphan_grace_s``. A file's variants (router/api/files.py)
go with it.

When the disk holding the store has less free space than ``min_free_disk_mb``, new uploads are
refused with 507 and the dashboard says why (``problem``); outputs of running jobs still go in.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Iterable
from pathlib import Path

from gpugate.filestore import INCOMING, NAME, VARIANTS, stored_path
from gpugate.settings import Router as RouterSettings

from .artifacts import ArtifactStore
from .store import Store, store_call

log = logging.getLogger(__name__)
BATCH = 1000
MB = 2**20


class Retention:
    def __init__(self, store: Store, artifacts: ArtifactStore, settings: RouterSettings) -> None:
        self.store, self.artifacts, self.settings = store, artifacts, settings
        self.removed = 0  # files deleted since start, for /metrics

    def disk_problem(self) -> str | None:
        """Why new uploads are refused now, or None: free space below the configured floor."""
        floor = self.settings.min_free_disk_mb * MB
        if floor <= 0:
            return None
        free = self.free_bytes()
        if free >= floor:
            return None
        return (f"the router's file store has {free / MB:.0f} MB free, below its floor of "
                f"{self.settings.min_free_disk_mb:.0f} MB (router.min_free_disk_mb); uploads are refused until space "
                f"is freed (router.retention_days deletes old jobs' files)")

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.artifacts.root).free

    def missing(self, names: list[str]) -> list[str]:
        """Those of ``names`` that are not in the store (an answer naming them cannot complete a job)."""
        return [n for n in names if self.artifacts.path(n) is None]

    async def discard_unowned(self, names: Iterable[str]) -> None:
        """Delete those of ``names`` that no job owns (the outputs of a stale answer)."""
        names = list(names)
        owned = await store_call(self.store, self.store.owned_files, names) if names else set()
        if doomed := [n for n in names if n not in owned]:
            await self.artifacts.remove(doomed)
            self.removed += len(doomed)
            log.info("files of a stale answer deleted", extra={"files": len(doomed)})

    async def sweep(self, now: float) -> int:
        """One pass: expired jobs' files, then old orphans; how many files were deleted."""
        removed = 0
        if self.settings.retention_days > 0:
            before = now - self.settings.retention_days * 86400
            while names := await store_call(self.store, self.store.expired_files, before, BATCH):
                await self.artifacts.remove(names)
                await store_call(self.store, self.store.forget_files, names)
                removed += len(names)
                if len(names) < BATCH:
                    break
        candidates = await asyncio.to_thread(_old_files, self.artifacts.root, now - self.settings.orphan_grace_s)
        owned = await store_call(self.store, self.store.owned_files, [p.name for p in candidates if NAME.match(p.name)])
        orphans = [p for p in candidates if p.name not in owned]
        await asyncio.to_thread(_unlink, orphans)
        await asyncio.to_thread(_variants_without_original, self.artifacts.root)
        removed += len(orphans)
        self.removed += removed
        return removed

    async def run(self) -> None:
        """The router's retention task: a sweep every ``retention_every_s``; a failing one is retried.
        The first waits ``lease_grace_s`` twice over, so agents coming back to a restarted router report
        the outputs they wrote before it went down before any of them can look like an orphan."""
        await asyncio.sleep(2 * self.settings.lease_grace_s)
        while True:
            try:
                if removed := await self.sweep(time.time()):
                    log.info("file store swept", extra={"files": removed})
            except Exception:  # a store or disk error: nothing is lost by trying again later
                log.exception("file store sweep failed; retrying")
            await asyncio.sleep(self.settings.retention_every_s)


def _old_files(root: Path, before: float) -> list[Path]:
    """Stored files (and half-written ones) last changed before ``before``."""
    out = []
    for folder in root.iterdir():
        if not folder.is_dir() or not (len(folder.name) == 2 or folder.name == INCOMING):
            continue
        for path in folder.iterdir():
            try:
                if path.is_file() and path.stat().st_mtime < before:
                    out.append(path)
            except FileNotFoundError:  # removed meanwhile
                pass
    return out


def _variants_without_original(root: Path) -> None:
    """Variant folders whose original is gone (deleted as an orphan, say) go too."""
    folder = root / VARIANTS
    for variants in folder.iterdir() if folder.is_dir() else ():
        original = stored_path(root, variants.name)
        if original is None or not original.exists():
            shutil.rmtree(variants, ignore_errors=True)


def _unlink(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
