"""Model downloads for `gpugate models pull`: resumable, verified, placed where the agent looks.

Each file is fetched into ``<name>.partial`` beside its destination. An interrupted transfer
(a dropped connection, a Ctrl-C) resumes from the bytes already there with an HTTP Range request;
a server that ignores Range sends the whole file again. The finished file must have the catalog's
size and SHA-256, or it is deleted and the pull fails saying so; only then is it renamed into
place, so ComfyUI, whisper and Piper never see half a model. A token for gated downloads is read
from the environment variable the entry names and sent as a bearer header, never printed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import aiohttp
from tqdm import tqdm

from gpugate.catalog import CatalogEntry, CatalogFile
from gpugate.errors import DownloadError

log = logging.getLogger(__name__)
CHUNK = 1 << 20
ATTEMPTS = 5  # connections per file before giving up
RETRY_S = 1.0


async def pull(entry: CatalogEntry, models_dir: Path, *, show_progress: bool = True) -> list[Path]:
    """Download every file of ``entry`` that is not already in place and verified."""
    if not entry.files:
        raise DownloadError(f"model {entry.name!r} has no download in the catalog")
    headers = {}
    if entry.token_env:
        token = os.environ.get(entry.token_env)
        if token:
            headers["Authorization"] = f"Bearer {token}"
            log.info("using a token for a gated download", extra={"model": entry.name, "from": f"${entry.token_env}"})
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=60)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, raise_for_status=False) as http:
        return [await _file(http, f, models_dir / entry.kind / f.path, show_progress) for f in entry.files]


async def _file(http: aiohttp.ClientSession, file: CatalogFile, dst: Path, show_progress: bool) -> Path:
    if dst.is_file() and (file.size is None or dst.stat().st_size == file.size) and \
            await asyncio.to_thread(_sha256, dst) == file.sha256:
        log.info("already installed", extra={"file": str(dst)})
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".partial")
    for attempt in range(1, ATTEMPTS + 1):
        try:
            await _fetch(http, file, part, show_progress)
            break
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            if attempt == ATTEMPTS:
                raise DownloadError(f"{file.url}: the connection failed {ATTEMPTS} times ({exc}); "
                                    f"run the pull again to resume from {part.stat().st_size if part.exists() else 0} bytes") from None
            log.warning("download interrupted; resuming", extra={"file": dst.name, "attempt": attempt, "error": str(exc)})
            await asyncio.sleep(RETRY_S * attempt)
    size, digest = part.stat().st_size, await asyncio.to_thread(_sha256, part)
    if (file.size is not None and size != file.size) or digest != file.sha256:
        part.unlink()
        raise DownloadError(f"{dst.name}: the download does not match the catalog (size {size}, sha256 {digest}; "
                            f"expected size {file.size}, sha256 {file.sha256}); the file was deleted")
    part.replace(dst)
    log.info("model file installed", extra={"file": str(dst), "bytes": size})
    return dst


async def _fetch(http: aiohttp.ClientSession, file: CatalogFile, part: Path, show_progress: bool) -> None:
    """Fetch into ``part``, continuing from what it holds."""
    have = part.stat().st_size if part.exists() else 0
    if file.size is not None and have >= file.size:
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    async with http.get(file.url, headers=headers) as r:
        if r.status == 416:  # nothing left to send: the part is whole (the hash check decides)
            return
        if r.status not in (200, 206):
            raise DownloadError(f"{file.url}: HTTP {r.status} {r.reason}")
        if r.status == 200:
            have = 0  # the server ignored the range: start over
        total = file.size or (have + int(r.headers.get("Content-Length", 0)) or None)
        with open(part, "ab" if have else "wb") as out, _bar(part.name.removesuffix(".partial"), total, have, show_progress) as bar:
            async for chunk in r.content.iter_chunked(CHUNK):
                await asyncio.to_thread(out.write, chunk)
                bar.update(len(chunk))


def _bar(name: str, total: int | None, initial: int, show: bool) -> Any:
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=not show,
                leave=True, dynamic_ncols=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()
