"""Fast unit tests of the flow helpers: stage order and selection, flattening, metrics and curves,
credential filtering, the summary text, and the bounded failure on an unreachable server."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from components.config import TrackingConfig
from components.errors import CapfiltError
from flows import summary, tracking
from flows.dvc_graph import StageSpec, _toposort, select


def _spec(name: str, upstream: tuple[str, ...] = (), cmd: str = "") -> StageSpec:
    return StageSpec(name, cmd or f"capfilt stage {name.replace('@', '-')}", (), (), (), (), (), upstream)


def test_toposort_puts_upstream_first_and_detects_cycles():
    specs = {"b": _spec("b", ("a",)), "a": _spec("a"), "c": _spec("c", ("b", "a"))}
    assert [s.name for s in _toposort(specs, ["c", "b", "a"])] == ["a", "b", "c"]
    with pytest.raises(CapfiltError, match="cycle"):
        _toposort({"x": _spec("x", ("y",)), "y": _spec("y", ("x",))}, ["x", "y"])


def test_select_accepts_dvc_and_capfilt_names_in_dag_order():
    stages = [_spec("ingest"), _spec("finetune@captioner", ("ingest",))]
    assert [s.name for s in select(stages, ["finetune-captioner", "ingest"])] == ["ingest", "finetune@captioner"]
    assert select(stages, []) == stages
    with pytest.raises(CapfiltError, match="unknown stage.*bogus.*ingest, finetune@captioner"):
        select(stages, ["bogus"])


def test_stage_params_are_flattened_and_credentials_dropped():
    resolved = {"train": {"lr": 0.1, "sched": {"steps": 3}, "tags": [1, 2]},
                "storage": {"access_key_id": "AKIA", "secret": "x", "bucket": "b"}}
    params = tracking.stage_params(resolved, ("train", "storage", "missing.key"))
    assert params == {"train.lr": "0.1", "train.sched.steps": "3", "train.tags": "[1, 2]", "storage.bucket": "b"}


def test_numeric_leaves_and_curves(tmp_path: Path):
    got = tracking.numeric_leaves({"a": 1, "b": {"c": 2.5, "ok": True, "nan": float("nan"), "s": "x"}})
    assert got == {"a": 1.0, "b.c": 2.5}
    csv = tmp_path / "loss.csv"
    csv.write_text("step,loss,loss_itc,lr\n10,2.0,nan,0.001\n20,1.5,0.7,0.0009\n")
    assert tracking.read_curves(csv) == [(10, {"loss": 2.0, "lr": 0.001}),
                                         (20, {"loss": 1.5, "loss_itc": 0.7, "lr": 0.0009})]
    csv.write_text("round,cider\nround1,2\n")
    assert tracking.read_curves(csv) == []  # not a curve over steps
    csv.write_text("step,loss\nten,2\n")
    with pytest.raises(CapfiltError, match="step"):
        tracking.read_curves(csv)


def test_summary_renders_rounds_kept_and_links(tmp_path: Path):
    metrics = tmp_path / "metrics.json"
    metrics.write_text('{"round1": {"cider": 0.5}, "round2": {"cider": 0.75}, "gain": {"cider": 0.25}}')
    result = {"status": "completed", "stages": [{"name": "ingest", "status": "cached", "seconds": 0.0}],
              "rounds": summary.round_table(metrics), "kept": {"bootstrap.kept_fraction": 0.4},
              "reports": ["outputs/evaluate/report.html"], "data_docs": [], "promotions": [],
              "parent_run_id": "abc", "mlflow_link": "http://x/#/r", "ui_command": "mlflow ui"}
    text = summary.text(result)
    assert "ingest" in text and "cider: 0.5 -> 0.75 (gain 0.25)" in text
    assert "report: outputs/evaluate/report.html" in text and "MLflow UI:  mlflow ui" in text
    md = summary.markdown(result)
    assert "| cider | 0.5 | 0.75 | 0.25 | - | - |" in md and "bootstrap.kept_fraction: 0.4" in md
    metrics.write_text('{"round1": {"cider": 0.5}, "round2": {"cider": 0.75}, "gain": {"cider": 0.25}, '
                       '"gain_interval": {"confidence": 0.95, "resamples": 10, "metrics": '
                       '{"cider": {"gain": 0.25, "low": -0.02, "high": 0.5, "above_zero": 0.9}}}}')
    result["rounds"] = summary.round_table(metrics)
    assert "cider: 0.5 -> 0.75 (gain 0.25, interval [-0.020, +0.500])" in summary.text(result)
    assert "| cider | 0.5 | 0.75 | 0.25 | [-0.020, +0.500] | - |" in summary.markdown(result)
    data = json.loads(metrics.read_text())  # with the draws stage: the mean gain over training draws
    data["draws"] = {"summary": {"cider": {"mean": 0.2, "low": -0.1, "high": 0.5, "sd": 0.1, "n": 3, "up": 2}}}
    metrics.write_text(json.dumps(data))
    result["rounds"] = summary.round_table(metrics)
    assert ("cider: 0.5 -> 0.75 (gain 0.25, interval [-0.020, +0.500]; over training draws "
            "+0.200 [-0.100, +0.500], up in 2 of 3)") in summary.text(result)
    assert "| [-0.020, +0.500] | +0.200 [-0.100, +0.500], up in 2 of 3 |" in summary.markdown(result)


def test_unreachable_tracking_server_fails_fast_naming_it(tmp_path: Path, monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    with pytest.raises(CapfiltError, match=f"127.0.0.1:{port}/health is unreachable"):
        tracking.configure(tmp_path, TrackingConfig(timeout_seconds=1.0))
    assert time.monotonic() - started < 5


def test_find_reports_lists_html_reports_and_data_docs_front_pages(tmp_path: Path):
    for rel in ("out/a/report.html", "out/a/data_docs/index.html", "out/a/data_docs/validations/x.html",
                "out/b/expectations/data_docs/local_site/index.html", "single.html"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("<html/>")
    found = summary.find_reports(tmp_path, ["out", "single.html", "missing"])
    assert found == {"reports": ["out/a/report.html", "single.html"],
                     "data_docs": ["out/a/data_docs/index.html", "out/b/expectations/data_docs/local_site/index.html"]}
