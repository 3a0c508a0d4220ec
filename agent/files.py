"""Job files between the router and this agent: inputs as paths on local disk, outputs stored.

An agent that sees the router's file store itself (same host, or a shared volume; the router names
its store in the welcome, gpugate/wire.py: SharedStore) reads its inputs there in place and writes
its outputs there directly (layout: gpugate/filestore.py): a 10 MB upload then costs the agent
nothing. Otherwise each input is downloaded, streamed to the job's folder (never held whole in
memory), and each output is uploaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
from pathlib import Path

import aiohttp

from gpugate.filestore import INCOMING, NAME, STORE_ID_FILE, extension_for, stored_path, write_file, write_stream
from gpugate.wire import Artifact, SharedStore

from .runners import OutputFile

log = logging.getLogger(__name__)


class RouterFiles:
    def __init__(self, http: aiohttp.ClientSession, store: Path | None = None, writable: bool = False) -> None:
        self.http, self.store, self.writable = http, store, writable

    @classmethod
    async def for_session(cls, http: aiohttp.ClientSession, store: SharedStore | None) -> RouterFiles:
        """Files for one router session: in the router's store when this agent sees the one it named."""
        if store is None or not await asyncio.to_thread(_sees, store):
            return cls(http)
        root = Path(store.path)
        writable = await asyncio.to_thread(os.access, root / INCOMING, os.W_OK)
        log.info("using the router's file store directly", extra={"store": store.path, "writes": writable})
        return cls(http, root, writable)

    async def fetch(self, name: str, folder: Path) -> Path:
        """A local path holding input ``name``: the router's own file, or a download into ``folder``.
        Runners only read it; the caller removes ``folder`` when the job ends."""
        if not NAME.match(name):
            raise ValueError(f"the router sent a malformed file name: {name!r}")
        shared = stored_path(self.store, name) if self.store else None
        if shared is not None and await asyncio.to_thread(shared.is_file):
            return shared
        return await self._download(name, folder / name)

    async def _download(self, name: str, path: Path) -> Path:
        async with self.http.get(f"/agent/files/{name}") as r:
            r.raise_for_status()
            await write_stream(path, r.content.iter_any())
        return path

    async def store_output(self, file: OutputFile) -> Artifact:
        """Put an output where the router keeps files: written into its store, or uploaded."""
        if self.store is not None and self.writable:
            ext = extension_for(file.file_name, file.media_type)
            name = await asyncio.to_thread(write_file, self.store, file.data, ext)
        else:
            async with self.http.post("/agent/artifacts", params={"fileName": file.file_name},
                                      data=io.BytesIO(file.data),  # sent in chunks, not in one write
                                      headers={"Content-Type": file.media_type}) as r:
                r.raise_for_status()
                name = (await r.json())["name"]
        return Artifact(name=name, file_name=file.file_name, media_type=file.media_type, size=len(file.data))


def _sees(store: SharedStore) -> bool:
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return (Path(store.path) / STORE_ID_FILE).read_text().strip() == store.token
    return False
