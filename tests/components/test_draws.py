"""The draws stage without training: the seeds, the chains' `--set` overrides and params, the
disabled default, the gain over draws (mean and t-interval) and its report table and plot."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from components import chain, draws, evaluate, report
from components.config import EvaluateConfig, Params, load_params
from components.errors import CapfiltError
from components.significance import mean_interval


@pytest.fixture
def params(tmp_path) -> Params:
    """Params whose round-1 and round-2 inputs are small files under tmp_path (the chain hashes them)."""
    files = {}
    for name in ("human.parquet", "web.parquet", "boot.parquet", "tok"):
        files[name] = tmp_path / "in" / name
        files[name].parent.mkdir(exist_ok=True)
        files[name].write_text(name)
    return Params.model_validate({
        "train": {"seed": 5},
        "pretrain": {"manifests": [str(files["human.parquet"]), str(files["web.parquet"])],
                     "tokenizer": str(files["tok"])},
        "retrain": {"manifests": [str(files["boot.parquet"])], "tokenizer": str(files["tok"])},
        "finetune": {"manifest": str(files["human.parquet"]), "resume_dir": str(tmp_path / "resume")},
        "evaluate": {"draws": 2, "draws_out": str(tmp_path / "draws")},
    })


def _record_stages(monkeypatch) -> list[list[str]]:
    argv: list[list[str]] = []
    monkeypatch.setattr(chain.children, "run", lambda a: argv.append(a) or type("P", (), {"returncode": 0}))
    return argv


def test_a_draw_trains_both_rounds_at_its_seed_on_the_run_s_corpora(params, tmp_path, monkeypatch):
    assert draws.draw_seeds(params) == [6, 7]
    argv = _record_stages(monkeypatch)
    models = draws.train_draw(params, 7)
    assert [a[4] for a in argv] == ["pretrain", "finetune-captioner", "finetune-filter",
                                    "retrain", "finetune2-captioner", "finetune2-filter"]
    root = tmp_path / "draws" / "chains" / "seed7"
    loaded = [load_params(Path(a[6]), a[8::2]) for a in argv]
    assert all(p.train.seed == 7 for p in loaded)  # the draw's seed, in the chain's params.yaml
    assert all(p.model == params.model and p.finetune.captioner == params.finetune.captioner for p in loaded)
    pre, tune1, _, re, tune2, _ = loaded
    assert Path(argv[0][6]) == root / "round1" / "params.yaml"
    assert pre.pretrain.manifests == params.pretrain.manifests  # round 1: the run's noisy corpus
    assert (pre.pretrain.out, pre.pretrain.resume_dir) == (str(root / "round1/pretrain"),
                                                          str(tmp_path / "resume/draws/seed7/round1/pretrain"))
    assert tune1.finetune.round1_init == str(root / "round1/pretrain/model")
    assert tune1.finetune.round1_out == str(root / "round1/finetune")
    assert re.retrain.manifests == params.retrain.manifests  # round 2: the run's bootstrapped corpus
    assert re.retrain.out == str(root / "round2/retrain")
    assert tune2.finetune.round2_init == str(root / "round2/retrain/model")
    assert models == {"round1": (root / "round1/finetune/captioner/model", root / "round1/finetune/filter/model"),
                      "round2": (root / "round2/finetune/captioner/model", root / "round2/finetune/filter/model")}
    assert load_params(root / "round1" / "params.yaml").train.seed == 7
    assert params.train.seed == 5  # the caller's params are untouched


def test_a_finished_draw_is_skipped_and_a_changed_corpus_starts_it_afresh(params, tmp_path, monkeypatch):
    argv = _record_stages(monkeypatch)
    root = tmp_path / "draws" / "chains" / "seed6"
    for model in ("round1/pretrain/model", "round1/finetune/captioner/model", "round1/finetune/filter/model",
                  "round2/retrain/model", "round2/finetune/captioner/model", "round2/finetune/filter/model"):
        (root / model).mkdir(parents=True)
        (root / model / "config.json").write_text("{}")
    draws.train_draw(params, 6)
    assert argv == []  # everything was there and the inputs are the same
    Path(params.retrain.manifests[0]).write_text("another bootstrap")
    draws.train_draw(params, 6)
    assert [a[4] for a in argv] == ["retrain", "finetune2-captioner", "finetune2-filter"]  # round 1 kept
    assert (root / "round1/pretrain/model/config.json").is_file() and not (root / "round2/retrain").exists()
    argv.clear()
    other = params.model_copy(update={"retrain": params.retrain.model_copy(update={"itc_positives": "image"})})
    draws.train_draw(other, 6)  # a round-2 setting: round 2's chain starts afresh, round 1's is kept
    assert [a[4] for a in argv] == ["retrain", "finetune2-captioner", "finetune2-filter"]
    argv.clear()
    other = params.model_copy(update={"train": params.train.model_copy(update={"micro_batch": 3})})
    draws.train_draw(other, 6)  # a setting of both rounds: both start afresh
    assert [a[4] for a in argv][:3] == ["pretrain", "finetune-captioner", "finetune-filter"]


def test_draws_zero_writes_its_flag_and_trains_nothing(params, monkeypatch):
    argv = _record_stages(monkeypatch)
    off = params.model_copy(update={"evaluate": params.evaluate.model_copy(update={"draws": 0})})
    off_metrics = {"enabled": False, "n_draws": 0, "seeds": []}  # n_draws: a number for MLflow to log
    assert draws.run(off) == off_metrics
    out = Path(params.evaluate.draws_out)
    assert json.loads((out / "metrics.json").read_text()) == off_metrics
    assert argv == [] and list((out / "chains").iterdir()) == []


def test_draws_must_not_be_negative(tmp_path):
    (tmp_path / "p.yaml").write_text("evaluate:\n  draws: -1\n")
    with pytest.raises(CapfiltError, match="evaluate.draws"):
        load_params(tmp_path / "p.yaml")


def test_mean_interval_is_the_student_t_interval():
    got = mean_interval([1.0, 2.0, 3.0], 0.95)
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2 dof) * sd 1 / sqrt(3)
    assert got["mean"] == pytest.approx(2.0) and got["sd"] == pytest.approx(1.0)
    assert (got["low"], got["high"]) == (pytest.approx(2 - half), pytest.approx(2 + half))
    assert (got["n"], got["up"]) == (3, 3)
    narrower = mean_interval([1.0, 2.0, 3.0], 0.5)
    assert got["low"] < narrower["low"] < 2 < narrower["high"] < got["high"]
    same = mean_interval([-0.5, -0.5], 0.95)
    assert (same["low"], same["high"], same["up"]) == (-0.5, -0.5, 0)
    for bad in ([1.0], [1.0, float("nan")]):
        with pytest.raises(CapfiltError, match="at least 2 finite values"):
            mean_interval(bad, 0.95)


def _round(**values: float) -> dict[str, float | None]:
    return {k: values.get(k, 0.5) for k in evaluate.HEADLINE}


def test_evaluate_pairs_each_draw_s_rounds_and_summarises_the_gain(tmp_path):
    out = tmp_path / "draws"
    cfg = EvaluateConfig(draws=2, draws_out=str(out))
    metrics = {"round1": _round(cider=1.0, attribute_accuracy=0.90),
               "round2": _round(cider=1.3, attribute_accuracy=0.88)}
    with pytest.raises(CapfiltError, match="run the draws stage"):
        evaluate.draw_gains(cfg, metrics)
    out.mkdir()
    stage = {"enabled": True, "run_seed": 0, "seeds": [1, 2], "draws": {
        "seed1": {"round1": _round(cider=1.1, attribute_accuracy=0.85), "round2": _round(cider=1.2, attribute_accuracy=0.90)},
        "seed2": {"round1": _round(cider=0.9, attribute_accuracy=0.90, bleu4=None),
                  "round2": _round(cider=1.4, attribute_accuracy=0.93)}}}
    (out / "metrics.json").write_text(json.dumps(stage))
    with pytest.raises(CapfiltError, match="no results for 3 draws"):  # the stage ran with another N
        evaluate.draw_gains(cfg.model_copy(update={"draws": 3}), metrics)
    got = evaluate.draw_gains(cfg, metrics)
    assert got["run"] == "seed0" and list(got["draws"]) == ["seed0", "seed1", "seed2"]
    assert got["draws"]["seed0"]["round2"] == metrics["round2"]
    assert got["draws"]["seed2"]["gain"]["cider"] == pytest.approx(0.5)
    cider = got["summary"]["cider"]
    assert cider["mean"] == pytest.approx(0.3) and (cider["n"], cider["up"]) == (3, 3)
    assert cider == pytest.approx(mean_interval([0.3, 0.1, 0.5], 0.95))
    attribute = got["summary"]["attribute_accuracy"]
    assert attribute["mean"] == pytest.approx(0.02) and attribute["up"] == 2 and attribute["low"] < 0
    assert "bleu4" not in got["draws"]["seed2"]["gain"] and got["summary"]["bleu4"]["n"] == 2  # a missing score
    assert got["summary"]["i2t_r1"]["sd"] == 0.0  # equal rounds: gain 0 in every draw, up in none
    assert evaluate.draw_gains(cfg.model_copy(update={"draws": 0}), metrics) is None

    table = report.draws_table(got)
    assert table.columns.tolist() == ["metric", "mean gain", "low", "high", "sd", "up", "seed0 (run)", "seed1", "seed2"]
    assert table["metric"].tolist()[:len(evaluate.HEADLINE)] == list(evaluate.HEADLINE)
    row = table.set_index("metric").loc["cider"]
    assert row["up"] == "3 of 3" and np.allclose(row[["seed0 (run)", "seed1", "seed2"]].to_numpy(float), [0.3, 0.1, 0.5])
    png = report.plot_draws(got)
    assert Image.open(io.BytesIO(png)).size[0] > 1000  # four panels a row
    gain = {k: metrics["round2"][k] - metrics["round1"][k] for k in evaluate.HEADLINE}
    page = report.render_html({**metrics, "gain": gain, "draws": got}, {"draws": png}, "")
    assert "Gain over 3 training draws" in page and "3 of 3" in page and page.count("data:image/png") == 1
