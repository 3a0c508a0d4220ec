"""The layout of the router's file store, shared by the router (router/artifacts.py, which owns it)
and by agents that see the same folder (agent/files.py: same host, or a shared volume), and the one
way both write a file that arrives as a stream.

<root>/<first two hex digits>/<name> holds each file; a name is 64 random hex digits and an
extension, so it cannot be guessed from the content. Files are written under incoming/ first and
renamed into place, so a reader sees a whole file or none. Variants of an image live under
variants/<name>/ and go with it. STORE_ID_FILE holds the token that names the store
(gpugate/wire.py: SharedStore).
"""

from __future__ import annotations

import asyncio
import mimetypes
import re
import secrets
from collections.abc import AsyncIterable
from pathlib import Path
from typing import BinaryIO

NAME = re.compile(r"^([0-9a-f]{64})(\.[a-z0-9]{1,8})?$")
INCOMING = "incoming"
VARIANTS = "variants"  # <root>/variants/<name>/<size>.webp: smaller copies of an image, made by the router
STORE_ID_FILE = ".store-id"
WRITE_BATCH = 2**20  # bytes gathered from a stream before each write


def stored_path(root: Path, name: str) -> Path | None:
    """Where the store under ``root`` keeps file ``name``; None for a malformed name."""
    return root / name[:2] / name if NAME.match(name) else None


def new_partial(root: Path) -> Path:
    """A fresh path in the incoming folder to write a file to before it is placed."""
    return root / INCOMING / f"{secrets.token_hex(16)}.partial"


def place(root: Path, partial: Path, extension: str) -> str:
    """Rename a written file into the store under a new name; return the name."""
    name = secrets.token_hex(32) + extension
    path = root / name[:2] / name
    path.parent.mkdir(exist_ok=True)
    partial.rename(path)
    return name


def write_file(root: Path, data: bytes, extension: str) -> str:
    """Write ``data`` as a new file of the store; return its name."""
    partial = new_partial(root)
    try:
        partial.write_bytes(data)
        return place(root, partial, extension)
    finally:
        partial.unlink(missing_ok=True)


async def write_stream(path: Path, chunks: AsyncIterable[bytes]) -> int:
    """Write ``chunks`` to a new file at ``path`` as they arrive; return its size. They are gathered
    into batches of WRITE_BATCH bytes, each written in a thread while the next one arrives, so
    writing overlaps the transfer instead of following it, the event loop never touches the bytes,
    and a small file takes one trip to a thread (open, write, close)."""
    sink = _Sink(path)
    writing: asyncio.Future[None] | None = None
    batch: list[bytes] = []
    batched = 0
    try:
        async for chunk in chunks:
            batch.append(chunk)
            batched += len(chunk)
            if batched >= WRITE_BATCH:
                if writing is not None:
                    await writing
                writing = asyncio.ensure_future(asyncio.to_thread(sink.write, batch))
                batch, batched = [], 0
        if writing is not None:
            await writing
        writing = asyncio.ensure_future(asyncio.to_thread(sink.finish, batch))
        await writing
    finally:
        if writing is not None and not writing.done():  # the thread must end before the file closes
            await asyncio.wait([writing])
        if not sink.closed:
            await asyncio.to_thread(sink.finish, [])
    return sink.size


class _Sink:
    """Writes batches of chunks to a file it opens on the first one."""

    def __init__(self, path: Path) -> None:
        self.path, self.size, self.closed = path, 0, False
        self.file: BinaryIO | None = None

    def write(self, batch: list[bytes]) -> None:
        if self.file is None:
            self.file = self.path.open("wb")
        self.file.writelines(batch)
        self.size += sum(map(len, batch))

    def finish(self, batch: list[bytes]) -> None:
        self.write(batch)
        self.file.close()  # type: ignore[union-attr]
        self.closed = True


def extension_for(file_name: str, media_type: str) -> str:
    """The extension a file is stored with: from its name, else its media type; '' if neither is sane."""
    ext = Path(file_name).suffix.lower() or (mimetypes.guess_extension(media_type) or "")
    return ext if re.fullmatch(r"\.[a-z0-9]{1,8}", ext) else ""
