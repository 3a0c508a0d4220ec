"""The router's file store (layout: gpugate/filestore.py), served at /artifacts/<name>.

Used for both directions: client uploads the agents read, and outputs the agents upload. A file is
received as a stream (gpugate/filestore.py: write_stream) into the store's incoming folder, and
kept (renamed into place) only once the request that brought it is accepted. Nothing is held whole
in memory, and the event loop never touches file contents.

Names are random, not content hashes: a key holder cannot test whether some known file was uploaded
by someone else, and a 10 MB upload does not pay the 9 ms its SHA-256 took on the benchmark host
(bench/media.py). Agents that see this folder themselves (same host, or a shared volume) read their
inputs and write their outputs here directly; the router tells them the store's path and token
(gpugate/wire.py: SharedStore).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path

from gpugate.filestore import INCOMING, STORE_ID_FILE, VARIANTS, new_partial, place, stored_path, write_file, write_stream
from gpugate.wire import SharedStore


@dataclass(frozen=True)
class Received:
    """A file that arrived in the incoming folder; Intake.keep makes it a stored file."""

    path: Path
    size: int


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        incoming = self.root / INCOMING
        incoming.mkdir(parents=True, exist_ok=True)
        for stale in incoming.iterdir():  # left by a router or agent that stopped mid-write
            stale.unlink(missing_ok=True)
        self.shared = SharedStore(path=str(self.root), token=_store_token(self.root))

    def variant_path(self, name: str, width: int | None, height: int | None) -> Path:
        """Where a variant of file ``name`` is kept (VARIANTS/<name>/, removed with the file)."""
        size = ",".join(f"{k}={v}" for k, v in (("width", width), ("height", height)) if v is not None)
        return self.root / VARIANTS / name / f"{size}.webp"

    def path(self, name: str) -> Path | None:
        """The file for a name, or None if the name is malformed or unknown."""
        path = stored_path(self.root, name)
        return path if path is not None and path.is_file() else None

    async def remove(self, names: Iterable[str]) -> None:
        await asyncio.to_thread(self._remove, list(names))

    def _remove(self, names: list[str]) -> None:
        for name in names:
            if (path := stored_path(self.root, name)) is not None:
                path.unlink(missing_ok=True)
                shutil.rmtree(self.root / VARIANTS / name, ignore_errors=True)

    @contextlib.asynccontextmanager
    async def intake(self) -> AsyncIterator[Intake]:
        """Receive files for the length of the block; those it did not keep are removed at its end."""
        intake = Intake(self.root)
        try:
            yield intake
        finally:
            if intake.unkept:
                await asyncio.to_thread(intake.discard)

    async def put(self, data: bytes, extension: str) -> str:
        """Store ``data`` (a file made here, not received); return its name."""
        return await asyncio.to_thread(write_file, self.root, data, extension)


class Intake:
    """Files being received for one request (see ArtifactStore.intake)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.unkept: set[Path] = set()

    async def receive(self, chunks: AsyncIterable[bytes]) -> Received:
        """Write ``chunks`` to a new incoming file as they arrive."""
        path = new_partial(self.root)
        self.unkept.add(path)
        return Received(path, await write_stream(path, chunks))

    async def keep(self, received: Received, extension: str) -> str:
        """Make a received file a stored file; return its name."""
        name = await asyncio.to_thread(place, self.root, received.path, extension)
        self.unkept.discard(received.path)
        return name

    def discard(self) -> None:
        for path in self.unkept:
            path.unlink(missing_ok=True)


def _store_token(root: Path) -> str:
    """This store's token, made on first use and kept (agents compare it with what they see)."""
    path = root / STORE_ID_FILE
    if not path.exists():
        part = path.with_suffix(f".{os.getpid()}.partial")
        part.write_text(secrets.token_hex(16))
        part.replace(path)
    return path.read_text().strip()
