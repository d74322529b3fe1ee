"""Stage dispatch: `capfilt stage NAME` (what dvc.yaml calls) and `capfilt run`.

One literal table maps each stage name to the function that loads its params section and
calls the stage's `run`; go-to-definition answers what a stage runs.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from components.config import Params, load_params
from components.errors import CapfiltError

log = logging.getLogger(__name__)


def _ingest(params: Params) -> None:
    from components import ingest

    ingest.run_stage(params.ingest)


STAGES: dict[str, Callable[[Params], None]] = {
    "ingest": _ingest,
}


def run_stage(name: str, params_path: Path, overrides: list[str] | None = None) -> None:
    """Run one stage with the parameters in `params_path` (plus `section.key=value` overrides)."""
    if name not in STAGES:
        raise CapfiltError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
    params = load_params(params_path, overrides)
    log.info("stage %s", name)
    STAGES[name](params)


def run_pipeline(params_path: Path, force: bool = False) -> None:
    """Run every stage that is out of date through DVC (`dvc repro`)."""
    load_params(params_path)  # fail on bad params before DVC starts anything
    dvc = shutil.which("dvc")
    if dvc is None:
        raise CapfiltError("dvc not found on PATH; run `make setup` first")
    cmd = [dvc, "repro"] + (["--force"] if force else [])
    proc = subprocess.run(cmd, check=False)
    if proc.returncode != 0:
        raise CapfiltError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}")
