"""The ablation and rounds stages for real: `dvc repro` of the project's dvc.yaml on a shrunken
corpus and tiny model with `evaluate.ablation: true` and `bootstrap.rounds: 2`. Both variants and
round 3 are trained through subprocess stage chains and evaluated; evaluate tabulates them; a
second run of either stage re-uses the finished chains."""

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
    apply_overrides(root / "params.yaml", [*SHRINK, "evaluate.ablation=true", "bootstrap.rounds=2"])
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


def test_a_second_run_reuses_the_finished_chains(project):
    roots = [project / "outputs/ablation/variants/captioner", project / "outputs/ablation/variants/filter",
             project / "outputs/rounds/extra/round3"]
    models = [r / step / "model.safetensors" for r in roots
              for step in ("retrain/model", "finetune/captioner/model", "finetune/filter/model")]
    before = {p: p.stat().st_mtime_ns for p in models}
    for stage in ("ablation", "rounds"):
        sh([str(BIN / "capfilt"), "stage", stage], project, timeout=600)
    assert {p: p.stat().st_mtime_ns for p in models} == before
    assert _json(project / "outputs/ablation/metrics.json")["enabled"]
