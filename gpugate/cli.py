"""The ``gpugate`` command. Builds the settings once and hands them to the part that was asked for."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from .errors import DownloadError, FieldError, GpugateError, InvalidRequest, JobFailed
from .log import setup_logging
from .settings import Settings, load_settings


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        settings = load_settings(args.config)
        return int(args.func(settings, args) or 0)
    except JobFailed as exc:
        _print_failure(exc)
        return 1
    except GpugateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, DownloadError) else 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpugate", description="Self-hosted AI media on your own GPUs.")
    parser.add_argument("--config", type=Path, help="TOML settings file (default: $GPUGATE_CONFIG)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    agent = commands.add_parser("agent", help="run the agent (supervised ComfyUI) until Ctrl-C")
    agent.add_argument("--router", metavar="URL", help="join this router (the token: agent.token / GPUGATE_AGENT__TOKEN)")
    agent.set_defaults(func=_agent)

    router = commands.add_parser("router", help="run the router until Ctrl-C")
    router.set_defaults(func=_router)

    up = commands.add_parser("up", help="run a router and a local agent; print the URL and an admin key")
    up.set_defaults(func=_up)

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(required=True, metavar="ACTION")
    create = keys.add_parser("create", help="make a key (printed once)")
    create.add_argument("--name", default="")
    create.add_argument("--apis", help="comma-separated APIs the key may call (default: all)")
    create.add_argument("--admin", action="store_true", help="may see every key's jobs")
    limits = keys.add_parser("limits", help="set a key's weight, queued-job cap and jobs a minute")
    limits.add_argument("id", type=int)
    for sub in (create, limits):
        sub.add_argument("--weight", type=int, help="its jobs a turn when keys take turns (1..1000; default 1)")
        sub.add_argument("--max-queued", type=int, help="its jobs that may wait at once (default: no cap)")
        sub.add_argument("--per-minute", type=int, help="its jobs it may submit a minute (default: no limit)")
        sub.add_argument("--no-max-queued", action="store_true", help="remove its cap on queued jobs")
        sub.add_argument("--no-per-minute", action="store_true", help="remove its rate limit")
    create.set_defaults(func=_keys_create)
    limits.set_defaults(func=_keys_limits)
    keys.add_parser("list", help="the keys (never their secrets)").set_defaults(func=_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id", type=int)
    revoke.set_defaults(func=_keys_revoke)

    health = commands.add_parser("health", help="exit 0 if this host's router or agent is healthy (for HEALTHCHECK)")
    health.add_argument("part", choices=["agent", "router"])
    health.set_defaults(func=_health)

    jobs = commands.add_parser("jobs", help="the job history (live and archived)").add_subparsers(required=True, metavar="ACTION")
    listing = jobs.add_parser("list", help="jobs by refId, tag, key, state and date, newest first")
    for option in ("ref-id", "tag", "key-id", "state", "since", "until"):
        listing.add_argument(f"--{option}", help="a date or date and time (UTC), ISO 8601" if option in ("since", "until") else None)
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(func=_jobs_list)
    show = jobs.add_parser("show", help="one job, whole, as JSON")
    show.add_argument("id", type=int)
    show.set_defaults(func=_jobs_show)

    models = commands.add_parser("models", help="the model catalog: what is installed, what can be pulled").add_subparsers(required=True, metavar="ACTION")
    models.add_parser("list", help="catalog models (installed or not) and other installed files").set_defaults(func=_models_list)
    pull = models.add_parser("pull", help="download catalog models: resumable, hash-checked, placed for ComfyUI/whisper/piper")
    pull.add_argument("names", nargs="+", metavar="NAME")
    pull.add_argument("--quiet", action="store_true", help="no progress bar")
    pull.set_defaults(func=_models_pull)

    inventory = commands.add_parser("inventory", help="start ComfyUI and list the models it can serve, by kind")
    inventory.set_defaults(func=_inventory)

    comfy = commands.add_parser("comfy", help="manage the vendored ComfyUI").add_subparsers(required=True, metavar="ACTION")
    comfy.add_parser("provision", help="download ComfyUI 0.3.75 (pinned by hash) into the vendor folder").set_defaults(func=_provision)
    llm = commands.add_parser("llm", help="manage llama.cpp for chat").add_subparsers(required=True, metavar="ACTION")
    llm.add_parser("provision", help="build llama.cpp's llama-server (pinned, once per machine; CUDA when nvcc is "
                                     "there) into the vendor folder").set_defaults(func=_llm_provision)

    workflow = commands.add_parser("workflow", help="list or run workflow templates").add_subparsers(required=True, metavar="ACTION")
    workflow.add_parser("list", help="the workflows and their parameters").set_defaults(func=_workflow_list)
    run = workflow.add_parser("run", help="run one workflow through the supervised ComfyUI")
    run.add_argument("name")
    run.add_argument("--set", dest="values", action="append", default=[], metavar="KEY=VALUE",
                     help="a parameter; image parameters take a file path")
    run.add_argument("--out", type=Path, default=Path("."), help="folder for the outputs (default: .)")
    run.set_defaults(func=_workflow_run)

    remote = commands.add_parser("run", help="run a workflow some agent serves, through a router")
    remote.add_argument("name", metavar="WORKFLOW")
    remote.add_argument("--router", required=True, metavar="URL")
    remote.add_argument("--key", help="an API key (default: $GPUGATE_API_KEY)")
    remote.add_argument("--set", dest="values", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter; image parameters take a file path")
    remote.add_argument("--out", type=Path, default=Path("."), help="folder for the outputs (default: .)")
    remote.set_defaults(func=_run_remote)
    return parser


def _run_remote(settings: Settings, args: argparse.Namespace) -> None:
    from .remote import run_workflow

    for line in asyncio.run(run_workflow(args.router, args.key, args.name, args.values, args.out)):
        print(line)


def _llm_provision(settings: Settings, args: argparse.Namespace) -> None:
    from agent.chat.build import provision

    print(provision(settings))


def _provision(settings: Settings, args: argparse.Namespace) -> None:
    from agent.comfy.vendor import provision

    print(provision(settings.comfy_vendor_dir, settings.paths.cache_dir))


def _agent(settings: Settings, args: argparse.Namespace) -> None:
    from agent.main import serve

    if args.router:
        settings = settings.model_copy(update={"agent": settings.agent.model_copy(update={"router_url": args.router})})
    asyncio.run(serve(settings))


def _router(settings: Settings, args: argparse.Namespace) -> None:
    from router.main import serve

    if not settings.router.agent_token:
        print("warning: router.agent_token is not set; no agent can join", file=sys.stderr)
    asyncio.run(serve(settings))


def _up(settings: Settings, args: argparse.Namespace) -> None:
    from router.main import up

    asyncio.run(up(settings, args.config, args.log_level))


def _keys_create(settings: Settings, args: argparse.Namespace) -> None:
    from router.keys import create_key
    from router.store.backends import open_store

    apis = tuple(a.strip() for a in args.apis.split(",") if a.strip()) if args.apis else None
    store = open_store(settings)
    try:
        new = create_key(store, args.name, apis, args.admin, _limits(args))
    finally:
        store.close()
    print(f"webhook secret (verifies this key's ReplyTo callbacks): {new.key.webhook_secret}")
    print(f"key {new.key.id} ({', '.join(apis) if apis else 'all APIs'}): {new.token}")


def _limits(args: argparse.Namespace, current: Any = None) -> Any:
    """The limits the options give, on top of ``current`` (a key's, for `keys limits`)."""
    from router.store import KeyLimits

    limits = current or KeyLimits()
    for name, most in (("weight", 1000), ("max_queued", 10**7), ("per_minute", 10**7)):
        value = getattr(args, name)
        if value is not None and not 1 <= value <= most:
            raise SystemExit(f"--{name.replace('_', '-')} must be from 1 to {most}")
    return KeyLimits(args.weight if args.weight is not None else limits.weight,
                     None if args.no_max_queued else args.max_queued if args.max_queued is not None else limits.max_queued,
                     None if args.no_per_minute else args.per_minute if args.per_minute is not None else limits.per_minute)


def _keys_limits(settings: Settings, args: argparse.Namespace) -> int:
    from router.store.backends import open_store

    store = open_store(settings)
    try:
        key = store.get_key(args.id)
        if key is None:
            print(f"no key {args.id}", file=sys.stderr)
            return 1
        limits = _limits(args, key.limits)
        store.set_key_limits(args.id, limits)
    finally:
        store.close()
    print(f"key {args.id}: weight {limits.weight}, at most {limits.max_queued or 'any number of'} queued, "
          f"{limits.per_minute or 'any number of'} a minute (routers apply it within 5 s)")
    return 0


def _keys_list(settings: Settings, args: argparse.Namespace) -> None:
    import time

    from router.store.backends import open_store

    store = open_store(settings)
    try:
        for key in store.list_keys():
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(key.created))
            state = "revoked" if key.revoked else ("admin" if key.admin else "active")
            print(f"{key.id:4} {key.prefix}...  {state:8} {when}  {key.name or '-':20} "
                  f"{','.join(key.apis) if key.apis else 'all APIs'}")
    finally:
        store.close()


def _keys_revoke(settings: Settings, args: argparse.Namespace) -> int:
    from router.store.backends import open_store

    store = open_store(settings)
    try:
        if not store.revoke_key(args.id):
            print(f"error: no active key {args.id}", file=sys.stderr)
            return 2
    finally:
        store.close()
    print(f"key {args.id} revoked")
    return 0


def _health(settings: Settings, args: argparse.Namespace) -> int:
    """Router: /health answers. Agent: every worker sent a heartbeat to its router lately."""
    import json
    import time
    import urllib.request

    if args.part == "router":
        try:
            with urllib.request.urlopen(f"{settings.router.local_url}/health", timeout=5) as r:
                print(r.read().decode())
                return 0
        except OSError as exc:
            print(f"unhealthy: {exc}", file=sys.stderr)
            return 1
    beats = sorted(settings.health_dir.glob("*.json")) if settings.health_dir.is_dir() else []
    limit = max(3 * settings.agent.heartbeat_s, 30.0)
    stale = [p.stem for p in beats if time.time() - json.loads(p.read_text())["time"] > limit]
    if not beats or stale:
        print(f"unhealthy: {'no worker is connected' if not beats else 'no heartbeat lately from ' + ', '.join(stale)}",
              file=sys.stderr)
        return 1
    print(f"healthy: {', '.join(p.stem for p in beats)}")
    return 0


def _models_list(settings: Settings, args: argparse.Namespace) -> None:
    from gpugate.catalog import NAMED_KINDS, Catalog

    catalog = Catalog.load(settings.router.catalog)
    root = settings.paths.models_dir
    listed = set()
    for entry in sorted(catalog.entries.values(), key=lambda e: (e.kind, e.name)):
        size = sum(f.size or 0 for f in entry.files)
        state = "installed" if entry.installed(root) else (
            "available" if entry.files else ("packaged" if entry.packaged or entry.kind in NAMED_KINDS else "no download"))
        listed |= {(entry.kind, f.path.split("/")[0]) for f in entry.files} | {(entry.kind, entry.file)}
        print(f"{entry.name:28} {entry.kind:16} {state:11} {size / 2**30:7.2f} GB  "
              f"{f'{entry.vram_gb:g} GB VRAM' if entry.vram_gb else '':12} {'default ' if entry.default else ''}{entry.description}".rstrip())
    others = [(d.name, f.name) for d in sorted(root.iterdir()) if d.is_dir() for f in sorted(d.iterdir())
              if not f.name.startswith(".") and not f.name.endswith(".partial") and (d.name, f.name) not in listed] \
        if root.is_dir() else []
    for kind, name in others:
        print(f"{name:28} {kind:16} installed   (not in the catalog)")


def _models_pull(settings: Settings, args: argparse.Namespace) -> int:
    from agent.downloads import pull
    from gpugate.catalog import Catalog

    catalog = Catalog.load(settings.router.catalog)
    unknown = [n for n in args.names if n not in catalog.entries]
    if unknown:
        print(f"error: not in the catalog: {', '.join(unknown)}; see `gpugate models list`", file=sys.stderr)
        return 2
    for name in args.names:
        for path in asyncio.run(pull(catalog.entries[name], settings.paths.models_dir, show_progress=not args.quiet)):
            print(f"{name}: {path}")
    return 0


def _job_history(settings: Settings) -> Any:
    from router.lookup import JobFinder
    from router.store.backends import open_archive, open_store

    store = open_store(settings)
    return store, JobFinder({}, store, open_archive(settings, store))


def _jobs_list(settings: Settings, args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from router.api.jobs import JobFilter

    asked = {"refId": args.ref_id, "tag": args.tag, "keyId": args.key_id, "state": args.state, "since": args.since,
             "until": args.until, "limit": args.limit}
    try:
        query = JobFilter.model_validate({k: v for k, v in asked.items() if v is not None}).query(None)
    except ValidationError as exc:
        for error in exc.errors():
            print(f"error: --{'-'.join(str(p) for p in error['loc'])}: {error['msg']}", file=sys.stderr)
        return 2
    store, finder = _job_history(settings)
    try:
        for job in asyncio.run(finder.find(query)):
            took = f"{job.finished - job.created:8.2f}s" if job.finished else " " * 9
            error = (job.error or {}).get("message", "")
            print(f"{job.id:6} {job.state:9} {job.api:18} {_when(job.created)} {took} ref={job.ref_id or '-'} "
                  f"tag={job.tag or '-'} key={job.key_id or '-'} agent={job.agent or '-'} {error}".rstrip())
    finally:
        finder.archive.close()
        store.close()
    return 0


def _when(timestamp: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


def _jobs_show(settings: Settings, args: argparse.Namespace) -> int:
    import json

    import time

    from router.api.responses import JobSummary
    from router.app import url_signer
    from router.urls import Links

    store, finder = _job_history(settings)
    try:
        job = asyncio.run(finder.get(args.id))
    finally:
        finder.archive.close()
        store.close()
    if job is None:
        print(f"error: no job {args.id}", file=sys.stderr)
        return 2
    base = (settings.router.public_base_url or settings.router.local_url).rstrip("/")
    print(json.dumps(JobSummary.of(job, Links(base, url_signer(settings), time.time())).body(), indent=2))
    return 0


def _inventory(settings: Settings, args: argparse.Namespace) -> None:
    from agent.comfy.engine import ComfyEngine

    async def go() -> None:
        async with ComfyEngine(settings) as engine:
            for model in await engine.models():
                size = f"{model.size / 2**20:.0f} MiB" if model.size is not None else "?"
                print(f"{model.kind:18} {model.name:50} {size}")

    asyncio.run(go())


def _workflow_list(settings: Settings, args: argparse.Namespace) -> int:
    from agent.comfy.workflows import ParamType, WorkflowLibrary

    workflows, problems = WorkflowLibrary(settings.workflows.dirs).scan()
    for wf in workflows:
        print(f"{wf.name}: {wf.description or '(no description)'}")
        for name, spec in wf.params.items():
            default = "required" if spec.required else (
                "random" if spec.type is ParamType.SEED and wf.default(name) is None else f"default {wf.default(name)!r}")
            limits = f" {spec.min:g}..{spec.max:g}" if spec.min is not None and spec.max is not None else ""
            print(f"    {name:16} {spec.type.value}{limits} ({default})")
    for problem in problems:
        print(f"not loaded: {problem}", file=sys.stderr)
    return 1 if problems and not workflows else 0


def _workflow_run(settings: Settings, args: argparse.Namespace) -> None:
    from agent.comfy.engine import ComfyEngine
    from agent.comfy.workflows import ParamType, WorkflowLibrary

    library = WorkflowLibrary(settings.workflows.dirs)
    template = library.get(args.name)  # unknown names fail before ComfyUI starts
    values: dict[str, Any] = {}
    for item in args.values:
        key, eq, value = item.partition("=")
        if not eq:
            raise InvalidRequest(FieldError(key, "expected KEY=VALUE"))
        spec = template.params.get(key)
        if spec is not None and spec.type is ParamType.IMAGE:
            try:
                values[key] = Path(value.removeprefix("@")).read_bytes()
            except OSError as exc:
                raise InvalidRequest(FieldError(key, f"cannot read {value}: {exc.strerror}")) from exc
        else:
            values[key] = value

    async def go() -> None:
        with _ProgressBar() as bar:
            async with ComfyEngine(settings, library) as engine:
                outputs = await engine.run(args.name, values, on_progress=bar.update)
        args.out.mkdir(parents=True, exist_ok=True)
        for output in outputs:
            path = args.out / output.filename
            path.write_bytes(output.data)
            print(path)

    asyncio.run(go())


def _print_failure(exc: JobFailed) -> None:
    print(f"error ({exc.kind.value}): {exc.message}", file=sys.stderr)


class _ProgressBar:
    """A tqdm bar for sampler steps on a terminal; silent otherwise (the log has the events)."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._enabled = sys.stderr.isatty()

    def __enter__(self) -> _ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def update(self, progress: Any) -> None:
        if not self._enabled:
            return
        from tqdm import tqdm

        if self._bar is None:
            self._bar = tqdm(total=progress.total or 1, unit="step", file=sys.stderr)
        if progress.total:
            self._bar.total = progress.total
            self._bar.n = progress.step or 0
        self._bar.set_description(progress.node_type or "")
        self._bar.refresh()


if __name__ == "__main__":
    sys.exit(main())
