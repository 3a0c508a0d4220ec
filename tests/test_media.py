"""Speech and media through the public API: a real router, and an agent running faster-whisper,
Piper and ffmpeg for real. Outputs are checked with ffprobe; hostile inputs are turned away."""

from __future__ import annotations

import difflib
import io
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image, ImageChops, ImageStat

from gpugate.settings import Settings
from router.keys import create_key
from router.state import STORE
from tests.conftest import png
from tests.services import Agents, Router, call, router_settings_in, until

SENTENCE = "The quick brown fox jumps over the lazy dog near the river bank."


@pytest.fixture(scope="module")
def media(sample_video: Path) -> dict[str, Path]:
    return {"video": sample_video}


@pytest.fixture(scope="module")
def router_settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return router_settings_in(tmp_path_factory.mktemp("router"), sync_timeout_s="120")


@pytest.fixture(scope="module")
def key(router: Router) -> str:
    return create_key(router.app[STORE], "media tests").token


@pytest.fixture(scope="module")
async def agent(router: Router, tmp_path_factory: pytest.TempPathFactory, fixture_models: Path) -> Iterator[Agents]:
    agents = Agents(tmp_path_factory.mktemp("agents"), router.url)
    agents.start("speaker", 4.0, [], GPUGATE_AGENT__RUNNERS='["speech", "media"]')
    try:
        await router.wait_for_agents("speaker", timeout=120)
        yield agents
    finally:
        agents.stop_all()


def form(**parts: Any) -> aiohttp.FormData:
    data = aiohttp.FormData()
    for name, value in parts.items():
        if isinstance(value, bytes):
            data.add_field(name, value, filename=f"{name}.bin", content_type="application/octet-stream")
        else:
            data.add_field(name, str(value))
    return data


async def fetch(router: Router, key: str, answer: dict[str, Any]) -> bytes:
    async with aiohttp.ClientSession() as http:
        async with http.get(answer["results"][0]["url"], headers={"Authorization": f"Bearer {key}"}) as r:
            assert r.status == 200
            return await r.read()


def ffprobe(data: bytes, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "probe.bin"
    path.write_bytes(data)
    out = subprocess.run(["ffprobe", "-v", "error", "-print_format", "json", "-show_format", "-show_streams", str(path)],
                         capture_output=True, text=True, check=True).stdout
    info = json.loads(out)
    video = next((s for s in info["streams"] if s["codec_type"] == "video"), {})
    audio = next((s for s in info["streams"] if s["codec_type"] == "audio"), {})
    return {"format": info["format"]["format_name"], "duration": float(info["format"].get("duration", 0)),
            "size": (video.get("width"), video.get("height")), "vcodec": video.get("codec_name"),
            "acodec": audio.get("codec_name")}


def frame(data: bytes, tmp_path: Path, at: float = 1.0) -> Image.Image:
    path = tmp_path / "frame-src"
    path.write_bytes(data)
    png_bytes = subprocess.run(["ffmpeg", "-v", "error", "-ss", str(at), "-i", str(path), "-frames:v", "1", "-f", "image2",
                                "-vcodec", "png", "-"], capture_output=True, check=True).stdout
    return Image.open(io.BytesIO(png_bytes)).convert("RGB")


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def words_missed(heard: str, said: str) -> int:
    """How many of the said words are not heard, in order. Piper adds random noise to every
    utterance (its noise scales), so the tiny Whisper model sometimes hears "jumped" for "jumps"."""
    matcher = difflib.SequenceMatcher(a=words(said), b=words(heard), autojunk=False)
    return len(words(said)) - sum(block.size for block in matcher.get_matching_blocks())


# ---- speech -----------------------------------------------------------------------------------------


async def test_speech_round_trip_gives_the_same_words_back(router: Router, agent: Agents, key: str, tmp_path: Path) -> None:
    spoken = await call(router, key, "TextToSpeech", {"input": SENTENCE})
    audio = await fetch(router, key, spoken)
    assert ffprobe(audio, tmp_path)["acodec"] == "pcm_s16le"
    heard = await call(router, key, "SpeechToText", form(audio=audio))
    [result] = heard["results"]
    assert words_missed(result["text"], SENTENCE) <= 1, result["text"]
    assert result["language"] == "en" and result["segments"][0]["start"] == 0.0
    assert result["segments"][-1]["end"] == pytest.approx(result["duration"], abs=1.0)
    assert "using the router's file store directly" in (agent.root / "speaker.log").read_text(), \
        "an agent on the router's host reads its inputs in place (tests/test_files.py covers the other way)"


async def test_speech_in_other_formats_and_queued(router: Router, agent: Agents, key: str, tmp_path: Path) -> None:
    for fmt, codec in (("mp3", "mp3"), ("ogg", "vorbis"), ("flac", "flac")):
        answer = await call(router, key, "TextToSpeech", {"input": "Hello there.", "outputFormat": fmt})
        assert ffprobe(await fetch(router, key, answer), tmp_path)["acodec"] == codec
    queued = await call(router, key, "QueueTextToSpeech", {"text": "Queued speech.", "model": "en_US-joe-medium"})
    assert queued["jobState"] == "Queued"
    absent = await call(router, key, "QueueSpeechToText", form(audio=b"RIFF....", model="whisper-large-v3"))
    assert absent["statusUrl"].endswith(f"GetTextGenerationStatus?jobId={absent['jobId']}")  # waits for an agent with it
    waiting = await until(router, key, absent["jobId"], lambda s: s["status"] != "Queued", timeout=30)
    assert waiting["jobState"] == "Queued" and waiting["status"] == "no agent has model large-v3"
    await call(router, key, "CancelJob", {"jobId": absent["jobId"]})
    unknown = await call(router, key, "QueueSpeechToText", form(audio=b"RIFF....", model="huge-v9"), status=400)
    assert "unknown model 'huge-v9'" in unknown["responseStatus"]["message"]  # nobody has it: refused at once


# ---- video and audio on the agent ------------------------------------------------------------------------


@pytest.mark.parametrize("api, fields, expect", [
    ("ScaleVideo", {"width": 160, "height": 120}, {"size": (160, 120), "vcodec": "h264", "acodec": "aac"}),
    ("CropVideo", {"x": 10, "y": 20, "width": 100, "height": 80}, {"size": (100, 80), "vcodec": "h264"}),
    ("TrimVideo", {"startTime": "00:00:00.5", "endTime": 1.5}, {"duration": 1.0, "size": (320, 240)}),
    ("ConvertVideo", {"outputFormat": "webm"}, {"format": "matroska,webm", "vcodec": "vp8", "acodec": "opus"}),
    ("ConvertVideo", {"outputFormat": "mkv"}, {"format": "matroska,webm", "vcodec": "h264"}),
    ("ConvertVideo", {"outputFormat": "mov"}, {"format": "mov,mp4,m4a,3gp,3g2,mj2", "vcodec": "h264"}),
    ("ConvertVideo", {"outputFormat": "avi"}, {"format": "avi", "vcodec": "mpeg4", "acodec": "mp3"}),
    ("ConvertVideo", {"outputFormat": "wmv"}, {"format": "asf", "vcodec": "wmv2", "acodec": "wmav2"}),
    ("ConvertVideo", {"outputFormat": "mpeg"}, {"format": "mpeg", "vcodec": "mpeg2video", "acodec": "mp2"}),
    ("ConvertVideo", {"outputFormat": "ogg"}, {"format": "ogg", "vcodec": "theora", "acodec": "vorbis"}),
])
async def test_video_transforms(router: Router, agent: Agents, key: str, media: dict[str, Path], tmp_path: Path,
                                api: str, fields: dict[str, Any], expect: dict[str, Any]) -> None:
    answer = await call(router, key, api, form(video=media["video"].read_bytes(), **fields))
    info = ffprobe(await fetch(router, key, answer), tmp_path)
    for name, value in expect.items():
        if name == "duration":
            assert info[name] == pytest.approx(value, abs=0.15)
        else:
            assert info[name] == value, (name, info)


@pytest.mark.parametrize("fmt, codec", [("mp3", "mp3"), ("wav", "pcm_s16le"), ("flac", "flac"), ("ogg", "vorbis"),
                                        ("aac", "aac"), ("m4a", "aac")])
async def test_convert_audio(router: Router, agent: Agents, key: str, media: dict[str, Path], tmp_path: Path,
                             fmt: str, codec: str) -> None:
    answer = await call(router, key, "ConvertAudio", form(audio=media["video"].read_bytes(), outputFormat=fmt))
    info = ffprobe(await fetch(router, key, answer), tmp_path)
    assert info["acodec"] == codec and info["size"] == (None, None) and info["duration"] == pytest.approx(2.0, abs=0.15)


async def test_a_video_watermark_changes_its_corner_and_not_the_rest(router: Router, agent: Agents, key: str,
                                                                     media: dict[str, Path], tmp_path: Path) -> None:
    original = media["video"].read_bytes()
    answer = await call(router, key, "WatermarkVideo", form(video=original, watermark=png(40, 40, (255, 0, 0)),
                                                            position="BottomRight"))
    marked = await fetch(router, key, answer)
    before, after = frame(original, tmp_path), frame(marked, tmp_path)
    corner = (320 - 80 - 10, 240 - 80 - 10, 320 - 10, 240 - 10)  # an 80x80 mark (a quarter of the width)
    inside = ImageChops.difference(before.crop(corner), after.crop(corner))
    outside = ImageChops.difference(before.crop((0, 0, 200, 120)), after.crop((0, 0, 200, 120)))
    assert _mean(inside) > 40, "the watermark is not there"
    assert _mean(outside) < 4, "pixels away from the watermark changed (beyond re-encoding noise)"
    assert after.crop(corner).getpixel((40, 40))[0] > 200  # red


def _mean(diff: Image.Image) -> float:
    return ImageStat.Stat(diff.convert("L")).mean[0]


# ---- images on the router ---------------------------------------------------------------------------


async def test_image_transforms(router: Router, key: str) -> None:
    source = png(120, 80, (10, 200, 30))
    scaled = Image.open(io.BytesIO(await fetch(router, key, await call(router, key, "ScaleImage",
                                                                        form(image=source, width=60, height=50)))))
    assert scaled.size == (60, 50) and scaled.format == "PNG"
    cropped = Image.open(io.BytesIO(await fetch(router, key, await call(router, key, "CropImage",
                                                                         form(image=source, x=10, y=5, width=30, height=20)))))
    assert cropped.size == (30, 20)
    for fmt, pil in (("jpg", "JPEG"), ("webp", "WEBP"), ("gif", "GIF"), ("bmp", "BMP"), ("tiff", "TIFF")):
        converted = await call(router, key, "ConvertImage", form(image=source, outputFormat=fmt))
        assert Image.open(io.BytesIO(await fetch(router, key, converted))).format == pil
        assert converted["results"][0]["fileName"].endswith(f".{fmt}")


async def test_an_image_watermark_changes_only_its_area(router: Router, key: str) -> None:
    source = png(200, 100, (10, 200, 30))
    answer = await call(router, key, "WatermarkImage", form(image=source, watermark=png(10, 10, (255, 0, 0)),
                                                            position="TopLeft", watermarkScale=0.2, opacity=1.0))
    marked = Image.open(io.BytesIO(await fetch(router, key, answer))).convert("RGB")
    box = ImageChops.difference(marked, Image.open(io.BytesIO(source)).convert("RGB")).getbbox()
    assert box == (10, 10, 50, 50), "a 40x40 mark (20% of 200) at the top-left margin, nothing else"
    assert marked.getpixel((30, 30)) == (255, 0, 0)


# ---- hostile inputs --------------------------------------------------------------------------------


async def test_hostile_inputs_are_refused_cleanly(router: Router, agent: Agents, key: str, media: dict[str, Path]) -> None:
    video = media["video"].read_bytes()
    cases = [
        ("ScaleVideo", form(video=b"this is a text file, not a video" * 10, width=64, height=64), "video",
         "is not a media file ffmpeg can read"),
        ("ScaleVideo", form(video=video[: len(video) // 2], width=64, height=64), "video", "is not a media file"),
        ("ConvertAudio", form(audio=b"", outputFormat="mp3"), "audio", "is an empty file"),
        ("CropVideo", form(video=video, x=300, y=0, width=100, height=100), "width", "reaches outside the 320x240 frame"),
        ("TrimVideo", form(video=video, startTime=5, endTime=6), "startTime", "past the end"),
        ("ScaleImage", form(image=_png_header(50000, 50000), width=10, height=10), "image", "is too large (Image size (2500000000 pixels)"),
        ("CropImage", form(image=png(20, 20), x=15, y=0, width=10, height=10), "width", "reaches outside the 20x20 image"),
        ("ConvertVideo", form(video=video, outputFormat="exe"), "outputFormat", "Input should be"),
        ("SpeechToText", form(audio=video, language="klingon"), "language", "is not a language Whisper knows"),
        ("SpeechToText", form(audio=video, language="de"), "language", "understands English only"),
    ]
    for api, body, field, words_ in cases:
        answer = await call(router, key, api, body, status=400)
        errors = answer["responseStatus"]["errors"]
        assert errors and errors[0]["fieldName"] == field, (api, answer)
        assert words_ in errors[0]["message"], (api, answer)
    async with aiohttp.ClientSession() as http:  # all still healthy
        async with http.get(f"{router.url}/health") as r:
            assert (await r.json())["agents"] == 1
    answer = await call(router, key, "ScaleVideo", form(video=video, width=64, height=48))
    assert answer["results"]


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (a decompression bomb's calling card)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


async def test_probing_reads_more_when_a_quick_look_leaves_the_video_size_unknown(tmp_path: Path) -> None:
    from agent.media.ffmpeg import QUICK_PROBE, _read_info, probe

    late = tmp_path / "late-video.ts"  # three seconds of audio before the first video packet
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=duration=6", "-itsoffset", "3", "-f", "lavfi",
                    "-i", "testsrc2=size=640x480:rate=25:duration=3", "-map", "0:a", "-map", "1:v", "-c:v", "libx264",
                    "-c:a", "mp2", "-b:a", "384k", "-f", "mpegts", str(late)], check=True)
    assert _read_info(late, QUICK_PROBE).width == 0, "the quick look alone does not see the frame size"
    info = await probe(late, "video")
    assert (info.width, info.height, info.video_codec, info.audio_codec) == (640, 480, "h264", "mp2")
