"""End to end: the real dvc.yaml of the project, on a shrunken corpus and tiny model, through the
flow with a real MLflow SQLite store. Every stage dvc.yaml declares whose inputs can exist runs
(a stage waiting for a stage not written yet is left out), gets a child run with metrics, and a
second run with nothing changed is all cached."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from flows.dvc_graph import StageSpec, read_stages
from flows.pipeline import pipeline
from flows.tracking import PARENT_TAG

from conftest import SHRINK

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def runnable(root: Path, stages: list[StageSpec]) -> list[str]:
    """Stages whose every dependency exists or is produced by an earlier runnable stage."""
    produced: list[str] = []
    names = []
    for spec in stages:
        ok = all((root / d).exists() or any(d == o or d.startswith(o + "/") for o in produced)
                 for d in spec.deps)
        if ok:
            names.append(spec.name)
            produced += list(spec.outs)
    return names


def _run_twice(root: Path, names: list[str], store: str) -> dict:
    first = pipeline(root=str(root), stages=names, overrides=SHRINK)
    assert [s["name"] for s in first["stages"]] == names
    assert {s["status"] for s in first["stages"]} == {"ran"}
    client = MlflowClient(store)
    run = client.get_run(first["parent_run_id"])
    kids = client.search_runs([run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{run.info.run_id}'")
    by_stage = {k.data.tags["stage"]: k for k in kids}
    for name in names:
        assert by_stage[name].data.metrics, f"stage {name} logged no metrics"
    ingest_files = {a.path for a in client.list_artifacts(by_stage["ingest"].info.run_id, "outputs/ingest/human")}
    assert "outputs/ingest/human/data_docs" in ingest_files

    # Nothing changed: every stage is reported cached (how fast is a benchmark's business).
    second = pipeline(root=str(root), stages=names)
    assert {s["status"] for s in second["stages"]} == {"cached"}
    kids = client.search_runs([run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{second['parent_run_id']}'")
    assert {k.data.tags["stage"] for k in kids if k.data.tags.get("cached") == "true"} == set(names)
    return first


def test_every_stage_runs_is_tracked_then_cached(mini_project: Path, mlflow_store: str):
    names = runnable(mini_project, read_stages(mini_project))
    assert names[0] == "ingest"
    assert {"pretrain", "bootstrap", "retrain", "evaluate"} <= {n.split("@")[0] for n in names}
    first = _run_twice(mini_project, names, mlflow_store)
    # The promote step registered the models and gave the first versions the champion alias.
    client = MlflowClient(mlflow_store)
    for model in ("capfilt-captioner", "capfilt-filter", "capfilt-blip"):
        assert client.search_model_versions(f"name = '{model}'"), f"{model} not registered"
        assert client.get_model_version_by_alias(model, "champion").version
    assert first["promotions"]
