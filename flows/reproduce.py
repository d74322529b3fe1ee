"""`capfilt reproduce RUN_ID --out DIR`: a past run's code and datasets, restored from git + DVC.

The pipeline run recorded its git commit, and logged its `dvc.lock` and `data.dvc` as artifacts
(their sha256 as a tag), which pin every dataset and model it produced. Reproducing clones the
project at that commit into DIR (a new repository; the project's own checkout is never touched),
puts the run's `dvc.lock` and `data.dvc` in place, points DIR's DVC cache at the project's cache
(and copies its local remote settings), and runs `dvc checkout`; objects missing from the cache
are fetched from the DVC remote with `dvc pull`. The result is bit for bit what that run had.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from components.errors import CapfiltError
from flows import dvc_graph

log = logging.getLogger(__name__)

PINS = ("dvc.lock", "data.dvc")


def _git(args: list[str], cwd: Path) -> str:
    git = shutil.which("git")
    if git is None:
        raise CapfiltError("git not found on PATH")
    proc = subprocess.run([git, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise CapfiltError(f"`git {' '.join(args)}` failed: {proc.stderr.strip()[-1000:]}")
    return proc.stdout


def run_pins(run_id: str, dest: Path) -> tuple[dict[str, Any], Path]:
    """Download the run's dvc.lock / data.dvc under `dest`; returns (the run's tags, their folder)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise CapfiltError(f"no MLflow run {run_id!r}") from None
    tags = dict(run.data.tags)
    if not tags.get("git_commit"):
        raise CapfiltError(f"run {run_id} has no git_commit tag; was it a `capfilt run` pipeline run?")
    if not client.list_artifacts(run_id, "dvc"):
        raise CapfiltError(f"run {run_id} logged no dvc/dvc.lock artifact; was it a `capfilt run` pipeline run?")
    return tags, Path(client.download_artifacts(run_id, "dvc", str(dest)))


def _prepare_clone(root: Path, out: Path, commit: str) -> None:
    _git(["clone", "--quiet", "--no-checkout", str(root.resolve()), str(out)], cwd=root)
    _git(["-c", "advice.detachedHead=false", "checkout", "--quiet", commit], cwd=out)
    local = root / ".dvc" / "config.local"  # remote credentials/endpoint kept out of git
    if local.is_file():
        shutil.copy2(local, out / ".dvc" / "config.local")
    cache = root / ".dvc" / "cache"
    dvc_graph.run_dvc(out, ["config", "--local", "cache.dir", str(cache.resolve())])


def reproduce(run_id: str, out: Path, root: Path) -> dict[str, Any]:
    """Restore run `run_id` into the new folder `out`; returns {commit, out, restored}."""
    if out.exists() and any(out.iterdir()):
        raise CapfiltError(f"{out}: exists and is not empty; choose a new folder")
    with tempfile.TemporaryDirectory(prefix="capfilt-pins-") as tmp:
        tags, pins = run_pins(run_id, Path(tmp))
        commit = tags["git_commit"]
        expected = tags.get("dvc_lock_sha256", "")
        if expected and dvc_graph.file_sha256(pins / "dvc.lock") != expected:
            raise CapfiltError(f"run {run_id}: its logged dvc.lock does not match the recorded sha256")
        _prepare_clone(root, out, commit)
        for name in PINS:
            if (pins / name).is_file():
                shutil.copy2(pins / name, out / name)
    if tags.get("git_dirty") == "true":
        log.warning("run %s ran with uncommitted changes; code is restored from commit %s", run_id, commit)
    try:
        dvc_graph.run_dvc(out, ["checkout", "--quiet"])
    except CapfiltError as exc:
        log.info("cache incomplete (%s); pulling from the DVC remote", str(exc).splitlines()[0])
        dvc_graph.run_dvc(out, ["pull", "--quiet"])
    restored = [spec_out for spec in dvc_graph.read_stages(out) for spec_out in spec.outs]
    data = [p for p in ("data",) if (out / p).exists()]
    return {"commit": commit, "out": str(out), "restored": data + [p for p in restored if (out / p).exists()]}
