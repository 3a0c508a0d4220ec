"""The ``gpugate`` command. Builds the settings once and hands them to the part that was asked for."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from .errors import FieldError, GpugateError, InvalidRequest, JobFailed
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
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpugate", description="Self-hosted AI media on your own GPUs.")
    parser.add_argument("--config", type=Path, help="TOML settings file (default: $GPUGATE_CONFIG)")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    agent = commands.add_parser("agent", help="run the agent (supervised ComfyUI) until Ctrl-C")
    agent.set_defaults(func=_agent)

    inventory = commands.add_parser("inventory", help="start ComfyUI and list the models it can serve, by kind")
    inventory.set_defaults(func=_inventory)

    comfy = commands.add_parser("comfy", help="manage the vendored ComfyUI").add_subparsers(required=True, metavar="ACTION")
    comfy.add_parser("provision", help="download ComfyUI 0.3.75 (pinned by hash) into the vendor folder").set_defaults(func=_provision)

    workflow = commands.add_parser("workflow", help="list or run workflow templates").add_subparsers(required=True, metavar="ACTION")
    workflow.add_parser("list", help="the workflows and their parameters").set_defaults(func=_workflow_list)
    run = workflow.add_parser("run", help="run one workflow through the supervised ComfyUI")
    run.add_argument("name")
    run.add_argument("--set", dest="values", action="append", default=[], metavar="KEY=VALUE",
                     help="a parameter; image parameters take a file path")
    run.add_argument("--out", type=Path, default=Path("."), help="folder for the outputs (default: .)")
    run.set_defaults(func=_workflow_run)
    return parser


def _provision(settings: Settings, args: argparse.Namespace) -> None:
    from agent.comfy.vendor import provision

    print(provision(settings.comfy_vendor_dir, settings.paths.cache_dir))


def _agent(settings: Settings, args: argparse.Namespace) -> None:
    from agent.main import serve

    asyncio.run(serve(settings))


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
