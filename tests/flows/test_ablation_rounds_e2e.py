"""The ablation, rounds and draws stages for real: `dvc repro` of the project's dvc.yaml on a
shrunken corpus and tiny model with `evaluate.ablation: true`, `bootstrap.rounds: 2` and
`evaluate.draws: 1`. Both variants, round 3 and a second training draw of rounds 1 and 2 are
trained through subprocess stage chains and evaluated; evaluate tabulates them; a second run of
each stage re-uses the finished chains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from components.batch_inference import checkpoint_hash
from components.config import load_params
from components.evaluate import HEADLINE
from components.schemas import read_manifest
from flows.pipeline import apply_overrides

from conftest import BIN, PROJECT_FILES, ROOT, SHRINK, init_repo, sh

pytestmark = [pytest.mark.slow]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A copy of the project on a 24/24/8-image corpus, every stage run once by `dvc repro`."""
    root = tmp_path_factory.mktemp("capfilt-ablation") / "project"
    root.mkdir()
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.is_file():
            shutil.copy2(src, root / name)
    init_repo(root)
    sh([str(BIN / "capfilt"), "synth", "--out", "data", "--set", "synth.n_human=24",
        "--set", "synth.n_web=24", "--set", "synth.n_test=8"], root)
    apply_overrides(root / "params.yaml", [*SHRINK, "evaluate.ablation=true", "bootstrap.rounds=2",
                                           "evaluate.draws=1"])
    sh([str(BIN / "dvc"), "repro"], root, timeout=1800)
    return root


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _headline(metrics: dict) -> dict:
    return {k: metrics[k] for k in HEADLINE}


def test_ablation_trains_both_variants_and_evaluate_tabulates_four_rows(project):
    abl = _json(project / "outputs/ablation/metrics.json")
    assert abl["enabled"] and set(abl["variants"]) == {"captioner", "filter"}
    for name, metrics in abl["variants"].items():
        assert all(isinstance(metrics[k], float) for k in HEADLINE), name
        root = project / "outputs/ablation/variants" / name
        for task in ("captioner", "filter"):
            assert (root / "finetune" / task / "model" / "model.safetensors").is_file()
        manifest = read_manifest(root / "data/manifest.parquet", "bootstrapped")
        assert abl["corpus"][name] == {s: int((manifest["source"] == s).sum()) for s in ("human", "web", "synthetic")}
        # the chain ran with the stage's own parameters (here: the shrunken model)
        assert load_params(root / "params.yaml").model == load_params(project / "params.yaml").model
    assert abl["corpus"]["captioner"]["synthetic"] > 0 and abl["corpus"]["filter"]["synthetic"] == 0
    assert abl["corpus"]["captioner"]["web"] == abl["corpus"]["none"]["web"] == 24

    ev = _json(project / "outputs/evaluate/metrics.json")
    table = ev["ablation"]
    assert list(table) == ["none", "captioner", "filter", "both"]
    assert _headline(table["none"]) == _headline(ev["round1"])
    assert _headline(table["both"]) == _headline(ev["round2"])
    assert _headline(table["captioner"]) == _headline(abl["variants"]["captioner"])
    page = (project / "outputs/evaluate/report.html").read_text()
    assert "CapFilt ablation" in page and "filter only" in page


def test_a_second_round_bootstraps_with_round_two_models(project):
    rounds = _json(project / "outputs/rounds/metrics.json")
    assert rounds["rounds"] == 2 and list(rounds["test"]) == ["round3"]
    assert all(isinstance(rounds["test"]["round3"][k], float) for k in HEADLINE)
    assert 0.0 <= rounds["bootstrap"]["round3"]["web_kept_fraction"] <= 1.0
    assert "auroc" in rounds["filter"]["round3"]
    r3 = project / "outputs/rounds/extra/round3"
    boot = read_manifest(r3 / "bootstrap/manifest.parquet", "bootstrapped")
    used = set(boot.loc[boot["source"] != "human", "captioner"])
    assert used == {checkpoint_hash(project / "outputs/finetune2/captioner/model")}
    for task in ("captioner", "filter"):
        assert (r3 / "finetune" / task / "model" / "model.safetensors").is_file()
    assert (r3 / "retrain/model/model.safetensors").is_file()
    ev = _json(project / "outputs/evaluate/metrics.json")
    assert ev["rounds"]["round3"] == rounds["test"]["round3"]
    assert "<th>round3</th>" in (project / "outputs/evaluate/report.html").read_text()


def test_a_draw_retrains_both_rounds_at_the_next_seed_and_evaluate_averages_the_gains(project):
    seed = load_params(project / "params.yaml").train.seed
    stage = _json(project / "outputs/draws/metrics.json")
    assert stage["enabled"] and stage["run_seed"] == seed and stage["seeds"] == [seed + 1] and stage["n_draws"] == 1
    root = project / f"outputs/draws/chains/seed{seed + 1}"
    for round_, first in (("round1", "pretrain"), ("round2", "retrain")):
        assert load_params(root / round_ / "params.yaml").train.seed == seed + 1
        for step in (f"{first}/model", "finetune/captioner/model", "finetune/filter/model"):
            assert (root / round_ / step / "model.safetensors").is_file(), (round_, step)
        for r in ("round1", "round2"):
            assert all(isinstance(stage["draws"][f"seed{seed + 1}"][r][k], float) for k in HEADLINE)
    # another seed, another model: the draw's pre-training is not the run's
    assert checkpoint_hash(root / "round1/pretrain/model") != checkpoint_hash(project / "outputs/pretrain/model")
    ev = _json(project / "outputs/evaluate/metrics.json")
    draws = ev["draws"]
    assert draws["run"] == f"seed{seed}" and list(draws["draws"]) == [f"seed{seed}", f"seed{seed + 1}"]
    assert draws["draws"][f"seed{seed}"]["gain"]["cider"] == pytest.approx(ev["gain"]["cider"])
    extra = stage["draws"][f"seed{seed + 1}"]
    extra_gain = extra["round2"]["cider"] - extra["round1"]["cider"]
    assert draws["draws"][f"seed{seed + 1}"]["gain"]["cider"] == pytest.approx(extra_gain)
    assert draws["summary"]["cider"]["n"] == 2
    assert draws["summary"]["cider"]["mean"] == pytest.approx((ev["gain"]["cider"] + extra_gain) / 2)
    # the placement breakdown travels with every round's metrics, the draws' too
    placement = ("position_accuracy", "position_other_object", "position_empty_cell", "position_unplaced")
    for metrics in (ev["round1"], ev["round2"], extra["round1"], extra["round2"]):
        assert sum(metrics[k] for k in placement) == pytest.approx(1.0)
    assert draws["summary"]["position_other_object"]["n"] == 2
    page = (project / "outputs/evaluate/report.html").read_text()
    assert "training draws" in page and page.count("Captions by attribute") == 1


def test_a_second_run_reuses_the_finished_chains(project):
    roots = [project / "outputs/ablation/variants/captioner", project / "outputs/ablation/variants/filter",
             project / "outputs/rounds/extra/round3"]
    models = [r / step / "model.safetensors" for r in roots
              for step in ("retrain/model", "finetune/captioner/model", "finetune/filter/model")]
    draw = next((project / "outputs/draws/chains").iterdir())
    models += [draw / step / "model.safetensors" for step in ("round1/pretrain/model", "round2/retrain/model",
                                                              "round1/finetune/filter/model")]
    before = {p: p.stat().st_mtime_ns for p in models}
    for stage in ("ablation", "rounds", "draws"):
        sh([str(BIN / "capfilt"), "stage", stage], project, timeout=600)
    assert {p: p.stat().st_mtime_ns for p in models} == before
    assert _json(project / "outputs/ablation/metrics.json")["enabled"]
