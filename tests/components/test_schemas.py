"""Row-level manifest schemas: every bad row is named with its index, writes are atomic."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from components.errors import CapfiltError
from components.schemas import (
    MAX_REPORTED_LINES,
    columns,
    read_manifest,
    validate,
    write_manifest,
)

SHA = "0123456789abcdef" * 4


def ingested(n: int = 6) -> pd.DataFrame:
    keys = [f"images/human_{i // 2:06d}.png" for i in range(n)]  # two captions per image
    return pd.DataFrame({
        "sample_id": [f"{k}#{i % 2}" for i, k in enumerate(keys)],
        "image_key": keys,
        "caption": [f"a red circle above a blue square, view {i}" for i in range(n)],
        "source": ["human"] * (n - n // 3) + ["web"] * (n // 3),
        "split": ["train"] * n,
        "width": [64] * n,
        "height": [48] * n,
        "sha256": [SHA] * n,
        "shard": ["shards/000000.tar"] * n,
        "member": [f"{i // 2:06d}.png" for i in range(n)],
        "ref": [f"annotations.json:{i}" for i in range(n)],
    })


def bootstrapped() -> pd.DataFrame:
    df = ingested(6)
    df["source"] = ["human", "human", "web", "web", "synthetic", "synthetic"]
    df["itm_score"] = [None, None, 0.91, 0.75, 0.88, 0.6]
    df["captioner"] = [None, None, "c0ffee", "c0ffee", "c0ffee", "c0ffee"]
    df["filter"] = [None, None, "f17e", "f17e", "f17e", "f17e"]
    df["decoding"] = [None, None, None, None, "nucleus(p=0.9)", "nucleus(p=0.9)"]
    return df


def rejects() -> pd.DataFrame:
    return pd.DataFrame({"ref": ["web.json:3", "web.json:9"],
                         "reason": ["missing_file", "empty_caption"],
                         "detail": ["images/web_000003.png does not exist", "caption is blank"]})


def failure(df: pd.DataFrame, kind: str = "ingested") -> str:
    with pytest.raises(CapfiltError) as exc:
        validate(df, kind, where="stage/manifest.parquet")  # type: ignore[arg-type]
    return str(exc.value)


def failing_indices(message: str) -> set[int]:
    """Row indices listed in the failure table (lines that start with a number)."""
    return {int(m.group(1)) for m in re.finditer(r"^\s+(\d+)\s{2}", message, flags=re.M)}


# --- valid frames -------------------------------------------------------------------------


@pytest.mark.parametrize("kind, make", [("ingested", ingested), ("bootstrapped", bootstrapped),
                                        ("rejects", rejects)])
def test_valid_frames_pass_unchanged(kind, make):
    df = make()
    out = validate(df, kind, where="x")
    assert list(out.columns) == list(df.columns)
    pd.testing.assert_frame_equal(out.astype(object), df.astype(object), check_dtype=False)


def test_safe_widening_only():
    df = ingested()
    df["width"] = df["width"].astype(np.int32)
    assert validate(df, "ingested", where="x")["width"].dtype == np.int64
    df["width"] = df["width"].astype(float) + 0.5  # a fractional width is never rounded away
    assert "column 'width' has dtype float64" in failure(df)
    df = ingested()
    df["width"] = df["width"].astype(str)  # "64" is not silently parsed
    assert "column 'width' has dtype" in failure(df)


def test_empty_manifest_passes_the_row_schema():
    # dataset-level rules (an empty manifest fails) belong to the GX suite, not to pandera
    assert validate(ingested().iloc[:0], "ingested", where="x").empty


# --- each kind of bad row -------------------------------------------------------------------


@pytest.mark.parametrize("column, value, check", [
    ("caption", "   ", "caption_not_blank"),
    ("caption", "", "str_length"),
    ("sha256", SHA.upper(), "lowercase_hex"),
    ("sha256", SHA[:-1], "str_length(64, 64)"),
    ("sha256", "g" * 64, "lowercase_hex"),
    ("width", -3, "greater_than(0)"),
    ("height", 0, "greater_than(0)"),
    ("source", "synthetic", "isin"),  # synthetic only appears after bootstrap
    ("source", "flickr", "isin"),
    ("split", "dev", "isin"),
    ("shard", "/abs/000000.tar", "relative_posix_path"),
    ("shard", "../elsewhere/000000.tar", "relative_posix_path"),
    ("caption", None, "not_nullable"),
])
def test_bad_value_is_reported_with_its_row(column, value, check):
    df = ingested()
    df[column] = df[column].astype(object)
    df.loc[4, column] = value
    before = df.copy()
    message = failure(df)
    assert message.startswith("stage/manifest.parquet: 1 rows fail the ingested schema:")
    assert failing_indices(message) == {4}  # the good rows are not listed
    assert column in message and check in message
    pd.testing.assert_frame_equal(df, before)  # validation never edits its input


def test_duplicate_sample_id_lists_both_rows():
    df = ingested()
    df.loc[5, "sample_id"] = df.loc[1, "sample_id"]
    message = failure(df)
    assert failing_indices(message) == {1, 5}
    assert "field_uniqueness" in message


def test_extra_and_missing_columns_are_named():
    df = ingested().drop(columns=["ref"]).assign(note="x")
    message = failure(df)
    assert "unexpected column 'note'" in message
    assert "missing column 'ref'" in message
    assert failing_indices(message) == set()


def test_all_failing_rows_are_listed_lazily():
    df = ingested(8)
    df.loc[1, "caption"] = " "
    df.loc[3, "width"] = -1
    df.loc[6, "sha256"] = "nope"
    message = failure(df)
    assert "3 rows fail the ingested schema" in message
    assert failing_indices(message) == {1, 3, 6}


def test_long_reports_are_capped_with_a_count():
    df = ingested(60)
    df["width"] = -1
    message = failure(df)
    assert "60 rows fail" in message
    lines = message.splitlines()
    assert len(lines) <= MAX_REPORTED_LINES + 2  # header + table lines + "... and K more"
    assert re.search(r"\.\.\. and \d+ more$", message)


def test_row_check_counts_rows_not_columns():
    df = bootstrapped()
    df.loc[0, "itm_score"] = 0.4  # a human row with a score
    df.loc[5, "decoding"] = None  # a synthetic row without its decoding
    message = failure(df, "bootstrapped")
    assert message.startswith("stage/manifest.parquet: 2 rows fail the bootstrapped schema:")
    assert failing_indices(message) == {0, 5}
    assert "provenance_null_iff_human" in message and "decoding_iff_synthetic" in message
    assert "source='human'" in message


def test_bootstrapped_score_range_and_rejects_vocabulary():
    df = bootstrapped()
    df.loc[3, "itm_score"] = 1.5
    assert failing_indices(failure(df, "bootstrapped")) == {3}
    bad = rejects()
    bad.loc[1, "reason"] = "felt_like_it"
    message = failure(bad, "rejects")
    assert failing_indices(message) == {1} and "felt_like_it" in message


def test_unknown_kind_is_a_capfilt_error():
    with pytest.raises(CapfiltError, match="unknown manifest kind 'raw'"):
        validate(ingested(), "raw", where="x")  # type: ignore[arg-type]


# --- reading and writing --------------------------------------------------------------------


@pytest.mark.parametrize("kind, make", [("ingested", ingested), ("bootstrapped", bootstrapped),
                                        ("rejects", rejects)])
def test_write_read_round_trip(tmp_path, kind, make):
    df = make()
    path = write_manifest(df, tmp_path / "out" / "manifest.parquet", kind)
    back = read_manifest(path, kind)
    assert list(back.columns) == columns(kind)
    expected = df[columns(kind)]
    pd.testing.assert_frame_equal(back.astype(object).where(back.notna(), None),
                                  expected.astype(object).where(expected.notna(), None))
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.parquet"]  # no temp left


def test_failed_validation_writes_nothing(tmp_path):
    path = tmp_path / "manifest.parquet"
    write_manifest(ingested(), path, "ingested")
    before = path.read_bytes()
    bad = ingested(8)
    bad.loc[2, "width"] = -5
    with pytest.raises(CapfiltError, match=r"manifest.parquet: 1 rows fail"):
        write_manifest(bad, path, "ingested")
    assert path.read_bytes() == before  # the old manifest is intact
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.parquet"]


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "manifest.parquet"

    def crash(self, target, **kwargs):
        Path(target).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", crash)
    with pytest.raises(CapfiltError, match="cannot write the ingested manifest: disk full"):
        write_manifest(ingested(), path, "ingested")
    assert list(tmp_path.iterdir()) == []


def test_read_missing_and_unreadable_files(tmp_path):
    with pytest.raises(CapfiltError, match=r"nothere\.parquet: ingested manifest not found"):
        read_manifest(tmp_path / "nothere.parquet", "ingested")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet at all")
    with pytest.raises(CapfiltError, match=r"junk\.parquet: not a readable parquet file"):
        read_manifest(junk, "ingested")


def test_read_validates_what_it_reads(tmp_path):
    path = tmp_path / "manifest.parquet"
    bad = ingested()
    bad.loc[3, "split"] = "holdout"
    bad.to_parquet(path, index=False)  # written behind the schema's back
    with pytest.raises(CapfiltError) as exc:
        read_manifest(path, "ingested")
    assert str(exc.value).startswith(f"{path}: 1 rows fail the ingested schema:")
    assert failing_indices(str(exc.value)) == {3}
