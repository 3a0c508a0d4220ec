"""Image transforms on the router itself (the seed design: image work stays central), with Pillow.

Pure functions from bytes to bytes; the caller runs them in a worker thread. A request that does
not fit the image (a crop outside it) is an InvalidRequest naming the field.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from gpugate.errors import FieldError, InvalidRequest

FORMATS = {"jpg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "tiff": "TIFF", "webp": "WEBP"}
EXTENSIONS = {v: k for k, v in FORMATS.items()}
MARGIN = 10


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _save(image: Image.Image, fmt: str) -> tuple[bytes, str]:
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue(), EXTENSIONS.get(fmt, fmt.lower())


def scale(params: dict[str, Any], files: dict[str, bytes]) -> tuple[bytes, str]:
    image = _open(files["image"])
    return _save(image.resize((params["width"], params["height"]), Image.Resampling.LANCZOS), image.format or "PNG")


def crop(params: dict[str, Any], files: dict[str, bytes]) -> tuple[bytes, str]:
    image = _open(files["image"])
    x, y, w, h = params["x"], params["y"], params["width"], params["height"]
    if x + w > image.width or y + h > image.height:
        raise InvalidRequest(FieldError("width" if x + w > image.width else "height",
                                        f"the crop {w}x{h} at ({x}, {y}) reaches outside the {image.width}x{image.height} image",
                                        "out_of_range"))
    return _save(image.crop((x, y, x + w, y + h)), image.format or "PNG")


def convert(params: dict[str, Any], files: dict[str, bytes]) -> tuple[bytes, str]:
    return _save(_open(files["image"]), FORMATS[params["output_format"]])


def watermark(params: dict[str, Any], files: dict[str, bytes]) -> tuple[bytes, str]:
    image, mark = _open(files["image"]), _open(files["watermark"]).convert("RGBA")
    width = max(1, round(image.width * params["watermark_scale"]))
    mark = mark.resize((width, max(1, round(mark.height * width / mark.width))), Image.Resampling.LANCZOS)
    alpha = mark.getchannel("A").point(lambda a: round(a * params["opacity"]))
    mark.putalpha(alpha)
    x, y = (max(0, v) for v in _position(params["position"], image.size, mark.size))
    mark = mark.crop((0, 0, min(mark.width, image.width - x), min(mark.height, image.height - y)))  # a tall mark
    out = image.convert("RGBA")
    out.alpha_composite(mark, (x, y))
    fmt = image.format or "PNG"
    return _save(out if image.mode == "RGBA" else out.convert("RGB"), fmt)


def _position(where: str, size: tuple[int, int], mark: tuple[int, int]) -> tuple[int, int]:
    (w, h), (mw, mh) = size, mark
    return {"TopLeft": (MARGIN, MARGIN), "TopRight": (w - mw - MARGIN, MARGIN), "BottomLeft": (MARGIN, h - mh - MARGIN),
            "BottomRight": (w - mw - MARGIN, h - mh - MARGIN), "Center": ((w - mw) // 2, (h - mh) // 2)}[where]


TRANSFORMS: dict[str, Callable[[dict[str, Any], dict[str, bytes]], tuple[bytes, str]]] = {
    "scale-image": scale, "crop-image": crop, "convert-image": convert, "watermark-image": watermark}


def make_variant(original: Path, target: Path, width: int | None, height: int | None) -> None:
    """Write a WebP copy of ``original`` at ``target``: ``width`` x ``height``, or one of them with the
    aspect kept. Written beside and renamed into place, so a reader sees all of it or none. A file
    that is not an image is a ValueError."""
    try:
        image = Image.open(original)
        image.load()
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"is not an image a variant can be made of ({exc})") from None
    if width is None:
        width = max(1, round(image.width * height / image.height))  # type: ignore[operator]
    if height is None:
        height = max(1, round(image.height * width / image.width))
    resized = image.convert("RGBA" if "A" in image.getbands() else "RGB").resize((width, height), Image.Resampling.LANCZOS)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.part")
    try:
        resized.save(part, "WEBP", quality=85)
        part.replace(target)
    finally:
        part.unlink(missing_ok=True)
