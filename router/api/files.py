"""Files as clients use them: GetArtifact, GetVariant, download, DeleteFile and DeleteFiles.

Access is by signed URL (router/urls.py: no header needed until it expires; a CDN may cache the
answer until then) or by API key (a key sees its own jobs' files, an admin key every file; the
answer is private). A file another key owns is "no such artifact", never a hint that it exists.

Variants (``/variants/width=W[,height=H]/<name>``, AI Server's GetVariant) are smaller WebP copies
of an image, made once with Pillow in a worker thread and kept beside the original, which takes them
along when it is deleted. Deleting is for a key's own files of finished jobs (or an admin's).
"""

from __future__ import annotations

import asyncio
import mimetypes
import time
from pathlib import Path
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, BeforeValidator, Field

from gpugate.errors import FieldError
from gpugate.filestore import NAME

from ..images import make_variant
from ..state import ARTIFACTS, KEY, QUEUE, SETTINGS, SIGNER, STORE
from ..store import Key, store_call
from ..urls import file_path
from .errors import ApiError, invalid
from .requests import read_fields, validate_fields

PRIVATE = "private, max-age=3600"
mimetypes.add_type("image/webp", ".webp")  # Python 3.11's table lacks it; variants are WebP


def routes() -> list[web.RouteDef]:
    return [web.get("/artifacts/{name}", get_artifact), web.get("/variants/{variant}/{name}", get_variant),
            web.delete("/api/DeleteFile", delete_file), web.post("/api/DeleteFile", delete_file),
            web.post("/api/DeleteFiles", delete_files)]


def is_signed(request: web.Request) -> bool:
    """A file request that carries a signature (checked by the handler, so it needs no key)."""
    return request.method == "GET" and request.path.startswith(("/artifacts/", "/variants/")) and (
        "sig" in request.query or "exp" in request.query)


async def get_artifact(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    path, cache = await _readable(request, name)
    return await _file_response(request, path, cache, name)


async def get_variant(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    width, height = _variant_size(request.match_info["variant"], request.app[SETTINGS].router.max_variant_side)
    original, cache = await _readable(request, name)
    artifacts = request.app[ARTIFACTS]
    variant = artifacts.variant_path(name, width, height)
    if not variant.is_file():
        try:
            await asyncio.to_thread(make_variant, original, variant, width, height)
        except ValueError as exc:  # not an image Pillow can read
            raise invalid([FieldError("path", str(exc), "not_an_image")]) from None
    return await _file_response(request, variant, cache, name)


async def _readable(request: web.Request, name: str) -> tuple[Path, str]:
    """The file for ``name`` if this request may read it, and the Cache-Control that fits the way in."""
    path = request.app[ARTIFACTS].path(name)
    if is_signed(request):
        now = time.time()
        problem = request.app[SIGNER].problem(file_path(name), request.query.get("exp"), request.query.get("sig"), now)
        if problem is not None:
            raise ApiError(403, "Forbidden", problem)
        if path is None:
            raise ApiError(404, "NotFound", "no such artifact")
        return path, f"public, max-age={max(0, int(request.query['exp']) - int(now))}, immutable"
    key: Key | None = request[KEY]
    if key is None:
        raise ApiError(401, "Unauthorized", "a signed URL or an API key is required")
    if path is None or not await _owns(request, key, name):
        raise ApiError(404, "NotFound", "no such artifact")
    return path, PRIVATE


async def _owns(request: web.Request, key: Key, name: str) -> bool:
    if key.admin:
        return True
    store = request.app[STORE]
    stored = await store_call(store, store.file, name)
    return stored is not None and stored.key_id == key.id


async def _file_response(request: web.Request, path: Path, cache: str, name: str) -> web.FileResponse:
    headers = {"Cache-Control": cache, "Content-Type": mimetypes.guess_type(path.name)[0] or "application/octet-stream"}
    if request.query.get("download", "").lower() in ("true", "1", "yes"):
        store = request.app[STORE]
        stored = await store_call(store, store.file, name)
        label = Path(stored.label if stored and stored.label else name)
        readable = "".join(c for c in label.stem if c.isalnum() or c in "-_.") or "file"
        headers["Content-Disposition"] = f'attachment; filename="{readable}{path.suffix}"'  # a variant is .webp
    return web.FileResponse(path, headers=headers)


def _variant_size(variant: str, most: int) -> tuple[int | None, int | None]:
    """``width=W``, ``height=H`` or both (comma-separated, any order) -> (W, H); 400 naming what is wrong."""
    size: dict[str, int] = {}
    for part in filter(None, variant.split(",")):
        field, _, value = part.partition("=")
        if field not in ("width", "height") or field in size:
            raise invalid([FieldError("variant", f"{part!r} is not width=W or height=H")])
        if not value.isdigit() or not 1 <= int(value) <= most:
            raise invalid([FieldError(field, f"must be a whole number of pixels from 1 to {most}", "out_of_range")])
        size[field] = int(value)
    if not size:
        raise invalid([FieldError("variant", "give width=W, height=H or both", "required")])
    return size.get("width"), size.get("height")


# ---- deletion ----------------------------------------------------------------------------------


def _name_of(path: str) -> str | None:
    """The stored name a client's path points at: a URL, /artifacts/<name>, or the name itself."""
    name = path.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return name if NAME.match(name) else None


class DeleteFileRequest(BaseModel):
    path: Annotated[str, Field(min_length=1)]


def _paths(value: Any) -> Any:
    return [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value


class DeleteFilesRequest(BaseModel):
    paths: Annotated[list[Annotated[str, Field(min_length=1)]], BeforeValidator(_paths), Field(min_length=1, max_length=1000)]


class DeleteFilesResponse(BaseModel):
    deleted: list[str] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)
    failed: list[str] = Field(default_factory=list)


async def delete_file(request: web.Request) -> web.Response:
    asked = validate_fields(DeleteFileRequest, await read_fields(request))
    return web.json_response((await _delete(request, [asked.path])).model_dump())


async def delete_files(request: web.Request) -> web.Response:
    asked = validate_fields(DeleteFilesRequest, await read_fields(request))
    return web.json_response((await _delete(request, asked.paths)).model_dump())


async def _delete(request: web.Request, paths: list[str]) -> DeleteFilesResponse:
    """Delete each of the key's own files (and their variants); another key's file, or one a live job
    still needs, is ``failed`` and stays."""
    key: Key = request[KEY]
    store, artifacts, live = request.app[STORE], request.app[ARTIFACTS], request.app[QUEUE].live
    answer, doomed = DeleteFilesResponse(), []
    for path in paths:
        name = _name_of(path)
        stored = await store_call(store, store.file, name) if name else None
        exists = name is not None and artifacts.path(name) is not None
        if name is None or (stored is None and not exists):
            answer.missing.append(path)
        elif not (key.admin or (stored is not None and stored.key_id == key.id)) or (stored and stored.job_id in live):
            answer.failed.append(path)
        else:
            doomed.append(name)
            (answer.deleted if exists else answer.missing).append(path)
    await artifacts.remove(doomed)
    await store_call(store, store.forget_files, doomed)
    return answer


