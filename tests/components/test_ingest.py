"""capfilt ingest end to end on small corpora: bad rows, duplicates, outputs, atomicity, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ingest_helpers import (
    blip_json,
    bomb_png,
    cfg,
    good_images,
    image_bytes,
    make_tar,
    manifest,
    reasons_by_ref,
    rejects,
    write,
)
from PIL import Image

from components import cli, ingest, reasons, schemas
from components.errors import CapfiltError
from components.formats import SourceSpec
from components.shards import ShardReader


def _bad_image(root: Path, case: str) -> tuple[object, object]:
    """(image field, caption) of one bad row of kind `case`, writing whatever file it needs."""
    png = image_bytes(seed=7)
    files = {
        "missing_file": ("images/nope.png", None),
        "empty_file": ("images/empty.png", b""),
        "not_an_image": ("images/text.png", b"<html>not an image</html>"),
        "truncated_image": ("images/trunc.png", png[: len(png) // 2]),
        "unreadable_image": ("images/flip.png", png[:60] + bytes([png[60] ^ 0xFF]) + png[61:]),
        "decompression_bomb": ("images/bomb.png", bomb_png()),
    }
    if case in files:
        rel, data = files[case]
        if data is not None:
            write(root / rel, data)
        return rel, "a caption for a bad image"
    outside = write(root.parent / "outside.png", png)
    return {
        "path_escapes_root": ("../outside.png", "escapes with dots"),
        "path_escapes_root_abs": (str(outside), "escapes with an absolute path"),
        "no_image_for_annotation": (None, "a caption without an image"),
        "empty_caption": ("images/good_0.png", "   \t "),
        "empty_caption_null": ("images/good_0.png", None),
        "empty_caption_markup": ("images/good_0.png", "<b> </b>"),
        "non_string_caption": ("images/good_0.png", 42),
        "non_string_caption_dict": ("images/good_0.png", {"en": "a dog"}),
    }[case]


BAD_CASES = [
    "missing_file", "empty_file", "not_an_image", "truncated_image", "unreadable_image",
    "decompression_bomb", "path_escapes_root", "path_escapes_root_abs", "no_image_for_annotation",
    "empty_caption", "empty_caption_null", "empty_caption_markup", "non_string_caption",
    "non_string_caption_dict",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_row_is_rejected_and_good_rows_survive(tmp_path: Path, case: str) -> None:
    src = tmp_path / "src"
    rels = good_images(src)
    image, caption = _bad_image(src, case)
    rows = [{"image": rels[0], "caption": "first good"}, {"image": image, "caption": caption},
            {"image": rels[1], "caption": "second good"}, {"image": rels[2], "caption": "third"}]  # fmt: skip
    path = blip_json(src, rows)
    out = tmp_path / "out"
    summary = ingest.run([SourceSpec(str(path))], out, cfg())
    expected = case.split("_abs")[0].removesuffix("_null").removesuffix("_markup").removesuffix("_dict")
    assert reasons_by_ref(out) == {f"{path}:1": expected}
    df = manifest(out)
    assert sorted(df["ref"]) == [f"{path}:0", f"{path}:2", f"{path}:3"]
    assert sorted(df["caption"]) == ["first good", "second good", "third"]
    assert summary.read == 4 and summary.accepted == 3 and summary.rejected == {expected: 1}
    assert rejects(out)["detail"].str.len().min() > 0


def test_invalid_utf8_in_tar_txt_is_rejected(tmp_path: Path) -> None:
    tar = make_tar(tmp_path / "shard.tar", [
        ("a", {"png": image_bytes(seed=1), "txt": b"good one"}),
        ("b", {"png": image_bytes(seed=2), "txt": b"bad \xff\xfe bytes"}),
        ("c", {"jpg": image_bytes(seed=3, fmt="JPEG"), "txt": "caf\u00e9".encode()}),
    ])  # fmt: skip
    out = tmp_path / "out"
    ingest.run([SourceSpec(str(tar))], out, cfg())
    assert reasons_by_ref(out) == {f"{tar}:b": reasons.INVALID_UTF8}
    assert sorted(manifest(out)["caption"]) == ["café", "good one"]


def test_duplicates_dropped_and_images_stored_once(tmp_path: Path) -> None:
    src = tmp_path / "src"
    png = image_bytes(seed=5)
    write(src / "images/a.png", png)
    write(src / "images/copy_of_a.png", png)  # same bytes, other name
    rows = [{"image": "images/a.png", "caption": "a  red <i>square</i>"},
            {"image": "images/a.png", "caption": "a red square"},  # same after normalisation
            {"image": "images/copy_of_a.png", "caption": "a red square"},  # same bytes + text
            {"image": "images/copy_of_a.png", "caption": "another text"}]  # fmt: skip
    path = blip_json(src, rows)
    out = tmp_path / "out"
    summary = ingest.run([SourceSpec(str(path))], out, cfg())
    assert reasons_by_ref(out) == {f"{path}:1": "duplicate", f"{path}:2": "duplicate"}
    df = manifest(out)
    assert list(df["caption"]) == ["a red square", "another text"]
    assert summary.images_stored == 1
    assert df["shard"].nunique() == 1 and df["member"].nunique() == 1
    assert list(df["image_key"]) == ["images/a.png", "images/copy_of_a.png"]


def test_outputs_validate_and_shards_round_trip(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rels = good_images(src, n=5)
    rows = [{"image": r, "caption": [f"cap {i}", f"other {i}"]} for i, r in enumerate(rels)]
    path = blip_json(src, rows, "test.json")
    out = tmp_path / "out"
    summary = ingest.run([SourceSpec(str(path), format="karpathy")], out, cfg(), "human", "test")
    df = schemas.read_manifest(out / "manifest.parquet", "ingested")
    schemas.read_manifest(out / "rejects.parquet", "rejects")
    assert len(df) == 10 and set(df["split"]) == {"test"} and set(df["source"]) == {"human"}
    assert list(df["sample_id"][:2]) == ["images/good_0.png#0", "images/good_0.png#1"]
    assert summary.shards == 2 and sorted(p.name for p in (out / "shards").iterdir()) == [
        "000000.tar", "000001.tar"]  # fmt: skip
    with ShardReader(out) as reader:
        for row in df.itertuples():
            im = Image.open(__import__("io").BytesIO(reader.read(row.shard, row.member)))
            assert im.size == (row.width, row.height) and im.mode == "RGB"
    written = json.loads((out / "summary.json").read_text())
    assert written["accepted"] == 10 and written["images_stored"] == 5


def test_long_caption_truncated_not_dropped(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rels = good_images(src, n=1)
    path = blip_json(src, [{"image": rels[0], "caption": "word " * 400}])
    out = tmp_path / "out"
    ingest.run([SourceSpec(str(path))], out, cfg())
    (caption,) = manifest(out)["caption"]
    assert len(caption) <= 1000 and caption.startswith("word word")


def test_failed_check_leaves_no_output_and_keeps_the_old_one(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rels = good_images(src, n=2)
    path = blip_json(src, [{"image": r, "caption": "x y"} for r in rels])
    out = tmp_path / "out"
    ingest.run([SourceSpec(str(path))], out, cfg())
    before = manifest(out)

    def fail(*_: object) -> None:
        raise CapfiltError("check failed")

    blip_json(src, [{"image": rels[0], "caption": "changed"}])
    with pytest.raises(CapfiltError, match="check failed"):
        ingest.run([SourceSpec(str(path))], out, cfg(), check=fail)
    assert manifest(out).equals(before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temp folders left


def test_refuses_to_replace_a_foreign_folder(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rels = good_images(src, n=1)
    path = blip_json(src, [{"image": rels[0], "caption": "x"}])
    (tmp_path / "precious").mkdir()
    (tmp_path / "precious/thesis.tex").write_text("...")
    with pytest.raises(CapfiltError, match="not an ingest output"):
        ingest.run([SourceSpec(str(path))], tmp_path / "precious", cfg())
    assert (tmp_path / "precious/thesis.tex").exists()


@pytest.mark.parametrize("content, message", [
    (b'[{"image": "a.png", "caption": "x"}', "malformed JSON"),
    (None, "not found"),
    (b'{"images": [], "annotations": {}}', "must be lists"),
    (b'"just a string"', "unrecognised JSON"),
])  # fmt: skip
def test_whole_source_errors_exit_2_and_write_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, message: str
) -> None:
    path = tmp_path / "ann.json"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out"
    rc = cli.main(["ingest", str(path), "--out", str(out), "--workers", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and str(path) in err and message in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == (["ann.json"] if content else [])


def test_unreadable_tar_header_is_a_source_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = make_tar(tmp_path / "a.tar", [("k", {"png": image_bytes(), "txt": b"fine"})])
    bad = write(tmp_path / "b.tar", b"this is not a tar header" * 40)
    out = tmp_path / "out"
    rc = cli.main(["ingest", str(good), str(bad), "--out", str(out), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "unreadable tar" in err
    assert not out.exists()


def test_cli_ingest_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    rels = good_images(src, n=2)
    path = blip_json(src, [{"image": rels[0], "caption": "one"}, {"image": rels[1], "caption": ""}])
    out = tmp_path / "out"
    rc = cli.main(["ingest", str(path), "--out", str(out), "--kind", "human", "--workers", "1"])
    text = capsys.readouterr().out
    assert rc == 0 and "ingested 1 of 2 rows" in text and "empty_caption 1" in text
    assert set(manifest(out)["source"]) == {"human"}


@pytest.mark.slow
def test_process_pool_gives_identical_output(tmp_path: Path) -> None:
    src = tmp_path / "src"
    rels = good_images(src, n=40)
    rows = [{"image": r, "caption": f"caption {i}"} for i, r in enumerate(rels)]
    rows.append({"image": "images/missing.png", "caption": "gone"})
    path = blip_json(src, rows)
    one, two = tmp_path / "one", tmp_path / "two"
    ingest.run([SourceSpec(str(path))], one, cfg(workers=1, shard_size=7))
    ingest.run([SourceSpec(str(path))], two, cfg(workers=2, shard_size=7))
    assert manifest(one).equals(manifest(two)) and rejects(one).equals(rejects(two))
    for shard in sorted((one / "shards").iterdir()):
        assert shard.read_bytes() == (two / "shards" / shard.name).read_bytes()


def test_reject_vocabulary_matches_the_schema() -> None:
    assert set(reasons.REJECT_REASONS) == set(schemas.REJECT_REASONS)
