"""Image checks shared by the router (API uploads) and the agent (workflow parameters)."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

MAX_IMAGE_SIDE = 8192


@dataclass(frozen=True)
class ImageInfo:
    format: str  # Pillow's name: PNG, JPEG, WEBP, ...
    width: int
    height: int

    @property
    def extension(self) -> str:
        return {"JPEG": ".jpg"}.get(self.format, f".{self.format.lower()}")


def probe_image(source: bytes | Path) -> ImageInfo:
    """Read an image's header (not its pixels) from bytes or a file; ValueError with a client-readable
    reason if it is not one."""
    if not source:
        raise ValueError("is an empty file")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            info = ImageInfo(im.format or "?", *im.size)
    except Image.DecompressionBombError as exc:
        raise ValueError(f"is too large ({exc})") from None
    except (UnidentifiedImageError, OSError):
        raise ValueError("is not an image (PNG, JPEG, WebP, ...)") from None
    if not (0 < info.width <= MAX_IMAGE_SIDE and 0 < info.height <= MAX_IMAGE_SIDE):
        raise ValueError(f"is {info.width}x{info.height}; each side must be 1..{MAX_IMAGE_SIDE}")
    return info
