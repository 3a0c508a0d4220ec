"""Files by content: stored once under their SHA-256, served at /artifacts/<sha256><ext>.

Used for both directions: client uploads the agents fetch, and outputs the agents upload. Hashing
and writing run in a worker thread; the event loop never touches file contents.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import os
import re
from pathlib import Path

NAME = re.compile(r"^([0-9a-f]{64})(\.[a-z0-9]{1,8})?$")


class ArtifactStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path | None:
        """The file for an artifact name, or None if the name is malformed or unknown."""
        match = NAME.match(name)
        if match is None:
            return None
        path = self.root / match.group(1)[:2] / name
        return path if path.is_file() else None

    async def put(self, data: bytes, extension: str) -> str:
        """Store ``data``; return its artifact name ``<sha256><extension>``."""
        return await asyncio.to_thread(self._write, data, extension)

    def _write(self, data: bytes, extension: str) -> str:
        name = hashlib.sha256(data).hexdigest() + extension
        path = self.root / name[:2] / name
        if not path.exists():
            path.parent.mkdir(exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.partial")
            tmp.write_bytes(data)
            tmp.rename(path)  # readers see the whole file or none
        return name


def extension_for(file_name: str, media_type: str) -> str:
    ext = Path(file_name).suffix.lower() or (mimetypes.guess_extension(media_type) or "")
    return ext if re.fullmatch(r"\.[a-z0-9]{1,8}", ext) else ""
