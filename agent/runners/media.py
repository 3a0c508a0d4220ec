"""FFmpeg transforms on the agent: scale, crop, trim, convert and watermark video; convert audio.

The router has checked types and ranges; here each input is probed and the request is checked
against what it holds (a crop inside the frame, a trim inside the duration), then one command is
built from those values with ffmpeg-python. Video results are MP4 (H.264/AAC) unless converted.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ffmpeg

from gpugate.errors import FieldError, InvalidRequest
from gpugate.settings import Settings
from gpugate.wire import Capability

from ..media.ffmpeg import MediaInfo, ffmpeg_installed, probe, transcode
from . import JobProgress, OutputFile, RunResult, WithoutModels

log = logging.getLogger(__name__)

H264 = {"vcodec": "libx264", "preset": "veryfast", "pix_fmt": "yuv420p", "acodec": "aac"}
VIDEO_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {  # outputFormat -> (muxer, codec options)
    "mp4": ("mp4", {**H264, "movflags": "+faststart"}),
    "mov": ("mov", H264),
    "mkv": ("matroska", H264),
    "webm": ("webm", {"vcodec": "libvpx", "deadline": "realtime", "cpu-used": 8, "b:v": "1M", "acodec": "libopus"}),
    "avi": ("avi", {"vcodec": "mpeg4", "q:v": 4, "acodec": "libmp3lame"}),
    "wmv": ("asf", {"vcodec": "wmv2", "q:v": 4, "acodec": "wmav2"}),
    "mpeg": ("mpeg", {"vcodec": "mpeg2video", "q:v": 4, "acodec": "mp2"}),
    "ogg": ("ogg", {"vcodec": "libtheora", "q:v": 6, "acodec": "libvorbis"}),
}
AUDIO_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    "mp3": ("mp3", {"acodec": "libmp3lame", "q:a": 4}),
    "wav": ("wav", {"acodec": "pcm_s16le"}),
    "flac": ("flac", {"acodec": "flac"}),
    "ogg": ("ogg", {"acodec": "libvorbis"}),
    "aac": ("adts", {"acodec": "aac"}),
    "m4a": ("ipod", {"acodec": "aac"}),
}
MARGIN = 10  # pixels between a watermark and the frame's edge
OVERLAY = {"TopLeft": (f"{MARGIN}", f"{MARGIN}"), "TopRight": (f"W-w-{MARGIN}", f"{MARGIN}"),
           "BottomLeft": (f"{MARGIN}", f"H-h-{MARGIN}"), "BottomRight": (f"W-w-{MARGIN}", f"H-h-{MARGIN}"),
           "Center": ("(W-w)/2", "(H-h)/2")}

Builder = Callable[[dict[str, Any], MediaInfo, str, Path], Any]  # (params, probe, source, output)


def _video(info: MediaInfo, field: str = "video") -> None:
    if not info.has_video:
        raise InvalidRequest(FieldError(field, "has no video stream", "not_media"))


def _with_audio(inp: Any, video: Any, info: MediaInfo, dst: Path, fmt: str = "mp4") -> Any:
    muxer, options = VIDEO_FORMATS[fmt]
    streams = [video, inp.audio] if info.has_audio else [video]
    if not info.has_audio:
        options = {k: v for k, v in options.items() if k != "acodec"}
    return ffmpeg.output(*streams, str(dst), format=muxer, **options)


def scale_video(p: dict[str, Any], info: MediaInfo, src: str, dst: Path) -> Any:
    _video(info)
    inp = ffmpeg.input(src)
    return _with_audio(inp, inp.video.filter("scale", p["width"], p["height"]), info, dst)


def crop_video(p: dict[str, Any], info: MediaInfo, src: str, dst: Path) -> Any:
    _video(info)
    x, y, w, h = p["x"], p["y"], p["width"], p["height"]
    if x + w > info.width or y + h > info.height:  # type: ignore[operator]
        raise InvalidRequest(FieldError("width" if x + w > info.width else "height",  # type: ignore[operator]
                                        f"the crop {w}x{h} at ({x}, {y}) reaches outside the {info.width}x{info.height} frame",
                                        "out_of_range"))
    inp = ffmpeg.input(src)
    return _with_audio(inp, inp.video.filter("crop", w, h, x, y), info, dst)


def trim_video(p: dict[str, Any], info: MediaInfo, src: str, dst: Path) -> Any:
    _video(info)
    start, end = p["start_time"], p["end_time"]
    if start >= info.duration:
        raise InvalidRequest(FieldError("startTime", f"{start:g}s is past the end of the {info.duration:.2f}s video", "out_of_range"))
    inp = ffmpeg.input(src, ss=start, t=min(end, info.duration) - start)  # decoded from start: frame-accurate
    return _with_audio(inp, inp.video, info, dst)


def convert_video(p: dict[str, Any], info: MediaInfo, src: str, dst: Path) -> Any:
    _video(info)
    inp = ffmpeg.input(src)
    return _with_audio(inp, inp.video, info, dst, p["output_format"])


def watermark_video(p: dict[str, Any], info: MediaInfo, src: str, dst: Path) -> Any:
    _video(info)
    inp = ffmpeg.input(src)
    mark = ffmpeg.input(p["_watermark"]).filter("scale", max(2, info.width // 4), -1)  # type: ignore[operator]
    x, y = OVERLAY[p["position"]]
    return _with_audio(inp, ffmpeg.overlay(inp.video, mark, x=x, y=y), info, dst)


def convert_audio(p: dict[str, Any], info: MediaInfo, src: str, dst: Path) -> Any:
    if not info.has_audio:
        raise InvalidRequest(FieldError("audio", "has no audio stream", "not_media"))
    inp = ffmpeg.input(src)
    muxer, options = AUDIO_FORMATS[p["output_format"]]
    return ffmpeg.output(inp.audio, str(dst), format=muxer, **options)


# capability -> (input field, builder, output extension or None for "from outputFormat")
TRANSFORMS: dict[str, tuple[str, Builder, str | None]] = {
    "scale-video": ("video", scale_video, "mp4"),
    "crop-video": ("video", crop_video, "mp4"),
    "trim-video": ("video", trim_video, "mp4"),
    "convert-video": ("video", convert_video, None),
    "watermark-video": ("video", watermark_video, "mp4"),
    "convert-audio": ("audio", convert_audio, None),
}


class MediaRunner(WithoutModels):
    """The transforms, offered only where the ffmpeg program is installed (looked for each time the
    agent lists what it offers, so installing it needs no restart)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        if not ffmpeg_installed():
            log.warning("ffmpeg is not installed: media transforms are not offered (apt-get install ffmpeg)")

    def capabilities(self) -> list[Capability]:
        if not ffmpeg_installed():
            return []
        return [Capability(name=name, vram_base=0, vram_per_megapixel=0) for name in TRANSFORMS]

    async def run(self, capability: str, job_id: str, params: dict[str, Any],
                  on_progress: Callable[[JobProgress], None]) -> RunResult:
        field, build, extension = TRANSFORMS[capability]
        extension = extension or params["output_format"]
        src: Path = params[field]
        values = {k: v for k, v in params.items() if not isinstance(v, Path)}
        if isinstance(mark := params.get("watermark"), Path):
            await probe(mark, "watermark")
            values["_watermark"] = str(mark)
        with tempfile.TemporaryDirectory(prefix=f"gpugate-{job_id}-") as tmp:
            dst = Path(tmp) / f"output.{extension}"
            info = await probe(src, field)
            if info.duration > self.settings.media.max_duration_s:
                raise InvalidRequest(FieldError(field, f"is {info.duration:.0f}s long; the limit is "
                                                       f"{self.settings.media.max_duration_s:.0f}s", "out_of_range"))
            stream = build(values, info, str(src), dst)
            await transcode(stream, self.settings.media.timeout_s, field)
            data = await asyncio.to_thread(dst.read_bytes)
        media_type = mimetypes.guess_type(f"x.{extension}")[0] or "application/octet-stream"
        return RunResult(files=[OutputFile(f"{capability}.{extension}", media_type, data)])
