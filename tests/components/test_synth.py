"""Tests of the embedded corpus: determinism, formats, noise truth, the caption scorer, the CLI."""

import csv
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from components import synth
from components.cli import main
from components.config import NoiseMix, SynthConfig, parse_params
from components.errors import CapfiltError
from components.synth_score import load_scenes, parse_caption
from components.synth_world import (
    CELLS,
    COLOURS,
    SHAPES,
    Scene,
    SceneObject,
    colours_per_shape,
    draw_scene,
    is_consistent,
    sample_scene,
)

ROOT = Path(__file__).resolve().parents[2]
SMALL = SynthConfig(n_human=20, n_web=200, n_test=10)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    synth.run(SMALL, out)
    return out


def _tree_bytes(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): p.read_bytes() for p in files}


def _truth(corpus: Path) -> list[dict[str, str]]:
    with (corpus / "web" / "truth.csv").open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


# --- determinism and layout ---------------------------------------------------------------


def test_same_seed_gives_identical_bytes(corpus, tmp_path):
    again = tmp_path / "again"
    synth.run(SMALL, again)
    assert _tree_bytes(again) == _tree_bytes(corpus)


def test_other_seed_gives_other_corpus(corpus, tmp_path):
    other = tmp_path / "other"
    synth.run(SMALL.model_copy(update={"seed": 1}), other)
    a, b = _tree_bytes(corpus), _tree_bytes(other)
    assert a.keys() == b.keys()
    assert a["web/web.json"] != b["web/web.json"]
    assert a["human/images/human_000000.png"] != b["human/images/human_000000.png"]


def test_split_sizes_are_independent(corpus, tmp_path):
    bigger = tmp_path / "bigger"
    synth.run(SMALL.model_copy(update={"n_web": 220, "n_test": 12}), bigger)
    a, b = _tree_bytes(corpus), _tree_bytes(bigger)
    assert a["human/annotations.json"] == b["human/annotations.json"]
    web_images = {k: v for k, v in a.items() if k.startswith("web/images/")}
    assert web_images and all(b[k] == v for k, v in web_images.items())
    more_tests = tmp_path / "more_tests"
    synth.run(SMALL.model_copy(update={"n_test": 12}), more_tests)
    c = _tree_bytes(more_tests)
    assert {k: v for k, v in c.items() if not k.startswith("test/")} == {
        k: v for k, v in a.items() if not k.startswith("test/")
    }


def _pixels(folder: Path) -> dict[str, bytes]:
    out = {}
    for png in sorted(folder.glob("*.png")):
        with Image.open(png) as im:
            out[png.stem] = im.convert("RGB").tobytes()
    return out


def test_test_images_are_held_out_from_training_images(tmp_path):
    # one object, no jitter: 900 possible images, so 300 training draws repeat many of them
    cfg = SynthConfig(n_human=50, n_web=250, n_test=100, max_objects=1, jitter=0,
                      noise=NoiseMix(correct=1.0, wrong_attribute=0.0, other_image=0.0, junk=0.0))  # fmt: skip
    summary = synth.run(cfg, tmp_path / "data")
    train = {**_pixels(tmp_path / "data" / "human" / "images"),
             **_pixels(tmp_path / "data" / "web" / "images")}  # fmt: skip
    test = _pixels(tmp_path / "data" / "test" / "images")
    assert len(test) == 100
    assert len(set(test.values())) == 100  # no two test images alike
    assert not set(test.values()) & set(train.values())
    assert len(set(train.values())) < len(train)  # the training splits do repeat images
    assert summary.test_redrawn > 0
    assert f"({summary.test_redrawn} repeated draws redrawn)" in summary.describe()


def test_a_world_too_small_for_its_test_set_is_named(tmp_path):
    cfg = SynthConfig(n_human=5, n_web=40, n_test=901, max_objects=1, jitter=0,
                      noise=NoiseMix(correct=1.0, wrong_attribute=0.0, other_image=0.0, junk=0.0))  # fmt: skip
    with pytest.raises(CapfiltError, match=r"only \d+ of 901 test images.*synth.n_test"):
        synth.run(cfg, tmp_path / "data")
    assert list(tmp_path.iterdir()) == []


def test_human_split_is_coco_captions(corpus):
    coco = json.loads((corpus / "human" / "annotations.json").read_text())
    assert len(coco["images"]) == SMALL.n_human
    assert len(coco["annotations"]) == SMALL.n_human * SMALL.captions_per_image
    for im in coco["images"]:
        assert set(im) == {"id", "file_name", "width", "height"}
        with Image.open(corpus / "human" / "images" / im["file_name"]) as png:
            assert png.size == (im["width"], im["height"]) == (64, 64)
            assert png.mode == "RGB"
            assert not png.info  # no timestamps or other metadata
    by_image: dict[int, list[str]] = {}
    for a in coco["annotations"]:
        assert set(a) == {"id", "image_id", "caption"}
        by_image.setdefault(a["image_id"], []).append(a["caption"])
    assert all(len(set(c)) == SMALL.captions_per_image for c in by_image.values())


def test_web_and_test_splits_formats(corpus):
    web = json.loads((corpus / "web" / "web.json").read_text())
    assert len(web) == SMALL.n_web
    for r in web:
        assert set(r) == {"image", "caption"} and (corpus / "web" / r["image"]).is_file()
    test = json.loads((corpus / "test" / "test.json").read_text())
    assert len(test) == SMALL.n_test
    for r in test:
        assert (corpus / "test" / r["image"]).is_file()
        assert len(r["caption"]) == SMALL.captions_per_image
    truth = _truth(corpus)
    assert [r["image_id"] for r in truth] == [Path(r["image"]).stem for r in web]
    assert [r["text"] for r in truth] == [r["caption"] for r in web]
    scenes = synth.load_scenes(corpus / "test")
    assert sorted(scenes) == sorted(Path(r["image"]).stem for r in test)


def test_image_ids_are_globally_unique(corpus):
    stems = [p.stem for p in corpus.rglob("*.png")]
    assert len(stems) == len(set(stems)) == SMALL.n_human + SMALL.n_web + SMALL.n_test


def test_objects_stay_in_their_quadrant():
    rng = np.random.default_rng(0)
    for _ in range(300):
        scene = sample_scene(rng, 64, 4, 0.3, jitter=16)
        assert len({o.position for o in scene.objects}) == len(scene.objects)
        for o in scene.objects:
            row, col = CELLS[o.position]
            assert col * 32 < o.x and o.x + o.extent < (col + 1) * 32
            assert row * 32 < o.y and o.y + o.extent < (row + 1) * 32


def test_backgrounds_are_drawn_from_the_configured_set():
    rng = np.random.default_rng(0)
    seen = {sample_scene(rng, 64, 3, 0.2, jitter=1, backgrounds=["grey", "white"]).background
            for _ in range(200)}
    assert seen == {"grey", "white"}
    only = {sample_scene(rng, 64, 3, 0.2, jitter=1, backgrounds=["black"]).background for _ in range(50)}
    assert only == {"black"}
    with pytest.raises(CapfiltError, match="backgrounds"):
        parse_params({"synth": {"backgrounds": ["pink"]}})
    with pytest.raises(CapfiltError, match="backgrounds"):
        parse_params({"synth": {"backgrounds": []}})


def test_human_split_can_leave_shape_colour_pairs_to_the_web(tmp_path):
    table = colours_per_shape(2)
    assert all(len(c) == 2 for c in table.values())
    assert Counter(c for cs in table.values() for c in cs) == {c: 2 for c in COLOURS}  # each colour twice
    cfg = SMALL.model_copy(update={"n_human": 200, "n_web": 300, "n_test": 100, "human_colours_per_shape": 2})
    synth.run(cfg, tmp_path / "gap")
    pairs = {split: {(o.shape, o.colour) for s in load_scenes(tmp_path / "gap" / split).values() for o in s.objects}
             for split in ("human", "web", "test")}
    assert pairs["human"] == {(s, c) for s, cs in table.items() for c in cs}
    assert len(pairs["web"]) == len(pairs["test"]) == len(SHAPES) * len(COLOURS)
    with pytest.raises(CapfiltError, match="human_colours_per_shape"):
        parse_params({"synth": {"human_colours_per_shape": 0}})
    with pytest.raises(CapfiltError, match="colours per shape"):
        colours_per_shape(6)


def test_shapes_have_distinct_silhouettes():
    masks = {}
    for shape in SHAPES:
        obj = SceneObject(shape, "red", "small", "top left", 2, 2, 13)
        pixels = np.asarray(draw_scene(Scene("black", (obj,)), 64))[..., 0] > 0
        masks[shape] = pixels
    for a in SHAPES:
        for b in SHAPES:
            if a < b:
                iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
                assert iou < 0.65, (a, b, iou)


# --- noise ---------------------------------------------------------------------------------


def test_noise_quotas_are_exact(corpus):
    kinds = [r["noise"] for r in _truth(corpus)]
    want = synth.noise_quota(SMALL.noise, SMALL.n_web)
    assert want == {"correct": 90, "wrong_attribute": 20, "other_image": 50, "junk": 40}
    assert {k: kinds.count(k) for k in want} == want


def test_noise_quota_rounds_to_the_total():
    mix = NoiseMix(correct=0.3, wrong_attribute=0.3, other_image=0.3, junk=0.1)
    for n in (1, 7, 13, 101):
        counts = synth.noise_quota(mix, n)
        assert sum(counts.values()) == n
        assert all(abs(counts[k] - getattr(mix, k) * n) < 1 for k in counts)


def test_web_texts_are_true_or_false_as_labelled(corpus):
    scenes = synth.load_scenes(corpus / "web")
    for row in _truth(corpus):
        parsed = parse_caption(row["text"])
        if row["noise"] == "junk":
            assert parsed is None, row
            continue
        assert parsed is not None, row
        true = is_consistent(parsed.objects, scenes[row["image_id"]])
        assert true == (row["noise"] == "correct"), row


def test_other_image_texts_come_from_another_image(corpus):
    rows = {r["image_id"]: r for r in _truth(corpus)}
    others = [r for r in rows.values() if r["noise"] == "other_image"]
    assert others
    for r in others:
        source = rows[r["source_id"]]
        assert source["image_id"] != r["image_id"]
        assert source["noise"] == "correct" and source["text"] == r["text"]


def test_wrong_attribute_names_the_swap(corpus):
    details = [r["detail"] for r in _truth(corpus) if r["noise"] == "wrong_attribute"]
    assert details
    assert all(d.split(":")[0] in {"colour", "shape", "size", "position"} for d in details)


# --- the scorer ----------------------------------------------------------------------------


def test_human_captions_and_references_parse_back(corpus):
    coco = json.loads((corpus / "human" / "annotations.json").read_text())
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    pairs = [(names[a["image_id"]], a["caption"]) for a in coco["annotations"]]
    score = synth.score_captions(synth.load_scenes(corpus / "human"), pairs)
    assert score.to_dict() == {"n": len(pairs), "parsed": 1.0, "count": 1.0, "shape": 1.0,
                               "colour": 1.0, "size": 1.0, "position": 1.0, "strict": 1.0}
    assert max(len(c.split()) for _, c in pairs) <= 25
    test = json.loads((corpus / "test" / "test.json").read_text())
    refs = [(r["image"], c) for r in test for c in r["caption"]]
    assert synth.score_captions(synth.load_scenes(corpus / "test"), refs).strict == 1.0


def _scene(*objects: tuple[str, str, str, str]) -> Scene:
    return Scene("grey", tuple(SceneObject(s, c, z, p, 0, 0, 10) for s, c, z, p in objects))


SCENE = _scene(("ring", "red", "large", "top left"), ("ring", "red", "large", "top right"),
               ("square", "blue", "small", "bottom left"))  # fmt: skip


@pytest.mark.parametrize(
    "caption",
    [
        "a picture of two large red rings at the top and a small blue square in the lower left",
        "at the bottom left there is a small blue square, two large red rings along the top",
        "a large red ring in the top left corner, a small blue square below it and a large red "
        "ring at the top right",
        "there are two large red rings in the upper left and upper right corners and a small "
        "blue square at the bottom left",
    ],
)
def test_paraphrases_score_strictly_correct(caption):
    assert synth.score_captions({"x": SCENE}, [("images/x.png", caption)]).strict == 1.0


def test_wrong_colour_is_caught():
    caption = "two large red rings at the top and a small green square at the bottom left"
    score = synth.score_captions({"x": SCENE}, [("x", caption)])
    assert score.strict == 0.0 and score.colour == pytest.approx(2 / 3)
    assert score.shape == score.size == score.position == score.count == 1.0


def test_partial_and_unparseable_captions():
    score = synth.score_captions({"x": SCENE}, [("x", "a red ring"), ("x", "IMG_2931.jpg")])
    assert score.parsed == 0.5 and score.count == 0.0 and score.strict == 0.0
    assert score.shape == pytest.approx(1 / 6)  # one of 3 true objects named, in 1 of 2 captions
    assert score.position == 0.0


@pytest.mark.parametrize(
    ("caption", "misplaced"),
    [  # per PLACEMENT_ERRORS: in another object's cell, in an empty cell, not placed
        ("a large red ring in the top left corner, a large red ring at the top right and a small "
         "blue square at the bottom left", (0, 0, 0)),
        # the right cells, the square and a ring bound to each other's
        ("a small blue square at the top right and two large red rings at the top left and the "
         "bottom left", (2, 0, 0)),
        ("a small blue square at the bottom right and two large red rings at the top", (0, 1, 0)),
        ("a large red ring in the top left corner, a large red ring at the bottom right and a small "
         "blue square at the top right", (1, 1, 0)),
        ("a small blue square in the lower left and a large red ring in the upper left", (0, 0, 1)),
        ("two large red rings", (0, 0, 3)),
        ("IMG_2931.jpg", (0, 0, 3)),
    ],
)
def test_misplaced_objects_are_told_apart_by_where_they_are_put(caption, misplaced):
    from components.synth_score import PLACEMENT_ERRORS, caption_hits

    hits = caption_hits(SCENE, caption)
    assert dict(zip(PLACEMENT_ERRORS, hits.misplaced, strict=True)) == dict(
        zip(PLACEMENT_ERRORS, misplaced, strict=True))
    placed_right = hits.hits[3]  # ATTRIBUTES' position
    assert placed_right + sum(hits.misplaced) == hits.objects == 3


def test_relation_and_pair_parsing():
    parsed = parse_caption("a small blue square at the top right and a red ring to its left")
    assert [o.position for o in parsed.objects] == ["top right", "top left"]
    parsed = parse_caption("a red ring on the left")  # a column cannot place one object
    assert parsed.objects[0].position is None
    assert len(parse_caption("red rings").objects) == 2


def test_scorer_rejects_unknown_images():
    with pytest.raises(CapfiltError, match="nope"):
        synth.score_captions({"x": SCENE}, [("nope.png", "a red ring")])
    with pytest.raises(CapfiltError, match="no captions"):
        synth.score_captions({"x": SCENE}, [])


def test_load_scenes_names_bad_files(tmp_path):
    with pytest.raises(CapfiltError, match="no scenes.jsonl or truth.csv"):
        synth.load_scenes(tmp_path)
    (tmp_path / "scenes.jsonl").write_text('{"image_id": "a", "scene": {"objects": []}}\n{oops\n')
    with pytest.raises(CapfiltError, match=r"scenes.jsonl:1"):
        synth.load_scenes(tmp_path)


# --- config and CLI ------------------------------------------------------------------------


def test_config_rejects_worlds_the_grid_cannot_hold():
    with pytest.raises(CapfiltError, match="synth.max_objects"):
        parse_params({"synth": {"max_objects": 5}})
    with pytest.raises(CapfiltError, match="synth.image_size"):
        parse_params({"synth": {"image_size": 63}})


def _cli(tmp_path: Path, *extra: str) -> int:
    return main(["synth", "--params", str(ROOT / "params.yaml"), "--set", "synth.n_human=5",
                 "--set", "synth.n_web=40", "--set", "synth.n_test=5", *extra])  # fmt: skip


def test_cli_writes_refuses_and_previews(tmp_path, capsys):
    out = tmp_path / "data"
    preview = tmp_path / "p.png"
    assert _cli(tmp_path, "--out", str(out), "--seed", "3", "--preview", str(preview)) == 0
    printed = capsys.readouterr().out
    assert "seed 3" in printed and "40 images" in printed
    with Image.open(preview) as sheet:
        assert sheet.width > 400 and sheet.height > 400
    assert _cli(tmp_path, "--out", str(out)) == 2
    assert "remove it first" in capsys.readouterr().err
    inside = tmp_path / "d2" / "p.png"
    assert _cli(tmp_path, "--out", str(tmp_path / "d2"), "--preview", str(inside)) == 2
    assert "outside the corpus folder" in capsys.readouterr().err
    assert not (tmp_path / "d2").exists()


def test_failed_run_leaves_nothing(tmp_path, monkeypatch):
    def boom(*_args):
        raise CapfiltError("disk full")

    monkeypatch.setattr(synth, "_write_test", boom)
    with pytest.raises(CapfiltError, match="disk full"):
        synth.run(SMALL, tmp_path / "data")
    assert list(tmp_path.iterdir()) == []


# --- the pinned default corpus -------------------------------------------------------------


def _dvc_dir_md5(path: Path, scratch: Path) -> str:
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    fs = LocalFileSystem()
    _, _, obj = build(HashFileDB(fs, str(scratch)), str(path), fs, "md5", dry_run=True)
    return obj.hash_info.value


@pytest.mark.slow
def test_default_corpus_matches_data_dvc(tmp_path):
    pinned = yaml.safe_load((ROOT / "data.dvc").read_text())["outs"][0]
    cfg = parse_params(yaml.safe_load((ROOT / "params.yaml").read_text())).synth
    assert cfg.seed == 0
    first, second = tmp_path / "a" / "data", tmp_path / "b" / "data"
    synth.run(cfg, first)
    synth.run(cfg, second)
    assert _dvc_dir_md5(first, tmp_path / "odb") == pinned["md5"]
    assert _dvc_dir_md5(second, tmp_path / "odb") == pinned["md5"]
    assert sum(1 for p in first.rglob("*") if p.is_file()) == pinned["nfiles"]
