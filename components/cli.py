"""The `capfilt` command line.

Every sub-command is a small function that parses nothing itself: argparse builds the typed
arguments, the function imports the component it drives (lazily, so `capfilt --help` stays fast)
and calls its `run`. A `CapfiltError` becomes a one-line message and exit code 2; anything
else is a bug and keeps its traceback. SIGTERM unwinds like Ctrl-C (exit code 143), so what a
command started (Prefect's local server, a stage's subprocess) is stopped on the way out rather
than left running.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from components import children
from components.errors import CapfiltError
from components.model_cli import add_model_commands

# Offline and quiet by default; a user's explicit setting wins.
_QUIET_ENV = {
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "TOKENIZERS_PARALLELISM": "false",
}


def _cmd_synth(args: argparse.Namespace) -> int:
    from components import synth
    from components.config import load_params

    seed = [] if args.seed is None else [f"synth.seed={args.seed}"]  # validated like the file's
    cfg = load_params(args.params, [*args.set, *seed]).synth
    if args.preview:
        synth.check_preview_path(Path(args.preview), Path(args.out))
    summary = synth.run(cfg, Path(args.out))
    print(summary.describe())
    if args.preview:
        print(f"preview: {synth.write_preview(Path(args.out), Path(args.preview))}")
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from components import ingest
    from components.config import apply_overrides, load_params, parse_params
    from components.formats import SourceSpec

    overrides = args.set + ([f"ingest.workers={args.workers}"] if args.workers is not None else [])
    if args.params == "params.yaml" and not Path(args.params).exists():
        cfg = parse_params(apply_overrides({}, overrides)).ingest  # outside a project: defaults
    else:
        cfg = load_params(args.params, overrides).ingest
    specs = [
        SourceSpec(path=s, format=args.format, image_root=args.image_root,
                   image_column=args.image_column, caption_column=args.caption_column)
        for s in args.sources
    ]  # fmt: skip
    summary = ingest.run(specs, Path(args.out), cfg, kind=args.kind, split=args.split)
    print(summary.describe())
    return 0


def _cmd_stage(args: argparse.Namespace) -> int:
    from components import stages

    stages.run_stage(args.name, Path(args.params), args.set)
    return 0


def _cmd_flows(args: argparse.Namespace) -> int:
    # flows/ imports Prefect and MLflow; components/ must not (tests/test_layering.py), so the
    # orchestration commands live in flows/cli.py, loaded by name only when one of them runs.
    handlers = importlib.import_module("flows.cli")
    return getattr(handlers, args.flows_handler)(args)


def _add_orchestration(sub: argparse._SubParsersAction) -> None:
    """run, schedule, promote, compare, reproduce, stack (handlers in flows/cli.py)."""
    p = sub.add_parser("run", help="run the whole pipeline (Prefect flow over the DVC stages)")
    p.add_argument("--force", action="store_true", help="re-run every selected stage")
    p.add_argument("--stage", action="append", default=[], metavar="NAME",
                   help="run only this dvc.yaml stage (repeatable; default: pipeline.stages or all)")
    p.add_argument("--dry-run", action="store_true", help="list the stages that would run")
    p.add_argument("--no-prefect", action="store_true", help="plain `dvc repro`, no flow or tracking")
    _add_params(p)
    p.set_defaults(func=_cmd_flows, flows_handler="run")

    p = sub.add_parser("schedule", help="serve the pipeline as a Prefect deployment on a cron schedule")
    p.add_argument("--cron", required=True, help='cron expression, e.g. "0 3 * * 1" (Mondays 03:00)')
    p.add_argument("--name", default="scheduled", help="deployment name (default: scheduled)")
    p.add_argument("--timezone", default="UTC", help="timezone of the cron (default: UTC)")
    p.add_argument("--stage", action="append", default=[], metavar="NAME", help="stages to run")
    p.add_argument("--dry-run", action="store_true", help="scheduled runs only list their stages")
    _add_params(p)
    p.set_defaults(func=_cmd_flows, flows_handler="schedule")

    p = sub.add_parser("promote", help="point a registered model's `champion` alias at a version")
    p.add_argument("model", help="registered model, e.g. capfilt-captioner")
    p.add_argument("version", help="model version number")
    _add_params(p)
    p.set_defaults(func=_cmd_flows, flows_handler="promote")

    p = sub.add_parser("compare", help="two pipeline runs side by side (params, metrics, data)")
    p.add_argument("run_a", metavar="RUN_A", help="MLflow run id")
    p.add_argument("run_b", metavar="RUN_B", help="MLflow run id")
    _add_params(p)
    p.set_defaults(func=_cmd_flows, flows_handler="compare")

    p = sub.add_parser("reproduce", help="restore a run's code and datasets from git + DVC")
    p.add_argument("run_id", metavar="RUN_ID", help="MLflow run id of a pipeline run")
    p.add_argument("--out", required=True, help="new folder to restore into")
    _add_params(p)
    p.set_defaults(func=_cmd_flows, flows_handler="reproduce")

    p = sub.add_parser("stack", help="local services: moto (S3), MLflow server, Prefect server")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--home", default=".stack", help="state folder: logs, PID files (default: .stack)")
    p.add_argument("--service", action="append", choices=["moto", "mlflow", "prefect"],
                   help="start only these (repeatable; default: all)")
    p.set_defaults(func=_cmd_flows, flows_handler="stack")


def _add_params(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", default="params.yaml", help="parameters file (default: params.yaml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one parameter, e.g. --set synth.n_web=500 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capfilt",
        description="BLIP pre-training and CapFilt dataset bootstrapping as a versioned pipeline.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", help="draw the embedded synthetic corpus (deterministic from a seed)")
    p.add_argument("--out", default="data", help="output folder (default: data)")
    p.add_argument("--seed", type=int, default=None, help="overrides synth.seed")
    p.add_argument("--preview", default=None, help="also draw a PNG grid of samples here")
    _add_params(p)
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("ingest", help="image-text sources -> manifest + shards")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="annotation file, tar shard or folder of shards; local or s3://")
    p.add_argument("--out", required=True, help="output folder (replaced only on success)")
    p.add_argument("--format", default="auto",
                   choices=["auto", "coco", "karpathy", "blip", "webdataset", "csv", "parquet"])
    p.add_argument("--image-root", default=None,
                   help="folder image paths are relative to (default: the annotation file's)")
    p.add_argument("--kind", default="web", choices=["human", "web"], help="the rows' source")
    p.add_argument("--split", default="train", choices=["train", "val", "test"])
    p.add_argument("--image-column", default=None, help="csv/parquet image-path column")
    p.add_argument("--caption-column", default=None, help="csv/parquet caption column")
    p.add_argument("--workers", type=int, default=None, help="ingest.workers (0: all cores)")
    _add_params(p)
    p.set_defaults(func=_cmd_ingest)

    p = sub.add_parser("stage", help="run one pipeline stage from params.yaml (what dvc.yaml calls)")
    p.add_argument("name", help="stage name, e.g. ingest")
    _add_params(p)
    p.set_defaults(func=_cmd_stage)

    _add_orchestration(sub)
    add_model_commands(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so `finally` blocks and atexit handlers run:
    Python's default for SIGTERM ends the process at once and orphans its children."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated


def main(argv: list[str] | None = None) -> int:
    for key, value in _QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if sys.prefix != sys.base_prefix:  # DeepSpeed's JIT-built ops: `make setup` pre-builds them here
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    func: Callable[[argparse.Namespace], int] = args.func
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_terminated) if main_thread else None
    try:
        return func(args)
    except CapfiltError as exc:
        print(f"capfilt {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
        stopped = children.stop_all()  # those a worker thread started; the main thread's ended on the way
        how, code = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
        note = f" (stopped {stopped} child process(es) with their descendants)" if stopped else ""
        print(f"capfilt {args.command}: {how}{note}", file=sys.stderr)
        return code
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
