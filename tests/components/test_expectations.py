"""Dataset-level expectations (Great Expectations): pass on good data, readable failures,
Data Docs rendered into the output folder and nothing written anywhere else."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest

from components.config import ValidationConfig, load_params
from components.errors import CapfiltError
from components.expectations import ExpectationReport, require, run_expectations, suite_name

pytestmark = pytest.mark.slow  # importing great_expectations alone takes ~5 s; each run ~1 s

ROOT = Path(__file__).resolve().parents[2]
SHA = "0123456789abcdef" * 4


def manifest(n_images: int = 40, per_image: int = 3) -> pd.DataFrame:
    """A realistic ingested manifest: several distinct captions per image, human and web rows."""
    rows = []
    for i in range(n_images):
        key = f"images/img_{i:06d}.png"
        source = "human" if i % 4 else "web"
        for j in range(per_image if source == "human" else 1):
            rows.append({
                "sample_id": f"{key}#{j}", "image_key": key,
                "caption": f"{'a small' if j else 'one big'} red circle next to square {i} ({j})",
                "source": source, "split": "train", "width": 64 + i, "height": 48,
                "sha256": SHA, "shard": "shards/000000.tar", "member": f"{i:06d}.png",
                "ref": f"annotations.json:{len(rows)}",
            })
    return pd.DataFrame(rows)


def bootstrapped() -> pd.DataFrame:
    df = manifest()
    synthetic = df[df["source"] == "web"].assign(
        source="synthetic", caption=lambda d: "a generated caption of " + d["image_key"],
        sample_id=lambda d: d["sample_id"] + "#syn")
    df = pd.concat([df, synthetic], ignore_index=True)
    human = df["source"] == "human"
    df["itm_score"] = [None if h else 0.5 + 0.01 * (i % 40) for i, h in enumerate(human)]
    df["captioner"] = [None if h else "c0ffee" for h in human]
    df["filter"] = [None if h else "f17e" for h in human]
    df["decoding"] = ["nucleus(p=0.9)" if s == "synthetic" else None for s in df["source"]]
    return df


@pytest.fixture(scope="module")
def cfg() -> ValidationConfig:
    return load_params(ROOT / "params.yaml").validation  # the repository defaults


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, cfg) -> tuple[ExpectationReport, Path]:
    out = tmp_path_factory.mktemp("good")
    return run_expectations(manifest(), "ingested", cfg, out, name="ingest"), out


def test_good_manifest_passes(good_run):
    report, out = good_run
    assert report.success, report.summary()
    assert report.failed == 0 and report.evaluated >= 10
    assert report.summary() == f"all {report.evaluated} expectations passed"
    require(report, "ingest")  # does not raise


def test_report_json_is_stable_and_readable(good_run):
    report, out = good_run
    data = json.loads((out / "expectations.json").read_text())
    assert data["success"] is True and data["suite"] == suite_name("ingested")
    assert data["statistics"] == {"evaluated": report.evaluated, "failed": 0,
                                  "successful": report.evaluated}
    assert data["results"][0]["expectation"] == "expect_table_row_count_to_be_between"
    assert data["results"][0]["observed"] == len(manifest())
    assert all({"expectation", "success", "kwargs"} <= set(r) for r in data["results"])


def test_data_docs_are_rendered_into_out_dir(good_run):
    report, out = good_run
    assert report.docs_index == out / "data_docs" / "index.html"
    assert suite_name("ingested") in report.docs_index.read_text(encoding="utf-8")
    assert sorted(p.name for p in out.iterdir()) == ["data_docs", "expectations.json"]


def test_bad_manifest_fails_with_a_readable_summary(tmp_path, cfg):
    df = manifest()
    df.loc[: int(len(df) * 0.3), "caption"] = None  # 30 % null captions
    df["width"] = 10000  # every image too wide
    report = run_expectations(df, "ingested", cfg, tmp_path, name="ingest")
    assert not report.success and report.failed >= 2
    summary = report.summary()
    assert "expect_column_values_to_not_be_null(caption)" in summary
    assert "expect_column_values_to_be_between(width)" in summary and "10000" in summary
    assert "(height)" not in summary  # only failed expectations are listed
    width_line = next(line for line in summary.splitlines() if "(width)" in line)
    assert width_line.endswith("(params: validation.min_side / max_side)")  # what to change
    with pytest.raises(CapfiltError) as exc:
        require(report, "outputs/ingest/manifest.parquet")
    assert str(exc.value).startswith("outputs/ingest/manifest.parquet: ")
    assert "expect_column_values_to_be_between(width)" in str(exc.value)
    assert json.loads((tmp_path / "expectations.json").read_text())["success"] is False


def test_empty_manifest_and_duplicates_fail(tmp_path, cfg):
    empty = run_expectations(manifest().iloc[:0], "ingested", cfg, tmp_path / "e", name="empty")
    assert not empty.success and "expect_table_row_count_to_be_between" in empty.summary()
    df = manifest()
    df = pd.concat([df, df.iloc[:5]], ignore_index=True)  # repeated sample_id and pairs
    dup = run_expectations(df, "ingested", cfg, tmp_path / "d", name="dups")
    failed = {r["expectation"] for r in dup.results if not r["success"]}
    assert {"expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique"} <= failed


def test_bootstrapped_source_mix(tmp_path, cfg):
    good = run_expectations(bootstrapped(), "bootstrapped", cfg, tmp_path / "g", name="boot")
    assert good.success, good.summary()
    no_human = bootstrapped().query("source != 'human'")
    bad = run_expectations(no_human, "bootstrapped", cfg, tmp_path / "b", name="boot")
    summary = bad.summary()
    assert "expect_column_distinct_values_to_contain_set(source)" in summary
    all_synthetic = bootstrapped().assign(source="synthetic", itm_score=1.5)
    worse = run_expectations(all_synthetic, "bootstrapped", cfg, tmp_path / "s", name="boot")
    failed = {(r["expectation"], r.get("column")) for r in worse.results if not r["success"]}
    assert ("expect_column_mean_to_be_between", "is_synthetic") in failed
    assert ("expect_column_values_to_be_between", "itm_score") in failed
    assert "validation.min_synthetic_fraction / max_synthetic_fraction" in worse.summary()


def test_unknown_source_fails_for_ingested(tmp_path, cfg):
    df = manifest().assign(source="synthetic")  # synthetic rows only after bootstrap
    report = run_expectations(df, "ingested", cfg, tmp_path, name="ingest")
    assert "expect_column_values_to_be_in_set(source)" in report.summary()


def test_rejects_suite_allows_an_empty_table(tmp_path, cfg):
    empty = pd.DataFrame({"ref": pd.Series([], dtype=str), "reason": pd.Series([], dtype=str),
                          "detail": pd.Series([], dtype=str)})
    assert run_expectations(empty, "rejects", cfg, tmp_path / "r", name="rejects").success
    bad = pd.DataFrame({"ref": ["a:1"], "reason": ["bored"], "detail": [""]})
    assert not run_expectations(bad, "rejects", cfg, tmp_path / "b", name="rejects").success


def test_nothing_is_written_outside_out_dir(tmp_path, cfg, monkeypatch):
    cwd, tmp, home, out = (tmp_path / d for d in ("cwd", "tmp", "home", "out"))
    for d in (cwd, tmp, home):
        d.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    run_expectations(manifest(), "ingested", cfg, out, name="ingest")
    run_expectations(manifest(), "ingested", cfg, out, name="ingest")  # a rerun replaces the docs
    assert os.listdir(cwd) == [] and os.listdir(tmp) == [] and os.listdir(home) == []
    assert sorted(p.name for p in out.iterdir()) == ["data_docs", "expectations.json"]


def test_missing_column_is_a_failed_expectation_not_a_crash(tmp_path, cfg):
    report = run_expectations(manifest().drop(columns=["width"]), "ingested", cfg, tmp_path, name="x")
    assert not report.success
    assert 'expect_column_values_to_be_between(width): error: The column "width"' in report.summary()
