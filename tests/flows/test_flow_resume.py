"""A pipeline killed mid-stage runs again: `capfilt run` on the shrunken project is SIGKILLed (its
whole process group: the flow, DVC, the stage, Prefect's server) once pre-training has published a
resume checkpoint; the next `capfilt run` succeeds, pre-training continues from that checkpoint,
and its outputs are complete."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from components.checkpoints import latest_tag

from conftest import BIN, SHRINK, sh

pytestmark = [pytest.mark.slow, pytest.mark.integration]

STEPS = 60  # enough steps that the kill lands inside pre-training, not after it
STAGES = ["--stage", "ingest", "--stage", "pretrain"]
OVERRIDES = [s for s in SHRINK if not s.startswith("pretrain.schedule.steps=")] + [
    f"pretrain.schedule.steps={STEPS}", "train.checkpoint_every=3"]


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def _kill_at_first_checkpoint(root: Path, log: Path, timeout: float = 600.0) -> int:
    """Start the flow in its own process group, SIGKILL the group once pre-training has published
    a checkpoint; returns that checkpoint's step. No process of the group outlives the call."""
    resume = root / "outputs/resume/pretrain"
    args = [str(BIN / "capfilt"), "run", *STAGES] + [f"--set={o}" for o in OVERRIDES]
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=root, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        tag = None
        while tag is None and proc.poll() is None and time.monotonic() < deadline:
            tag = latest_tag(resume) if resume.is_dir() else None
            time.sleep(0.05)
        family = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, f"still running after the kill: {[p.pid for p in alive]}"
    assert tag is not None, f"no checkpoint before the flow ended (exit {proc.returncode}):\n{log.read_text()[-3000:]}"
    assert not (root / "outputs/pretrain/metrics.json").exists(), "pre-training finished before the kill"
    return int(tag.removeprefix("step"))


def test_killed_flow_resumes_pretraining_on_the_next_run(mini_project: Path, mlflow_store: str, tmp_path: Path):
    killed_at = _kill_at_first_checkpoint(mini_project, tmp_path / "first.log")
    assert 0 < killed_at < STEPS

    again = sh([str(BIN / "capfilt"), "run", *STAGES], mini_project, timeout=900)  # params.yaml kept the overrides
    rows = [line.split() for line in again.stdout.splitlines()]
    status = {r[0]: r[1] for r in rows if r and r[0] in ("ingest", "pretrain")}  # the stage table
    assert status == {"ingest": "cached", "pretrain": "ran"}, again.stdout

    out = mini_project / "outputs/pretrain"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == STEPS
    assert killed_at <= metrics["resumed_from_step"] < STEPS  # continued, not restarted
    logged = [int(line.split(",")[0]) for line in (out / "loss.csv").read_text().splitlines()[1:]]
    assert logged == list(range(1, STEPS + 1))  # the killed run's curve is carried over
    assert (out / "model/config.json").is_file() and (out / "model/model.safetensors").is_file()
    assert not (mini_project / "outputs/resume/pretrain").exists()  # a finished stage drops its checkpoints
    assert "pretrain" in (mini_project / "dvc.lock").read_text()

    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(mlflow_store)
    runs = MlflowClient().search_runs(
        [e.experiment_id for e in MlflowClient().search_experiments()], max_results=100)
    by_status = sorted((r.data.tags.get("mlflow.runName", ""), r.info.status) for r in runs)
    assert ("pipeline", "KILLED") in by_status and ("pipeline", "FINISHED") in by_status, by_status
    assert all(status != "RUNNING" for _, status in by_status), by_status  # the killed run was closed
