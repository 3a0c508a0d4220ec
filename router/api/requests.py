"""Public API requests: parsing (JSON or multipart, any key case) and validation, in one place.

Each API is a pydantic model with AI Server's field names and limits, plus how it becomes a job:
the agent capability, its parameters, uploaded files, the model file and the output size.
"""

from __future__ import annotations

import errno
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import BadHttpMessage
from pydantic import (
    AfterValidator,
    AliasChoices,
    AliasGenerator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError
from pydantic.alias_generators import to_camel

from gpugate.errors import FieldError, InvalidRequest
from gpugate.params import TEXT_MAX
from gpugate.images import ImageInfo, probe_image
from gpugate.settings import Router as RouterSettings

from ..artifacts import Intake, Received
from ..models import ModelBook, ModelRef
from ..workflows import check_args
from .errors import ApiError, invalid


@dataclass(frozen=True)
class Upload:
    """A file part of a multipart request, checked to be an image."""

    file: Received
    info: ImageInfo


def _image_upload(value: Any) -> Upload:
    if not isinstance(value, Received):
        raise ValueError("must be uploaded as a file (a multipart/form-data part)")
    if not value.size:
        raise ValueError("is an empty file")
    return Upload(value, probe_image(value.path))  # reads the header only


def _file_schema(media: str) -> WithJsonSchema:
    """How a file field looks in the OpenAPI document: a multipart part of this media type."""
    return WithJsonSchema({"type": "string", "format": "binary", "contentMediaType": media})


ImageFile = Annotated[Upload, BeforeValidator(_image_upload), _file_schema("image/*")]


def _media_upload(value: Any) -> Received:
    """Audio or video: the agent probes it with ffmpeg; here only that it is a non-empty file."""
    if not isinstance(value, Received):
        raise ValueError("must be uploaded as a file (a multipart/form-data part)")
    if not value.size:
        raise ValueError("is an empty file")
    return value


MediaFile = Annotated[Received, BeforeValidator(_media_upload), _file_schema("application/octet-stream")]


@dataclass
class JobSpec:
    """What a request asks an agent to do."""

    capability: str
    params: dict[str, Any]
    files: dict[str, Upload | Received]
    model: str | None
    megapixels: float
    notes: list[str] = field(default_factory=list)  # what the router decided for the client (the job's details)


class Tracked(BaseModel):
    """What every request may carry besides its own fields: the client's id for it, a tag, and a
    URL to call when the job ends (Queue* calls)."""

    model_config = ConfigDict(alias_generator=AliasGenerator(validation_alias=to_camel), extra="ignore",
                              arbitrary_types_allowed=True, populate_by_name=True)

    ref_id: str | None = None
    tag: str | None = None
    reply_to: str | None = None


class ApiRequest(Tracked):
    results: ClassVar[str] = "artifacts"  # or "text"
    # workflow parameter -> API field, to name fields in errors that come back from agents
    field_names: ClassVar[dict[str, str]] = {}

    def job(self, models: ModelBook) -> JobSpec:
        """What the request asks for; InvalidRequest naming the field when it cannot be done."""
        raise NotImplementedError


def _arguments(value: Any) -> Any:
    """AI Server's ``arguments``: an object, or (in a form) its JSON text."""
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError("must be a JSON object: workflow parameter -> value") from None
    return value


Arguments = Annotated[dict[str, str | int | float | bool] | None, BeforeValidator(_arguments)]


def _image_recipe(models: ModelBook, task: str, model_id: str | None, given: dict[str, Any],
                  arguments: dict[str, Any] | None, files: frozenset[str] = frozenset()
                  ) -> tuple[str, dict[str, Any], ModelRef, list[str]]:
    """The workflow for an image task on the model's family, and its parameters: the family's
    defaults, then the request's fields, then its ``arguments``, checked against the workflow."""
    model = models.resolve(model_id, "checkpoints")
    recipe, family, notes = models.recipe(task, model)
    notes += model.notes
    declared = models.workflow(recipe.workflow)
    defaults = dict(recipe.defaults)
    if declared is not None and declared.params is not None:  # a workflow an operator changed may lack some
        defaults = {k: v for k, v in defaults.items() if k in declared.params}
    if given.get("negative_prompt") and not family.negative_prompt:
        notes.append(f"negativePrompt is ignored: {family.title} takes no negative prompt")
        del given["negative_prompt"]
    arguments = arguments or {}
    params = {**defaults, **given, **arguments, "checkpoint": model.file}
    if declared is None:
        if arguments:
            notes.append(f"no agent has served {recipe.workflow} yet: its arguments are checked when it runs")
        return recipe.workflow, params, model, notes
    errors = [FieldError(f"arguments.{k}", "names the model: use the model field", "invalid")
              for k in arguments if k in (declared.params or {}) and declared.params[k].type == "model"]
    errors += check_args(declared, {k: v for k, v in params.items() if k != "checkpoint"}, files=files,
                         field=lambda name: f"arguments.{name}" if name in arguments else _PROMPTS.get(name, name))
    if errors:
        raise InvalidRequest(errors)
    return recipe.workflow, params, model, notes


def _present(**values: Any) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


Size = Annotated[int, Field(ge=64, le=2048, multiple_of=8)]
Batch = Annotated[int, Field(ge=1, le=10)]
Seed = Annotated[int, Field(ge=0, lt=2**64)]
Denoise = Annotated[float, Field(ge=0, le=1)]
_PROMPTS = {"prompt": "positivePrompt", "negative_prompt": "negativePrompt", "checkpoint": "model",
            "batch_size": "batchSize"}


class TextToImage(ApiRequest):
    field_names: ClassVar[dict[str, str]] = _PROMPTS
    positive_prompt: Annotated[str, Field(min_length=1, max_length=TEXT_MAX)]
    negative_prompt: Annotated[str, Field(max_length=TEXT_MAX)] | None = None
    width: Size | None = None  # the model family's default when not given
    height: Size | None = None
    batch_size: Batch = 1
    model: str | None = None
    seed: Seed | None = None
    arguments: Arguments = None

    def job(self, models: ModelBook) -> JobSpec:
        given = _present(prompt=self.positive_prompt, negative_prompt=self.negative_prompt, width=self.width,
                         height=self.height, batch_size=self.batch_size, seed=self.seed)
        workflow, params, model, notes = _image_recipe(models, "txt2img", self.model, given, self.arguments)
        pixels = _int(params.get("width"), 512) * _int(params.get("height"), 512) * _int(params.get("batch_size"), 1)
        return JobSpec(workflow, params, {}, model.file, pixels / 1e6, notes)


def _int(value: Any, fallback: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return fallback


class ImageToImage(ApiRequest):
    field_names: ClassVar[dict[str, str]] = _PROMPTS
    image: ImageFile
    positive_prompt: Annotated[str, Field(max_length=TEXT_MAX)] | None = None
    negative_prompt: Annotated[str, Field(max_length=TEXT_MAX)] | None = None
    model: str | None = None
    denoise: Denoise | None = None
    batch_size: Batch = 1
    seed: Seed | None = None
    arguments: Arguments = None

    def job(self, models: ModelBook) -> JobSpec:
        given = _present(prompt=self.positive_prompt, negative_prompt=self.negative_prompt, denoise=self.denoise,
                         batch_size=self.batch_size, seed=self.seed)
        workflow, params, model, notes = _image_recipe(models, "img2img", self.model, given, self.arguments,
                                                       frozenset({"image"}))
        info = self.image.info
        return JobSpec(workflow, params, {"image": self.image}, model.file,
                       info.width * info.height * self.batch_size / 1e6, notes)


class ImageWithMask(ApiRequest):
    field_names: ClassVar[dict[str, str]] = _PROMPTS
    image: ImageFile
    mask: ImageFile
    positive_prompt: Annotated[str, Field(max_length=TEXT_MAX)] | None = None
    negative_prompt: Annotated[str, Field(max_length=TEXT_MAX)] | None = None
    model: str | None = None
    denoise: Denoise | None = None
    seed: Seed | None = None
    arguments: Arguments = None

    def job(self, models: ModelBook) -> JobSpec:
        given = _present(prompt=self.positive_prompt, negative_prompt=self.negative_prompt, denoise=self.denoise,
                         seed=self.seed)
        workflow, params, model, notes = _image_recipe(models, "inpaint", self.model, given, self.arguments,
                                                       frozenset({"image", "mask"}))
        info = self.image.info
        return JobSpec(workflow, params, {"image": self.image, "mask": self.mask}, model.file,
                       info.width * info.height / 1e6, notes)


class ImageUpscale(ApiRequest):
    image: ImageFile
    model: str | None = None
    seed: Seed | None = None  # accepted for compatibility; an upscale model has no randomness

    def job(self, models: ModelBook) -> JobSpec:
        upscaler = models.resolve(self.model, "upscale_models")
        info = self.image.info
        return JobSpec("upscale", {"model": upscaler.file}, {"image": self.image}, upscaler.file,
                       4 * info.width * info.height / 1e6, list(upscaler.notes))


class Echo(ApiRequest):
    """A job that does nothing on the agent: measures the router and the link (bench/router.py)."""

    results: ClassVar[str] = "text"
    text: str = ""

    def job(self, models: ModelBook) -> JobSpec:
        return JobSpec("echo", {"text": self.text}, {}, None, 0.0)


class ComfyWorkflow(ApiRequest):
    """Run any workflow an agent serves, by name: its declared parameters in ``args`` (or as fields
    and, for images, as file parts named after them)."""

    model_config = ConfigDict(**ApiRequest.model_config | {"extra": "allow"})
    workflow: Annotated[str, Field(min_length=1)]
    args: Arguments = None

    def job(self, models: ModelBook) -> JobSpec:
        declared = models.workflow(self.workflow)
        if declared is None or declared.params is None:
            served = ", ".join(models.workflows()) or "none"
            raise InvalidRequest(FieldError("workflow", f"no agent serves {self.workflow!r}; served now: {served}",
                                            "unknown"))
        args: dict[str, Any] = dict(self.args or {})
        received = {k: v for k, v in (self.model_extra or {}).items() if isinstance(v, Received)}
        args.update({k: v for k, v in (self.model_extra or {}).items() if k not in received and k not in args})
        errors = check_args(declared, args, files=frozenset(received))
        files: dict[str, Upload] = {}
        for name, value in received.items():
            if name in declared.params and declared.params[name].type == "image":
                try:
                    files[name] = _image_upload(value)
                except ValueError as exc:
                    errors.append(FieldError(name, str(exc), "not_an_image"))
        if errors:
            raise InvalidRequest(errors)
        model, notes = None, []
        for name, param in declared.params.items():  # the job is scheduled by the model it loads
            if param.type != "model":
                continue
            kind = param.kind or "checkpoints"
            if args.get(name):
                ref = models.resolve(str(args[name]), kind, field=name)  # an alias becomes its file
            else:  # the template's own model if anyone has it, else the catalog's default of its kind
                try:
                    ref = models.resolve(str(param.default or ""), kind, field=name)
                except InvalidRequest:
                    ref = models.resolve(None, kind, field=name)
                    notes.append(f"{name}: the workflow's own {param.default!r} is on no connected agent; "
                                 f"the catalog's default {ref.file!r} is used")
            args[name] = ref.file
            notes += ref.notes
            model = model or ref.file
        return JobSpec(self.workflow, args, dict(files), model, _megapixels(declared.params, args, files), notes)


def _megapixels(params: dict[str, Any], args: dict[str, Any], files: dict[str, Upload]) -> float:
    """Output pixels x batch, in millions, from the arguments or the declared defaults."""
    def value(name: str, fallback: int) -> int:
        return _int(args.get(name, params[name].default if name in params else None), fallback)

    if "width" in params and "height" in params:
        pixels = value("width", 512) * value("height", 512)
    else:
        pixels = max((f.info.width * f.info.height for f in files.values()), default=0)
    return pixels * value("batch_size", 1) / 1e6


# ---- speech ------------------------------------------------------------------------------------


# The languages Whisper knows (faster_whisper.tokenizer._LANGUAGE_CODES), as its ISO 639 codes.
WHISPER_LANGUAGES = frozenset("""
af am ar as az ba be bg bn bo br bs ca cs cy da de el en es et eu fa fi fo fr gl gu ha haw he hi hr ht hu hy id is it
ja jw ka kk km kn ko la lb ln lo lt lv mg mi mk ml mn mr ms mt my ne nl nn no oc pa pl ps pt ro ru sa sd si sk sl sn so
sq sr su sv sw ta te tg th tk tl tr tt uk ur uz vi yi yo zh yue""".split())


def _language(value: str | None) -> str | None:
    if value is None or not value.strip():
        return None
    code = value.strip().lower()
    if code not in WHISPER_LANGUAGES:
        raise ValueError(f"{value!r} is not a language Whisper knows; use an ISO 639-1 code such as en, de, fr, es, "
                         "ja, zh (or leave it out to detect it)")
    return code


class SpeechToText(ApiRequest):
    results: ClassVar[str] = "text"
    audio: MediaFile
    model: str | None = None  # a whisper model: tiny.en, base, small, ...
    language: Annotated[str | None, AfterValidator(_language)] = None  # detected when not given

    def job(self, models: ModelBook) -> JobSpec:
        model = models.resolve(self.model, "whisper")
        return JobSpec("speech-to-text", _present(model=model.file, language=self.language), {"audio": self.audio},
                       model.file, 0.0, list(model.notes))


class TextToSpeech(ApiRequest):
    input: Annotated[str, Field(min_length=1, max_length=20000,
                                validation_alias=AliasChoices("input", "text"))]  # `text` on QueueTextToSpeech
    model: str | None = None  # a piper voice
    seed: Seed | None = None  # accepted for compatibility; Piper is deterministic
    output_format: Literal["wav", "mp3", "ogg", "flac"] = "wav"

    def job(self, models: ModelBook) -> JobSpec:
        ref = models.resolve(self.model, "piper")
        return JobSpec("text-to-speech", {"text": self.input, "model": ref.file, "format": self.output_format}, {},
                       ref.file, 0.0, list(ref.notes))


# ---- media transforms ----------------------------------------------------------------------------

Side = Annotated[int, Field(ge=2, le=8192, multiple_of=2)]  # even: H.264 in 4:2:0 needs it
Offset = Annotated[int, Field(ge=0, le=8192)]
Position = Literal["TopLeft", "TopRight", "BottomLeft", "BottomRight", "Center"]


def _seconds(value: Any) -> float:
    """``12.5``, ``"12.5"``, ``"00:00:05"`` or ``"01:02:03.5"`` -> seconds."""
    if isinstance(value, bool):
        raise ValueError("must be a time: seconds or HH:MM:SS")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        parts = str(value).strip().split(":")
        try:
            if len(parts) > 3 or not all(parts):
                raise ValueError
            seconds = 0.0
            for part in parts:
                seconds = seconds * 60 + float(part)
        except ValueError:
            raise ValueError("must be a time: seconds or HH:MM:SS") from None
    if not 0 <= seconds <= 24 * 3600 or seconds != seconds:
        raise ValueError("must be between 0 and 24 hours")
    return seconds


Seconds = Annotated[float, BeforeValidator(_seconds), WithJsonSchema(
    {"anyOf": [{"type": "number", "minimum": 0}, {"type": "string", "pattern": r"^\d+(:\d+){0,2}(\.\d+)?$"}],
     "description": "seconds, or HH:MM:SS"})]


class Transform(ApiRequest):
    """A media transform: its file fields go to the agent as files, its other fields as parameters."""

    capability: ClassVar[str]
    files: ClassVar[tuple[str, ...]]

    def job(self, models: ModelBook) -> JobSpec:
        common = set(ApiRequest.model_fields)
        params = {n: getattr(self, n) for n in type(self).model_fields if n not in common and n not in self.files}
        return JobSpec(self.capability, params, {n: getattr(self, n) for n in self.files}, None, 0.0)


ImageSide = Annotated[int, Field(ge=1, le=8192)]


class ScaleVideo(Transform):
    capability, files = "scale-video", ("video",)
    video: MediaFile
    width: Side
    height: Side


class CropVideo(Transform):
    capability, files = "crop-video", ("video",)
    video: MediaFile
    x: Offset = 0
    y: Offset = 0
    width: Side
    height: Side


class TrimVideo(Transform):
    capability, files = "trim-video", ("video",)
    video: MediaFile
    start_time: Seconds = 0.0
    end_time: Seconds

    @model_validator(mode="after")
    def _ordered(self) -> TrimVideo:
        if self.end_time <= self.start_time:
            raise PydanticCustomError("out_of_range", "endTime must be after startTime")
        return self


class ConvertVideo(Transform):
    capability, files = "convert-video", ("video",)
    video: MediaFile
    output_format: Literal["mp4", "mov", "webm", "mkv", "avi", "wmv", "mpeg", "ogg"]


class WatermarkVideo(Transform):
    capability, files = "watermark-video", ("video", "watermark")
    video: MediaFile
    watermark: ImageFile
    position: Position = "BottomRight"


class ConvertAudio(Transform):
    capability, files = "convert-audio", ("audio",)
    audio: MediaFile
    output_format: Literal["mp3", "wav", "flac", "ogg", "aac", "m4a"]


class ScaleImage(Transform):
    capability, files = "scale-image", ("image",)
    image: ImageFile
    width: ImageSide
    height: ImageSide


class CropImage(Transform):
    capability, files = "crop-image", ("image",)
    image: ImageFile
    x: Offset = 0
    y: Offset = 0
    width: ImageSide
    height: ImageSide


class ConvertImage(Transform):
    capability, files = "convert-image", ("image",)
    image: ImageFile
    output_format: Literal["jpg", "png", "gif", "bmp", "tiff", "webp"]


class WatermarkImage(Transform):
    capability, files = "watermark-image", ("image", "watermark")
    image: ImageFile
    watermark: ImageFile
    position: Position = "BottomRight"
    watermark_scale: Annotated[float, Field(gt=0, le=1)] = 0.25  # of the image's width
    opacity: Annotated[float, Field(ge=0, le=1)] = 0.5


APIS: dict[str, type[ApiRequest]] = {cls.__name__: cls for cls in (
    TextToImage, ImageToImage, ImageWithMask, ImageUpscale, ComfyWorkflow, SpeechToText, TextToSpeech, ScaleVideo, CropVideo,
    TrimVideo, ConvertVideo, WatermarkVideo, ConvertAudio, ScaleImage, CropImage, ConvertImage, WatermarkImage)}


MB = 2**20
FIELDS_MAX = MB  # all text parts of one multipart request together


@dataclass(frozen=True)
class Limits:
    """How much of a request the router reads: per file part, in all, and how many parts."""

    file_bytes: int = 0  # 0: this call takes no files
    total_bytes: int = FIELDS_MAX
    parts: int = 32

    @classmethod
    def of(cls, router: RouterSettings) -> Limits:
        return cls(int(router.max_upload_mb * MB), int(router.request_limit_mb * MB), router.max_parts)


async def read_fields(request: web.Request, limits: Limits = Limits(), intake: Intake | None = None) -> dict[str, Any]:
    """The request's fields from JSON, a form or multipart, or the query. File parts are received
    into ``intake`` (streamed to disk, see router/artifacts.py); without one they are refused. A
    multipart body is read within ``limits``: 413 naming the limit as soon as one is passed."""
    if request.content_type == "multipart/form-data":
        if request.content_length is not None and request.content_length > limits.total_bytes:
            raise _too_large(limits)
        budget = _Budget(limits)
        fields: dict[str, Any] = {}
        try:
            reader = await request.multipart()
            async for part in reader:
                if not isinstance(part, BodyPartReader) or part.name is None:
                    continue
                budget.parts += 1
                if budget.parts > limits.parts:
                    raise ApiError(413, "RequestEntityTooLarge", f"the request has more than {limits.parts} parts")
                if part.filename is None:
                    text = b"".join([c async for c in budget.chunks(part, text=True)])
                    fields[part.name] = text.decode("utf-8", "replace")
                elif intake is None or not limits.file_bytes:
                    raise ApiError(400, "SerializationException", f"{part.name}: this call takes no files")
                else:
                    fields[part.name] = await intake.receive(budget.chunks(part, text=False))
        except (BadHttpMessage, ValueError, AssertionError) as exc:  # aiohttp's parser on a broken body
            raise ApiError(400, "SerializationException", f"the multipart body is malformed: {exc}") from None
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ApiError(507, "InsufficientStorage", "the router's file store is full; try again later") from None
            raise
        return fields
    if request.content_type == "application/x-www-form-urlencoded":
        return dict(await request.post())
    if request.body_exists:
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "SerializationException", "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "SerializationException", "the body must be a JSON object")
        return body
    return dict(request.query)


def _too_large(limits: Limits) -> ApiError:
    return ApiError(413, "RequestEntityTooLarge", f"the request is larger than {limits.total_bytes / MB:g} MB in all")


class _Budget:
    """What one request has used of its limits so far."""

    def __init__(self, limits: Limits) -> None:
        self.limits, self.total, self.text, self.parts = limits, 0, 0, 0

    async def chunks(self, part: BodyPartReader, *, text: bool) -> AsyncIterator[bytes]:
        """A part's bytes in large chunks, refused as soon as they pass a limit.

        aiohttp's ``part.read()`` scans for the boundary 8 KiB at a time; 4 MiB chunks ingest a 10 MB
        upload in 17 ms instead of 25 ms here (measured while tracing bench/media.py's ConvertAudio).
        """
        size = 0
        while chunk := await part.read_chunk(2**22):
            size += len(chunk)
            self.total += len(chunk)
            if text:
                self.text += len(chunk)
                if self.text > FIELDS_MAX:
                    raise ApiError(413, "RequestEntityTooLarge",
                                   f"{part.name}: the text fields are larger than {FIELDS_MAX // MB} MB in all")
            elif size > self.limits.file_bytes:
                raise ApiError(413, "RequestEntityTooLarge",
                               f"{part.name}: larger than {self.limits.file_bytes / MB:g} MB")
            if self.total > self.limits.total_bytes:
                raise _too_large(self.limits)
            yield chunk


def validate_fields(model: type[BaseModel], fields: dict[str, Any]) -> Any:
    """A plain request model (no files, exact field names) from its fields; 400 naming each bad one."""
    try:
        return model.model_validate(fields)
    except ValidationError as exc:
        raise invalid([FieldError(".".join(map(str, e["loc"])) or "body", e["msg"]) for e in exc.errors()]) from None


def parse(model: type[ApiRequest], fields: dict[str, Any]) -> ApiRequest:
    """Validate fields (any key case) against an API's model; 400 with one entry per bad field."""
    names = {}
    for name, info in model.model_fields.items():
        aliases = info.validation_alias.choices if isinstance(info.validation_alias, AliasChoices) else [info.validation_alias]
        for alias in (name, to_camel(name), *(a for a in aliases if isinstance(a, str))):
            names[alias.lower()] = name
    data = {names.get(k.lower(), k): v for k, v in fields.items()}
    try:
        parsed = model.model_validate(data)
    except ValidationError as exc:
        raise invalid([_field_error(e) for e in exc.errors()]) from None
    if parsed.ref_id is None:
        parsed.ref_id = uuid.uuid4().hex
    return parsed


def _field_error(error: Any) -> FieldError:
    field = to_camel(str(error["loc"][0])) if error["loc"] else ("endTime" if error["type"] == "out_of_range" else "request")
    message = str(error["msg"]).removeprefix("Value error, ")
    code = {"missing": "required", "greater_than_equal": "out_of_range", "less_than_equal": "out_of_range",
            "less_than": "out_of_range", "multiple_of": "out_of_range", "string_too_short": "required",
            "greater_than": "out_of_range", "out_of_range": "out_of_range"}.get(error["type"], "invalid")
    if error["type"] == "value_error" and ("image" in message or "too large" in message):
        code = "not_an_image"
    if message == "is an empty file":
        code = "empty"
    return FieldError(field, message, code)
