"""The `ingest` stage on a tiny data/ laid out like the embedded corpus, and its dvc.yaml contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from ingest_helpers import image_bytes, write

from components import schemas, stages
from components.config import load_params
from components.errors import CapfiltError
from components.text import pre_caption
from components.tokenizer import SPECIAL_TOKENS, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
COLOURS = ["red", "green", "blue", "yellow"]
SHAPES = ["circle", "square", "cross", "bar"]


def _caption(i: int, j: int) -> str:
    return f"a {COLOURS[(i + j) % 4]} {SHAPES[i % 4]} in the upper left, take {j}"


def _tiny_data(root: Path) -> None:
    """data/human (COCO), data/web (BLIP json + truth.csv), data/test (Karpathy test)."""
    images, anns = [], []
    for i in range(4):
        write(root / f"data/human/images/human_{i:06d}.png", image_bytes(16, 16, seed=i))
        images.append({"id": i, "file_name": f"human_{i:06d}.png", "width": 16, "height": 16})
        anns += [{"id": len(anns) + j, "image_id": i, "caption": _caption(i, j)} for j in range(3)]
    write(root / "data/human/annotations.json", json.dumps({"images": images, "annotations": anns}).encode())
    web = []
    for i in range(5):
        write(root / f"data/web/images/web_{i:06d}.png", image_bytes(16, 16, seed=10 + i))
        web.append({"image": f"images/web_{i:06d}.png", "caption": f"photo of a {COLOURS[i % 4]} thing"})
    write(root / "data/web/web.json", json.dumps(web).encode())
    write(root / "data/web/truth.csv", b"image_id,noise\n")
    test = []
    for i in range(3):
        write(root / f"data/test/images/test_{i:06d}.png", image_bytes(16, 16, seed=20 + i))
        test.append({"image": f"images/test_{i:06d}.png", "caption": [_caption(i, 0), _caption(i, 1)]})
    write(root / "data/test/test.json", json.dumps(test).encode())


def _params(root: Path, **validation: object) -> Path:
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw = {"ingest": raw["ingest"], "validation": raw.get("validation", {})}
    raw["ingest"].update(workers=1, shard_size=2)
    raw["ingest"]["tokenizer"]["vocab_size"] = 80
    raw["validation"].update(validation)
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_ingest_stage_on_tiny_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _tiny_data(tmp_path)
    stages.run_stage("ingest", _params(tmp_path))
    out = tmp_path / "outputs/ingest"
    expected = {"human": (12, "train", "human"), "web": (5, "train", "web"), "test": (6, "test", "human")}
    for name, (rows, split, source) in expected.items():
        df = schemas.read_manifest(out / name / "manifest.parquet", "ingested")
        assert len(df) == rows and set(df["split"]) == {split} and set(df["source"]) == {source}
        assert (out / name / "rejects.parquet").is_file() and (out / name / "summary.json").is_file()
        assert json.loads((out / name / "expectations.json").read_text())["success"] is True
        assert (out / name / "data_docs/index.html").is_file()
        assert list((out / name / "shards").glob("*.tar"))
    assert df["image_key"].iloc[0] == "images/test_000000.png"
    tok = load_tokenizer(out / "tokenizer")
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(7))
    assert tok.get_vocab_size() <= 80
    enc = tok.encode(pre_caption("A Red Circle!"))  # what training feeds it
    assert enc.tokens[0] == "[CLS]" and enc.tokens[-1] == "[SEP]" and "[UNK]" not in enc.tokens
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["human"]["accepted"] == 12 and metrics["tokenizer"]["captions"] == 17
    # what the later stages depend on (dvc.yaml) comes out byte for byte again on a re-run
    depended = {p: p.read_bytes() for name in expected for p in (out / name).rglob("*")
                if p.is_file() and (p.name == "manifest.parquet" or p.parent.name == "shards")}
    depended.update({p: p.read_bytes() for p in (out / "tokenizer").rglob("*") if p.is_file()})
    stages.run_stage("ingest", _params(tmp_path))
    assert {p: p.read_bytes() for p in depended} == depended


@pytest.mark.slow
def test_failed_expectation_fails_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    _tiny_data(tmp_path)
    with pytest.raises(CapfiltError, match=r"ingest human: .*expectations failed") as err:
        stages.run_stage("ingest", _params(tmp_path, min_rows=1000))
    assert "expect_table_row_count_to_be_between" in str(err.value)
    assert not (tmp_path / "outputs/ingest/human").exists()
    assert [p.name for p in (tmp_path / "outputs/ingest").iterdir()] == []


def test_dvc_stage_matches_params() -> None:
    stage = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["ingest"]
    cfg = load_params(ROOT / "params.yaml").ingest
    assert stage["cmd"] == "capfilt stage ingest"
    assert set(stage["params"]) >= {"ingest", "validation"}
    assert set(stage["outs"]) == {f"{cfg.out}/{n}" for n in [*cfg.sources, "tokenizer"]}
    assert stage["metrics"] == [{f"{cfg.out}/metrics.json": {"cache": False}}]
    deps = set(stage["deps"])
    assert "data" in deps
    for module in ("ingest", "ingest_stage", "formats", "images", "shards", "text", "storage",
                   "tokenizer", "reasons", "schemas", "expectations"):  # fmt: skip
        assert f"components/{module}.py" in deps


def test_later_stages_depend_on_ingest_manifests_and_shards_not_folders() -> None:
    """An ingest folder also holds Data Docs and a summary that change on every run; a stage that
    depended on the whole folder would re-run (pre-training from scratch) after any ingest re-run."""
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    cfg = load_params(ROOT / "params.yaml").ingest
    folders = {f"{cfg.out}/{n}" for n in cfg.sources}
    checked = 0
    for name, stage in dvc.items():
        if name == "ingest":
            continue
        for dep in (stage.get("do") or stage).get("deps", []):
            assert dep not in folders, f"{name} depends on the whole {dep}"
            if any(dep.startswith(f + "/") for f in folders):
                assert dep.endswith(("/manifest.parquet", "/shards")), f"{name}: {dep}"
                checked += 1
    assert checked >= 10
