"""Probe media and run ffmpeg without blocking the event loop, and say what went wrong in words.

Commands are built with ffmpeg-python from validated values only; a client's string never
becomes an ffmpeg option. Every input is probed first: an empty, non-media, truncated or
unsupported file is an :class:`InvalidRequest` naming the field. A run past its time limit is
killed (:class:`JobTimeout`).

Probing uses FFmpeg's libraries in-process through PyAV (about 2 ms here) rather than the
ffprobe program (about 128 ms, nearly all of it process start-up); see bench/media.py. It reads
16 KiB first, and more only when that leaves a stream's parameters unknown.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import ffmpeg

from gpugate.errors import ExecutionError, FieldError, InfrastructureFault, InvalidRequest, JobTimeout


@dataclass(frozen=True)
class MediaInfo:
    format: str  # ffprobe's format_name, e.g. "mov,mp4,m4a,3gp,3g2,mj2"
    duration: float  # seconds (0 for a still image)
    width: int | None  # of the first video stream
    height: int | None
    video_codec: str | None
    audio_codec: str | None

    @property
    def has_video(self) -> bool:
        return self.width is not None

    @property
    def has_audio(self) -> bool:
        return self.audio_codec is not None


async def probe(path: Path, field: str) -> MediaInfo:
    """What ``path`` holds; InvalidRequest on ``field`` if FFmpeg cannot read it."""
    if path.stat().st_size == 0:
        raise InvalidRequest(FieldError(field, "is an empty file", "empty"))
    try:
        info = await asyncio.to_thread(_probe, path)
    except av.error.FFmpegError as exc:
        raise InvalidRequest(FieldError(field, f"is not a media file ffmpeg can read ({exc.strerror or exc})",
                                        "not_media")) from None
    if not info.has_video and not info.has_audio:
        raise InvalidRequest(FieldError(field, "has no audio or video stream", "not_media"))
    return info


QUICK_PROBE = {"probesize": "16384"}  # bytes read to find stream parameters (FFmpeg's default: 5 MB)


def _probe(path: Path) -> MediaInfo:
    """Probe with a small read first: FFmpeg's default read 40 ms of a 60 s WAV here, 64 KiB 3.5 ms,
    16 KiB 0.7 ms (an MP4 2.6 ms); if that leaves a stream's parameters unknown, probe again as
    FFmpeg would by default."""
    info = _read_info(path, QUICK_PROBE)
    if (info.has_video and not (info.width and info.height)) or not (info.has_video or info.has_audio):
        info = _read_info(path, {})
    return info


def _read_info(path: Path, options: dict[str, str]) -> MediaInfo:
    with av.open(str(path), options=options) as container:
        video = next((s for s in container.streams.video if not _is_cover_art(s)), None)
        audio = next(iter(container.streams.audio), None)
        duration = container.duration / av.time_base if container.duration else max(
            (float(s.duration * s.time_base) for s in container.streams if s.duration and s.time_base), default=0.0)
        return MediaInfo(container.format.name, duration,
                         video.codec_context.width if video else None, video.codec_context.height if video else None,
                         video.codec_context.name if video else None, audio.codec_context.name if audio else None)


def ffmpeg_installed() -> bool:
    return shutil.which("ffmpeg") is not None


async def transcode(stream: Any, timeout: float, field: str) -> None:
    """Run an ffmpeg-python output stream. A decode failure is the input's fault (InvalidRequest);
    an ffmpeg that is not installed is this agent's (InfrastructureFault: another agent may have it)."""
    if not ffmpeg_installed():
        raise InfrastructureFault("ffmpeg is not installed on this agent")
    args = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-xerror", "-y", *stream.get_args()]
    code, _, err = await _run(args, timeout=timeout)
    if code == 0:
        return
    text = _last_line(err)
    if any(sign in text for sign in ("Invalid data", "corrupt", "moov atom", "End of file", "error while decoding",
                                     "Error while decoding", "Truncat", "partial file")):
        raise InvalidRequest(FieldError(field, f"could not be decoded: it is truncated or corrupt ({text})", "corrupt"))
    raise ExecutionError(f"ffmpeg failed (exit {code}): {text}")


async def _run(args: list[str], timeout: float) -> tuple[int, bytes, bytes]:
    proc = await asyncio.create_subprocess_exec(*args, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise JobTimeout(f"{args[0]} still running after {timeout:.0f}s; stopped") from None
    except asyncio.CancelledError:  # the job was cancelled: its ffmpeg must not outlive it
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out, err


def _last_line(err: bytes) -> str:
    lines = [line.strip() for line in err.decode(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no message"


def _is_cover_art(stream: Any) -> bool:
    return bool(stream.disposition & av.stream.Disposition.attached_pic)


__all__ = ["MediaInfo", "ffmpeg", "ffmpeg_installed", "probe", "transcode"]
