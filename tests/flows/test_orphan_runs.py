"""A SIGKILLed pipeline leaves its MLflow runs RUNNING; the next run on the host ends them."""

import subprocess
import sys

import mlflow
from mlflow.tracking import MlflowClient

from flows import tracking


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_close_orphans_ends_runs_of_dead_processes_only(tmp_path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    exp = client.create_experiment("orphans", artifact_location=str(tmp_path / "artifacts"))
    host = tracking.owner_tags()[tracking.HOST_TAG]
    dead = tracking.start_run(exp, "pipeline", {tracking.HOST_TAG: host, tracking.PID_TAG: str(_dead_pid())})
    child = tracking.start_run(exp, "pretrain", {}, parent=dead)
    live = tracking.start_run(exp, "pipeline", tracking.owner_tags())
    elsewhere = tracking.start_run(exp, "pipeline", {tracking.HOST_TAG: host + "-other", tracking.PID_TAG: "1"})
    finished = tracking.start_run(exp, "pipeline", {tracking.HOST_TAG: host, tracking.PID_TAG: str(_dead_pid())})
    tracking.end_run(finished, True)

    ended = tracking.close_orphans(exp)

    assert sorted(ended) == sorted([dead, child])
    status = {r: client.get_run(r).info.status for r in (dead, child, live, elsewhere, finished)}
    assert status == {dead: "KILLED", child: "KILLED", live: "RUNNING", elsewhere: "RUNNING",
                      finished: "FINISHED"}
    assert tracking.close_orphans(exp) == []  # idempotent
