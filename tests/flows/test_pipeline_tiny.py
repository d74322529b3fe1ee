"""The pipeline flow on a two-stage DVC pipeline: tasks per stage, MLflow parent + child runs,
cached stages, overrides written reproducibly, retries, failures with the stage's error."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from components.errors import CapfiltError
from flows.pipeline import pipeline
from flows.tracking import PARENT_TAG

pytestmark = pytest.mark.slow


def _children(client: MlflowClient, parent: str) -> dict[str, object]:
    run = client.get_run(parent)
    found = client.search_runs([run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{parent}'")
    return {r.info.run_name: r for r in found}


def test_stages_run_then_are_cached_and_tracked(tiny_project: Path, mlflow_store: str):
    first = pipeline(root=str(tiny_project))
    assert [(s["name"], s["status"]) for s in first["stages"]] == [("count", "ran"), ("report", "ran")]
    client = MlflowClient(mlflow_store)
    parent = client.get_run(first["parent_run_id"])
    assert parent.info.status == "FINISHED"
    tags = parent.data.tags
    assert len(tags["git_commit"]) == 40 and len(tags["dvc_lock_sha256"]) == 64
    assert tags["data_md5"].endswith(".dir") and tags["prefect_flow_run_id"]
    kids = _children(client, first["parent_run_id"])
    count = kids["count"]
    assert count.data.metrics["words"] == 3 and count.data.metrics["nested.seed"] == 0
    assert "nested.flag" not in count.data.metrics  # booleans are not metrics
    assert count.data.params["synth.seed"] == "0" and count.data.tags["cached"] == "false"
    assert [m.step for m in client.get_metric_history(count.info.run_id, "loss")] == [1, 2]
    files = {a.path for a in client.list_artifacts(kids["report"].info.run_id, "outputs/report")}
    assert files == {"outputs/report/report.html", "outputs/report/plot.png"}
    assert first["kept"] == {"count.kept_fraction": 0.5}
    assert first["reports"] == ["outputs/report/report.html"]

    started = time.monotonic()
    second = pipeline(root=str(tiny_project))
    assert time.monotonic() - started < 30
    assert {s["status"] for s in second["stages"]} == {"cached"}
    kids = _children(client, second["parent_run_id"])
    assert kids["count"].data.tags["cached"] == "true" and kids["count"].data.metrics["words"] == 3


def test_overrides_are_written_to_params_and_recorded(tiny_project: Path, mlflow_store: str):
    pipeline(root=str(tiny_project), stages=["count"])
    result = pipeline(root=str(tiny_project), overrides=["synth.seed=7"])
    assert [s["status"] for s in result["stages"]] == ["ran", "ran"]
    text = (tiny_project / "params.yaml").read_text()
    assert "seed: 7" in text and "# the stages' parameter" in text  # comments kept, like dvc exp run -S
    assert (tiny_project / "outputs/count/result.txt").read_text() == "3 words, seed 7\n"
    run = MlflowClient(mlflow_store).get_run(result["parent_run_id"])
    assert run.data.params["override.synth.seed"] == "7"
    with pytest.raises(CapfiltError, match="synth.seedd: unknown key"):
        pipeline(root=str(tiny_project), overrides=["synth.seedd=1"])


def test_a_stage_is_retried_then_a_failure_fails_the_flow(tiny_project: Path, mlflow_store: str):
    flaky = "import pathlib, sys\nm = pathlib.Path('attempted')\n" \
            "if not m.exists():\n    m.write_text('1'); sys.exit('transient failure')\n"
    script = tiny_project / "count.py"
    script.write_text(flaky + script.read_text())
    result = pipeline(root=str(tiny_project), overrides=["pipeline.retries=1"])
    assert result["stages"][0]["status"] == "ran"  # the second attempt succeeded

    script.write_text("import sys\nsys.exit('the corpus is broken: row 3')\n")
    with pytest.raises(CapfiltError, match="(?s)stage count failed.*the corpus is broken: row 3"):
        pipeline(root=str(tiny_project), overrides=["pipeline.retries=0"])


def test_unknown_stage_is_named(tiny_project: Path, mlflow_store: str):
    with pytest.raises(CapfiltError, match="unknown stage.*nope.*count, report"):
        pipeline(root=str(tiny_project), stages=["nope"])


def test_capfilt_run_prints_the_summary(tiny_project: Path, mlflow_store: str, monkeypatch, capsys):
    from components import cli

    monkeypatch.chdir(tiny_project)
    assert cli.main(["run", "--dry-run"]) == 0
    assert "count" in capsys.readouterr().out and not (tiny_project / "outputs").exists()
    assert cli.main(["run"]) == 0
    out = capsys.readouterr().out
    assert "count" in out and "ran" in out and "report: outputs/report/report.html" in out
    assert "MLflow UI:  mlflow ui --backend-store-uri" in out
    assert cli.main(["run", "--no-prefect", "--stage", "count"]) == 2
    assert "--no-prefect runs plain" in capsys.readouterr().err
