"""Every source format reads correctly into the same manifest rows (fixtures built here)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from ingest_helpers import blip_json, cfg, good_images, image_bytes, make_tar, manifest, reasons_by_ref

from components import formats, ingest
from components.errors import CapfiltError
from components.formats import SourceSpec, detect_format, resolve


def _pairs(out: Path) -> list[tuple[str, str]]:
    df = manifest(out)
    return sorted(zip(df["image_key"], df["caption"], strict=True))


def test_coco(tmp_path: Path) -> None:
    root = tmp_path / "coco"
    good_images(root, n=2)
    ann = {
        "images": [{"id": 10, "file_name": "good_0.png"}, {"id": 11, "file_name": "good_1.png"},
                   {"id": 12, "file_name": "no_captions.png"}],
        "annotations": [{"id": 1, "image_id": 10, "caption": "zero a"},
                        {"id": 2, "image_id": 11, "caption": "one"},
                        {"id": 3, "image_id": 10, "caption": "zero b"},
                        {"id": 4, "image_id": 99, "caption": "orphan"}],
    }  # fmt: skip
    path = root / "captions_train.json"
    path.write_text(json.dumps(ann))
    out = tmp_path / "out"
    ingest.run([SourceSpec(str(path), image_root=str(root / "images"))], out, cfg(), "human")
    assert _pairs(out) == [("good_0.png", "zero a"), ("good_0.png", "zero b"), ("good_1.png", "one")]
    assert reasons_by_ref(out) == {f"{path}:3": "no_image_for_annotation"}
    assert list(manifest(out)["sample_id"]) == ["good_0.png#0", "good_0.png#1", "good_1.png#0"]


def test_karpathy_train_and_test(tmp_path: Path) -> None:
    root = tmp_path / "k"
    rels = good_images(root, n=2)
    train = blip_json(root, [{"image": rels[0], "caption": "a", "image_id": "x0"},
                             {"image": rels[0], "caption": "b", "image_id": "x0"},
                             {"image": rels[1], "caption": "c", "image_id": "x1"}], "train.json")  # fmt: skip
    test = blip_json(root, [{"image": rels[0], "caption": ["r1", "r2"]},
                            {"image": rels[1], "caption": ["r3"]}], "test.json")  # fmt: skip
    assert formats.json_kind(json.loads(train.read_text()), "t") == "karpathy"
    assert formats.json_kind(json.loads(test.read_text()), "t") == "karpathy"
    out = tmp_path / "out"
    s = ingest.run([SourceSpec(str(train)), SourceSpec(str(test))], out, cfg(), "human")
    assert [src["format"] for src in s.sources] == ["karpathy", "karpathy"]
    assert [c for _, c in _pairs(out)] == ["a", "b", "r1", "r2", "c", "r3"]
    assert f"{test}:0.1" in set(manifest(out)["ref"])
    assert manifest(out)["sample_id"].is_unique


def test_blip_json_with_absolute_paths_inside_root(tmp_path: Path) -> None:
    root = tmp_path / "blip"
    rels = good_images(root, n=2)
    path = blip_json(tmp_path, [{"image": str(root / rels[0]), "caption": "abs"},
                                {"image": rels[1], "caption": "rel"}])  # fmt: skip
    assert formats.json_kind(json.loads(path.read_text()), "t") == "blip"
    out = tmp_path / "out"
    ingest.run([SourceSpec(str(path), image_root=str(root))], out, cfg())
    assert _pairs(out) == [("images/good_0.png", "abs"), ("images/good_1.png", "rel")]


def test_webdataset_folder_with_json_members(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    make_tar(shards / "00000.tar", [
        ("00000/000001", {"jpg": image_bytes(seed=1, fmt="JPEG"), "txt": b"from txt",
                          "json": json.dumps({"caption": "ignored", "url": "u"}).encode()}),
        ("00000/000002", {"webp": image_bytes(seed=2, fmt="WEBP"),
                          "json": json.dumps({"caption": "from json"}).encode()}),
    ])  # fmt: skip
    make_tar(shards / "00001.tar", [
        ("00001/000001", {"png": image_bytes(seed=3), "txt": b"second shard"}),
        ("00001/000002", {"txt": b"caption without image"}),
    ])  # fmt: skip
    (shards / "00000.parquet").write_bytes(b"img2dataset metadata, not a shard")
    assert detect_format(str(shards)) == "webdataset"
    out = tmp_path / "out"
    ingest.run([SourceSpec(str(shards))], out, cfg())
    assert _pairs(out) == [("00000/000001", "from txt"), ("00000/000002", "from json"),
                           ("00001/000001", "second shard")]  # fmt: skip
    assert reasons_by_ref(out) == {f"{shards / '00001.tar'}:00001/000002": "no_image_for_annotation"}


@pytest.mark.parametrize("ext", ["csv", "parquet"])
def test_tables_with_default_and_named_columns(tmp_path: Path, ext: str) -> None:
    root = tmp_path / "t"
    rels = good_images(root, n=2)
    df = pd.DataFrame({"filepath": rels + [""], "text": ["one", "two", "three"]})
    path = root / f"pairs.{ext}"
    df.to_csv(path, index=False) if ext == "csv" else df.to_parquet(path)
    out = tmp_path / "out"
    ingest.run([SourceSpec(str(path))], out, cfg())
    assert _pairs(out) == [("images/good_0.png", "one"), ("images/good_1.png", "two")]
    assert reasons_by_ref(out) == {f"{path}:2": "no_image_for_annotation"}
    renamed = df.rename(columns={"filepath": "img", "text": "alt"})
    renamed.to_csv(path, index=False) if ext == "csv" else renamed.to_parquet(path)
    with pytest.raises(CapfiltError, match="none of the columns"):
        ingest.run([SourceSpec(str(path))], out, cfg())
    spec = SourceSpec(str(path), image_column="img", caption_column="alt")
    ingest.run([spec], out, cfg())
    assert len(manifest(out)) == 2
    with pytest.raises(CapfiltError, match="no column 'nope'"):
        ingest.run([SourceSpec(str(path), image_column="nope")], out, cfg())


def test_parquet_non_string_caption(tmp_path: Path) -> None:
    root = tmp_path / "t"
    rels = good_images(root, n=2)
    path = root / "p.parquet"
    pd.DataFrame({"image": rels, "caption": [1.5, 2.5]}).to_parquet(path)
    out = tmp_path / "out"
    ingest.run([SourceSpec(str(path))], out, cfg())
    assert set(reasons_by_ref(out).values()) == {"non_string_caption"}


def test_detect_format_by_extension_and_content(tmp_path: Path) -> None:
    assert detect_format("x/a.tar") == "webdataset"
    assert detect_format("x/a.tsv") == "csv"
    assert detect_format("x/a.parquet") == "parquet"
    assert detect_format("x/a.json") == "json"
    coco = {"images": [], "annotations": []}
    assert formats.json_kind(coco, "f") == "coco"
    assert formats.json_kind([{"image": "a", "caption": "b"}], "f") == "blip"
    with pytest.raises(CapfiltError, match="a folder with no .tar.* shards.*pass --format"):
        detect_format(str(tmp_path))
    with pytest.raises(CapfiltError, match="missing: source not found"):
        detect_format(str(tmp_path / "missing"))
    (tmp_path / "captions.txt").write_text("a red ring\n")
    with pytest.raises(CapfiltError, match="from its name; pass --format"):
        detect_format(str(tmp_path / "captions.txt"))


@pytest.mark.parametrize("rel, ok", [
    ("images/a.png", True), ("./images/../images/a.png", True), ("../a.png", False),
    ("images/../../a.png", False), ("/etc/passwd", False), ("s3://other/a.png", False),
])  # fmt: skip
def test_resolve_refuses_escapes(rel: str, ok: bool) -> None:
    key, where = resolve("/data/root", rel)
    if ok:
        assert key == "images/a.png" and where == "/data/root/images/a.png"
    else:
        assert key is None and where.reason == "path_escapes_root"
