"""`capfilt reproduce`: a past run's datasets restored bit for bit from git + the DVC cache, and
`capfilt compare` of the two runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from components.errors import CapfiltError
from flows import compare, reproduce
from flows.pipeline import pipeline

from conftest import BIN, commit_all, sh

pytestmark = pytest.mark.slow


def test_reproduce_restores_the_first_run_after_the_corpus_changed(tiny_project: Path, mlflow_store: str,
                                                                     tmp_path: Path):
    first = pipeline(root=str(tiny_project))
    result_a = (tiny_project / "outputs/count/result.txt").read_bytes()
    report_a = (tiny_project / "outputs/report/report.html").read_bytes()
    commit_all(tiny_project, "run 1")

    (tiny_project / "data/corpus.txt").write_text("a much longer corpus of eight words\n")
    sh([str(BIN / "dvc"), "add", "-q", "data"], tiny_project)
    commit_all(tiny_project, "new corpus")
    second = pipeline(root=str(tiny_project))
    assert (tiny_project / "outputs/count/result.txt").read_bytes() != result_a

    out = tmp_path / "restored"
    restored = reproduce.reproduce(first["parent_run_id"], out, tiny_project)
    assert (out / "outputs/count/result.txt").read_bytes() == result_a
    assert (out / "outputs/report/report.html").read_bytes() == report_a
    assert (out / "data/corpus.txt").read_text() == "one two three\n"
    assert "outputs/count/result.txt" in restored["restored"]
    with pytest.raises(CapfiltError, match="not empty"):
        reproduce.reproduce(first["parent_run_id"], out, tiny_project)

    diff = compare.compare(first["parent_run_id"], second["parent_run_id"])
    data = {k: (a, b) for k, a, b in diff["data"]}
    assert data["data_md5"][0] != data["data_md5"][1]
    assert data["dvc_lock_sha256"][0] != data["dvc_lock_sha256"][1]
    metrics = {k: (a, b) for k, a, b in diff["metrics"]}
    assert metrics["count/words"] == (3.0, 7.0)
    text = compare.format_comparison(diff)
    assert "== data versions ==" in text and "count/words" in text
    with pytest.raises(CapfiltError, match="no MLflow run 'nope'"):
        compare.compare("nope", second["parent_run_id"])
