"""Command handlers that need Prefect or MLflow: run, schedule, promote, compare, reproduce, stack.

`components/cli.py` never imports Prefect (the layering rule); it loads this module by name
only when one of these commands runs. Each handler sets the quiet environment and the project's
`PREFECT_HOME` before anything imports Prefect, then calls one function of the flows package
and prints its result. Progress of a running pipeline goes to stderr through the
`flows.progress` logger, which has its own handler because Prefect's logging setup raises the
root logger to WARNING.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

from components.errors import CapfiltError
from flows.settings import prefect_env

INFRA_STACK = Path(__file__).resolve().parents[1] / "infra" / "stack.py"


# Prefect's console handlers print every INFO line of every run (stage output included) on top
# of the progress lines; they stay in the Prefect UI/API, the terminal shows warnings only.
_CONSOLE_QUIET = {f"PREFECT_LOGGING_HANDLERS_{h}_LEVEL": "WARNING"
                  for h in ("CONSOLE", "CONSOLE_FLOW_RUNS", "CONSOLE_TASK_RUNS")}


def _not_prefect(record: logging.LogRecord) -> bool:
    return not record.name.startswith("prefect")


def _progress_to_stderr(verbose: bool) -> None:
    if not verbose:
        for key, value in _CONSOLE_QUIET.items():
            os.environ.setdefault(key, value)
        for handler in logging.getLogger().handlers:  # the CLI's own handler: library INFO lines off
            handler.setLevel(max(handler.level, logging.WARNING))
            handler.addFilter(_not_prefect)  # a failed run's traceback: the CLI prints the error once
    logger = logging.getLogger("flows.progress")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s  %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def run(args: argparse.Namespace) -> int:
    """`capfilt run`: the pipeline flow (or plain `dvc repro` with --no-prefect), then a summary."""
    root = Path.cwd()
    if args.no_prefect:
        from components import stages

        if args.set or args.stage or args.dry_run:
            raise CapfiltError("--no-prefect runs plain `dvc repro`; --set, --stage and --dry-run need the flow")

        stages.run_pipeline(Path(args.params), force=args.force)
        return 0
    prefect_env(root)
    _progress_to_stderr(getattr(args, "verbose", False))
    from components.config import load_params
    from flows import dvc_graph, summary
    from flows.pipeline import pipeline

    params = load_params(Path(args.params), args.set)  # bad input fails here, before Prefect starts
    dvc_graph.select(dvc_graph.read_stages(root), args.stage or params.pipeline.stages)
    name = params.pipeline.flow_name
    result = pipeline.with_options(name=name)(stages=args.stage or None, overrides=args.set,
                                               force=args.force, dry_run=args.dry_run,
                                               root=str(root), params_file=args.params)
    print(summary.text(result))
    return 0


def schedule(args: argparse.Namespace) -> int:
    """`capfilt schedule --cron ...`: serve the flow as a deployment with that cron (blocks)."""
    root = Path.cwd()
    prefect_env(root)
    from flows import schedule as sched

    sched.serve(cron=args.cron, name=args.name, root=root, params_file=args.params,
                stages=args.stage, overrides=args.set, timezone=args.timezone, dry_run=args.dry_run)
    return 0


def promote(args: argparse.Namespace) -> int:
    """`capfilt promote MODEL VERSION`: move `champion` by hand."""
    root = Path.cwd()
    prefect_env(root)
    from components.config import load_params
    from flows import registry, tracking

    tracking.configure(root, load_params(Path(args.params)).tracking)
    print(registry.promote_version(args.model, args.version))
    return 0


def compare(args: argparse.Namespace) -> int:
    """`capfilt compare RUN_A RUN_B`: params that differ, headline metrics, data versions."""
    root = Path.cwd()
    prefect_env(root)
    from components.config import load_params
    from flows import compare as cmp
    from flows import tracking

    tracking.configure(root, load_params(Path(args.params)).tracking)
    print(cmp.format_comparison(cmp.compare(args.run_a, args.run_b)))
    return 0


def reproduce(args: argparse.Namespace) -> int:
    """`capfilt reproduce RUN_ID --out DIR`: that run's code and datasets, from git + DVC."""
    root = Path.cwd()
    prefect_env(root)
    from components.config import load_params
    from flows import reproduce as rep
    from flows import tracking

    tracking.configure(root, load_params(Path(args.params)).tracking)
    result = rep.reproduce(args.run_id, Path(args.out), root)
    print(f"run {args.run_id}: commit {result['commit'][:12]} restored into {result['out']}")
    for path in result["restored"]:
        print(f"  {path}")
    return 0


def load_stack() -> ModuleType:
    """infra/stack.py (not an installed package: it belongs to the checkout)."""
    if not INFRA_STACK.is_file():
        raise CapfiltError(f"{INFRA_STACK}: not found; `capfilt stack` runs from a source checkout")
    spec = importlib.util.spec_from_file_location("capfilt_infra_stack", INFRA_STACK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def stack(args: argparse.Namespace) -> int:
    """`capfilt stack up|down|status`: the local moto + MLflow + Prefect servers."""
    module = load_stack()
    home = Path(args.home)
    if args.action == "up":
        info = module.up(home, services=tuple(args.service or module.SERVICES))
        print(json.dumps(info, indent=2))
        print("\n".join(f"export {k}={v}" for k, v in module.client_env(info).items()))
    elif args.action == "down":
        for line in module.down(home):
            print(line)
    else:
        info = module.status(home)
        print(json.dumps(info, indent=2))
        if not info:
            print(f"no local services were started from {home} (`capfilt stack up` starts them)", file=sys.stderr)
        for name, s in info.items():
            if not s["running"]:
                print(f"{name}: pid {s['pid']} is not running (see {module.log_path(home, name)}); "
                      "`capfilt stack down` clears it", file=sys.stderr)
    return 0
