"""Stage dispatch: `capfilt stage NAME` (what dvc.yaml calls) and `capfilt run`.

One literal table maps each stage name to the function that loads its params section and
calls the stage's `run`; go-to-definition answers what a stage runs.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from components import children
from components.config import Params, load_params
from components.errors import CapfiltError

log = logging.getLogger(__name__)


def _ingest(params: Params) -> None:
    from components import ingest_stage

    ingest_stage.run(params.ingest, params.validation)


def _pretrain(params: Params) -> None:
    from components import train_stages

    train_stages.run_pretrain(params)


def _finetune(task: str, round_: int) -> Callable[[Params], None]:
    def run(params: Params) -> None:
        from components import train_stages

        train_stages.run_finetune(params, task, round_)

    return run


def _retrain(params: Params) -> None:
    from components import train_stages

    train_stages.run_retrain(params)


def _bootstrap(params: Params) -> None:
    from components import bootstrap

    bootstrap.run(params.bootstrap, params.validation)


def _rounds(params: Params) -> None:
    from components import rounds

    rounds.run(params)


def _ablation(params: Params) -> None:
    from components import ablation

    ablation.run(params)


def _draws(params: Params) -> None:
    from components import draws

    draws.run(params)


def _evaluate(params: Params) -> None:
    from components import evaluate

    evaluate.run(params.evaluate)


# Training stages run as `train.processes` ranks through the deepspeed launcher when > 1.
TRAINING_STAGES = ("pretrain", "finetune-captioner", "finetune-filter", "retrain",
                   "finetune2-captioner", "finetune2-filter")

# bootstrap inference shards its web shards over the same ranks (rank 0 merges)
RANKED_STAGES = (*TRAINING_STAGES, "bootstrap")

STAGES: dict[str, Callable[[Params], None]] = {
    "ingest": _ingest,
    "pretrain": _pretrain,
    "finetune-captioner": _finetune("captioner", 1),
    "finetune-filter": _finetune("filter", 1),
    "retrain": _retrain,
    "finetune2-captioner": _finetune("captioner", 2),
    "finetune2-filter": _finetune("filter", 2),
    "bootstrap": _bootstrap,
    "rounds": _rounds,  # bootstrap.rounds > 1: rounds 3.. as subprocess chains of the stages above
    "ablation": _ablation,  # evaluate.ablation: the captioner-only and filter-only corpora, likewise
    "draws": _draws,  # evaluate.draws: both rounds re-trained at other seeds, likewise
    "evaluate": _evaluate,
}


def run_stage(name: str, params_path: Path, overrides: list[str] | None = None) -> None:
    """Run one stage with the parameters in `params_path` (plus `section.key=value` overrides)."""
    if name not in STAGES:
        raise CapfiltError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    params = load_params(params_path, overrides)
    if name in RANKED_STAGES and params.train.processes > 1:
        from components import distributed

        if not distributed.is_launched_rank():  # start the ranks, each re-running this stage
            argv = ["stage", name, "--params", str(params_path)]
            argv += [a for item in overrides or [] for a in ("--set", item)]
            distributed.launch_ranks(params.train.processes, argv, params.train.hostfile)
            return
    log.info("stage %s", name)
    STAGES[name](params)


def run_pipeline(params_path: Path, force: bool = False) -> None:
    """Run every stage that is out of date through DVC (`dvc repro`)."""
    load_params(params_path)  # fail on bad params before DVC starts anything
    dvc = shutil.which("dvc")
    if dvc is None:
        raise CapfiltError("dvc not found on PATH; run `make setup` first")
    cmd = [dvc, "repro"] + (["--force"] if force else [])
    proc = children.run(cmd)
    if proc.returncode != 0:
        raise CapfiltError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}")
