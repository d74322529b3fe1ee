"""The evaluate stage: metrics on hand-made cases, and the whole stage on tiny random models."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from components import bootstrap, evaluate, report
from components.batch_inference import Images, device, load_filter
from components.config import EvaluateConfig, SynthConfig
from components.distributed import RankInfo
from components.phrases import phrases
from components.schemas import read_manifest

sys.path.insert(0, str(Path(__file__).parent))
from capfilt_fixtures import SPLIT, boot_cfg, lenient_validation, make_world, write_truth  # noqa: E402


@pytest.fixture(scope="module")
def synth_test(tmp_path_factory):
    """A tiny embedded corpus: its test references and scenes."""
    from components import synth
    from components.synth_score import load_scenes

    out = tmp_path_factory.mktemp("synth") / "data"
    synth.run(SynthConfig(n_human=2, n_web=4, n_test=12), out)
    rows = json.loads((out / "test" / "test.json").read_text())
    refs = {r["image"]: r["caption"] for r in rows}
    return refs, load_scenes(out / "test")


def test_perfect_captions_score_full_attribute_accuracy_and_high_cider(synth_test):
    refs, scenes = synth_test
    perfect = {k: r[0] for k, r in refs.items()}
    keys = list(refs)
    shuffled = {k: refs[keys[(i + 1) % len(keys)]][0] for i, k in enumerate(keys)}
    good = {**evaluate.caption_scores(perfect, refs), **evaluate.attribute_scores(perfect, scenes)}
    bad = {**evaluate.caption_scores(shuffled, refs), **evaluate.attribute_scores(shuffled, scenes)}
    assert good["attribute_accuracy"] == 1.0 and good["strict_accuracy"] == 1.0
    assert good["bleu4"] > 0.9 and good["cider"] > 2.0
    assert bad["strict_accuracy"] < 0.5 and bad["cider"] < good["cider"] / 3


def test_novel_shape_colour_pairs_are_scored_apart(synth_test):
    from components.significance import Tally
    from components.synth_score import pair_hits, shape_colour_pairs
    from components.synth_world import Scene, SceneObject

    two = Scene("black", (SceneObject("ring", "red", "small", "top left", 0, 0, 12),
                          SceneObject("bar", "blue", "large", "bottom right", 32, 32, 24)))
    known = {("ring", "red")}
    assert pair_hits(two, "a small red ring in the top left and a large blue bar in the bottom right", known) == (1, 1, 1, 1)
    assert pair_hits(two, "a small red ring in the top left and a large blue ring in the bottom right", known) == (1, 1, 1, 0)
    assert pair_hits(two, "a large red bar in the bottom right", known) == (1, 0, 1, 0)  # red goes with the ring
    assert pair_hits(two, "nothing at all", known) == (1, 0, 1, 0)
    refs, scenes = synth_test
    perfect = {k: r[0] for k, r in refs.items()}
    everything = shape_colour_pairs(scenes.values())
    full = evaluate.attribute_scores(perfect, scenes, known_pairs=everything)
    assert full["known_pair_accuracy"] == 1.0 and full["novel_pair_accuracy"] is None
    assert "novel_pair_accuracy" not in evaluate.attribute_scores(perfect, scenes)
    some = set(sorted(everything)[: len(everything) // 2])
    keys = list(refs)
    shuffled = {k: refs[keys[(i + 1) % len(keys)]][0] for i, k in enumerate(keys)}
    tally = Tally()
    split = evaluate.attribute_scores(shuffled, scenes, tally, known_pairs=some)
    assert 0.0 <= split["novel_pair_accuracy"] < 1.0 and 0.0 <= split["known_pair_accuracy"] < 1.0
    for name in ("known_pair_accuracy", "novel_pair_accuracy"):
        assert tally.value(name) == pytest.approx(split[name])


def test_per_image_tallies_add_up_to_the_reported_metrics(synth_test):
    from components.significance import Tally

    refs, scenes = synth_test
    keys = list(refs)
    mixed = {k: refs[keys[(i + 1) % len(keys)]][0] if i % 3 == 0 else refs[k][0] for i, k in enumerate(keys)}
    tally = Tally()
    metrics = {**evaluate.caption_scores(mixed, refs, tally), **evaluate.attribute_scores(mixed, scenes, tally)}
    assert 0.0 < metrics["strict_accuracy"] < 1.0
    from components.synth_score import score_captions

    counted = score_captions(scenes, mixed.items())  # the scorer's own totals
    assert metrics["strict_accuracy"] == pytest.approx(counted.strict)
    assert [metrics[f"{a}_accuracy"] for a in ("shape", "colour", "size", "position")] == pytest.approx(
        [counted.shape, counted.colour, counted.size, counted.position])
    misplaced = [metrics[k] for k in evaluate.PLACEMENT_KEYS.values()]
    assert sum(misplaced) > 0 and metrics["position_accuracy"] + sum(misplaced) == pytest.approx(1.0)
    for name in ("cider", "attribute_accuracy", "strict_accuracy", "shape_accuracy", "position_accuracy",
                 *evaluate.PLACEMENT_KEYS.values()):
        assert tally.value(name) == pytest.approx(metrics[name]), name
        assert len(tally.parts[name][0]) == len(keys)
    rng = np.random.default_rng(1)
    text_image = np.repeat(np.arange(6), [1, 2, 3, 1, 2, 3])  # unequal captions per image
    tally = Tally()
    r = evaluate.recall_at_k(rng.random((6, 12)), rng.random((12, 6)), text_image, ks=(1, 5), tally=tally)
    for name in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5"):
        assert tally.value(name) == pytest.approx(r[name]), name


def test_synthetic_captions_are_ranked_by_filter_and_confidence_against_their_scenes():
    from components.synth_world import Scene, SceneObject

    scene = Scene("black", (SceneObject("ring", "red", "large", "top left", 0, 0, 10),))
    truth = pd.DataFrame({"noise": ["correct"]}, index=["w0"])
    right, wrong = "a large red ring in the top left corner", "a large blue ring in the top left corner"
    decisions = pd.DataFrame({
        "image_key": ["images/w0.png"] * 4, "source": ["web", "synthetic", "synthetic", "synthetic"],
        "caption": ["red ring", right, wrong, wrong], "itm_score": 0.9, "score": [0.9, 0.5, 0.7, 0.4],
        "caption_confidence": [np.nan, 0.9, 0.2, 0.1], "kept": True})
    f = evaluate.filter_quality(decisions, truth, {"w0": scene})
    assert f["synthetic_auroc_exact"] == {"filter": 0.5, "confidence": 1.0}  # 0.5 vs (0.7, 0.4); 0.9 vs both
    assert f["synthetic_kept_wrong_fraction"] == pytest.approx(2 / 3)
    assert f["synthetic_other_object"] == {"kept": None, "removed": None}  # one object: nothing to swap with
    two = Scene("black", (*scene.objects, SceneObject("square", "blue", "small", "bottom right", 40, 40, 8)))
    swapped = "a large red ring at the bottom right and a small blue square in the top left corner"
    syn2 = decisions.assign(caption=["red ring", right + " and a small blue square at the bottom right",
                                     swapped, "a large red ring at the bottom left"],
                            kept=[True, True, False, False])
    f2 = evaluate.filter_quality(syn2, truth, {"w0": two})
    # kept: the right caption (0 of 2 objects); removed: both objects swapped (2 of 2) and one ring
    # in an empty cell with the square left out (0 of 2)
    assert f2["synthetic_other_object"] == {"kept": 0.0, "removed": pytest.approx(2 / 4)}
    f = evaluate.filter_quality(decisions.assign(caption_confidence=np.nan), truth, {"w0": scene})
    assert f["synthetic_auroc_exact"]["confidence"] is None  # not scored: not made up
    assert "synthetic_auroc_exact" not in evaluate.filter_quality(decisions, truth, None)  # no scenes


def test_simple_tokens_stand_in_for_ptb():
    assert evaluate.simple_tokens("A Red-ring, at the TOP.") == "a red ring at the top"


def test_perfect_similarity_gives_recall_one():
    text_image = np.repeat(np.arange(5), 2)  # two captions per image
    sim = (np.arange(5)[:, None] == text_image[None, :]).astype(float)  # (5, 10)
    r = evaluate.recall_at_k(sim, sim.T, text_image)
    assert r["i2t_r1"] == r["t2i_r1"] == 1.0


def test_recall_counts_best_caption_and_ties_against_the_query():
    text_image = np.array([0, 0, 1])
    i2t = np.array([[0.1, 0.9, 0.5], [0.5, 0.5, 0.5]])  # image 1 ties all: rank 0 only if strictly
    t2i = np.array([[0.2, 0.1], [0.0, 0.3], [0.9, 0.1]])
    r = evaluate.recall_at_k(i2t, t2i, text_image, ks=(1, 2))
    assert r["i2t_r1"] == 1.0  # image 0's second caption is top; image 1 has no higher score
    assert r["t2i_r1"] == pytest.approx(1 / 3) and r["t2i_r2"] == 1.0


def test_random_scores_give_chance_recall():
    rng = np.random.default_rng(0)
    n = 400
    text_image = np.arange(n)
    r = evaluate.recall_at_k(rng.random((n, n)), rng.random((n, n)), text_image, ks=(1, 10))
    assert r["t2i_r1"] < 0.02 and r["i2t_r1"] < 0.02
    assert 0.01 < r["t2i_r10"] < 0.05


def test_auroc_on_hand_made_scores():
    assert evaluate.auroc(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0], bool)) == 1.0
    assert evaluate.auroc(np.array([0.1, 0.2, 0.9, 0.8]), np.array([1, 1, 0, 0], bool)) == 0.0
    assert evaluate.auroc(np.array([0.5, 0.5, 0.5]), np.array([1, 0, 0], bool)) == 0.5
    assert evaluate.auroc(np.array([0.9, 0.4, 0.5, 0.1]), np.array([1, 1, 0, 0], bool)) == 0.75
    rng = np.random.default_rng(1)
    s, y = rng.integers(0, 5, 60).astype(float), rng.random(60) < 0.4
    brute = np.mean([(a > b) + 0.5 * (a == b) for a, b in itertools.product(s[y], s[~y])])
    assert evaluate.auroc(s, y) == pytest.approx(brute)
    assert np.isnan(evaluate.auroc(np.array([0.3]), np.array([True])))


def test_filter_quality_on_hand_made_decisions():
    truth = pd.DataFrame({"noise": ["correct", "correct", "junk", "other_image"]},
                         index=["w0", "w1", "w2", "w3"])
    decisions = pd.DataFrame({
        "image_key": [f"images/w{i}.png" for i in range(4)], "source": "web",
        "caption": "x", "itm_score": [0.9, 0.3, 0.2, 0.6], "kept": [True, False, False, True]})
    f = evaluate.filter_quality(decisions, truth, None)
    assert f["auroc"] == 0.75  # clean (0.9, 0.3) vs noisy (0.2, 0.6): 3 of 4 pairs ordered
    assert f["precision"] == 0.5 and f["recall"] == 0.5
    assert f["kept_fraction_by_kind"] == {"correct": 0.5, "junk": 0.0, "other_image": 1.0}
    assert f["auroc_itm"] == 0.75 and f["auroc_itc"] is None  # no ITC column: not made up
    assert f["auroc_itm_itc"] is None  # nor their sum
    assert f["auroc_by_kind"] == {"junk": 1.0, "other_image": 0.5}  # (0.9, 0.3) vs 0.2; vs 0.6
    assert f["auroc_by_attribute"] == {}  # no wrong_attribute texts, no split
    swapped = pd.DataFrame({"noise": ["correct", "correct", "wrong_attribute", "wrong_attribute"],
                            "attribute": ["", "", "shape", "colour"]}, index=["w0", "w1", "w2", "w3"])
    f = evaluate.filter_quality(decisions, swapped, None)
    assert f["auroc_by_attribute"] == {"colour": 0.5, "shape": 1.0}  # 0.6 vs (0.9, 0.3); 0.2 vs both
    assert f["auroc_by_presence"] == {}  # no scenes read: no presence split
    # w2 says "ring" where the image has none; w3 "blue" where a blue object is elsewhere
    scene = json.dumps({"objects": [{"shape": "square", "colour": "red"}, {"shape": "bar", "colour": "blue"}]})
    rows = [{"noise": "wrong_attribute", "detail": "shape:square->ring", "scene": scene},
            {"noise": "wrong_attribute", "detail": "colour:red->blue", "scene": scene},
            {"noise": "wrong_attribute", "detail": "colour:red->blue", "scene": "not json"},
            {"noise": "correct", "detail": "", "scene": scene}]
    assert [evaluate._presence(r) for r in rows] == ["absent", "elsewhere", "", ""]
    f = evaluate.filter_quality(decisions, swapped.assign(presence=["", "", "absent", "elsewhere"]), None)
    assert f["auroc_by_presence"] == {"colour": {"elsewhere": 0.5}, "shape": {"absent": 1.0}}
    # the decision's own score (here ITM + ITC) is what `auroc` ranks; ITM and ITC alone beside it
    f = evaluate.filter_quality(decisions.assign(score=[2.0, 1.0, -1.0, 0.5], itc_score=[0.4, 0.1, 0.2, 0.3]),
                                truth, None)
    assert f["auroc"] == 1.0 and f["auroc_itm"] == 0.75 and f["auroc_itc"] == 0.5
    assert f["auroc_itm_itc"] is None  # no temperature given: the sum is not made up either
    # with the filter's temperature: log-odds + cosine / temp, as `signal: itm_itc` would score
    f = evaluate.filter_quality(decisions.assign(itc_score=[0.4, 0.1, 0.2, 0.3]), truth, None, temp=0.1)
    logit = np.log(np.array([0.9, 0.3, 0.2, 0.6]) / (1 - np.array([0.9, 0.3, 0.2, 0.6])))
    summed = logit + np.array([0.4, 0.1, 0.2, 0.3]) / 0.1  # 6.2, 0.15, 0.61, 3.41
    assert f["auroc_itm_itc"] == evaluate.auroc(summed, np.array([1, 1, 0, 0], bool)) == 0.5


def test_decoding_row_is_the_removed_fraction_of_synthetic_captions():
    decisions = pd.DataFrame({"source": ["web", "synthetic", "synthetic", "synthetic", "synthetic"],
                              "image_key": list("abcde"), "caption": ["x", "a", "b", "", "c"],
                              "kept": [False, True, False, False, True]})
    assert evaluate.decoding_row(decisions, None) == {"synthetic": 4, "noise_ratio": 0.5}
    assert evaluate.decoding_row(decisions[decisions["source"] == "web"], None)["noise_ratio"] is None


def test_shuffled_captions_give_chance_recall_with_a_random_model(tmp_path):
    torch.set_num_threads(1)
    world = make_world(tmp_path)
    test = read_manifest(world.test, "ingested")
    cfg = EvaluateConfig(test_manifest=str(world.test), k_test=4, batch_size=4)
    filt = load_filter(world.filter, device())
    images = Images(world.test.parent)
    firsts = test.drop_duplicates("image_key")
    tensor = images.tensor(images.load(firsts["shard"].tolist(), firsts["member"].tolist()), filt.image_size, device())
    images.close()
    texts = test["caption"].tolist()
    shuffled = np.random.default_rng(0).permutation(len(texts))
    text_image = test["image_key"].map({k: i for i, k in enumerate(firsts["image_key"])}).to_numpy()
    with torch.inference_mode():
        r = evaluate.retrieval(filt, tensor, [texts[i] for i in shuffled], text_image, cfg)
    assert r["t2i_r1"] <= 0.5 and r["i2t_r1"] <= 0.5  # chance: 1/8 and ~1/4 on 8 images
    assert r["t2i_r10"] == 1.0  # k >= images: everything is ranked


def test_topk_itm_scores_each_pair_once_and_like_one_pair_alone(tmp_path):
    torch.set_num_threads(1)
    world = make_world(tmp_path)
    filt = load_filter(world.filter, device())
    torch.manual_seed(0)
    image = torch.rand(3, 3, filt.image_size, filt.image_size)
    texts = ["a red circle", "two small blue squares at the top left and a green star", "star", "a big cat"]
    ids, mask = evaluate.tokenize(filt.tokenizer, texts, EvaluateConfig(test_manifest="x").text, device())
    pairs_img = torch.tensor([2, 0, 1, 0, 2, 1, 0])  # (0, 1) and (2, 3) asked twice
    pairs_txt = torch.tensor([3, 1, 2, 1, 3, 0, 2])
    calls = []
    real = filt.model.itm_logits
    filt.model.itm_logits = lambda *a: calls.append(a[1].shape[0]) or real(*a)
    with torch.inference_mode():
        embeds = filt.model.encode_image(image)
        got = evaluate._topk_itm(filt, embeds, ids, mask, pairs_img, pairs_txt, chunk=2)
        alone = [real(embeds[i : i + 1], ids[t : t + 1], mask[t : t + 1], torch.zeros(1, dtype=torch.long))[0, 1]
                 for i, t in zip(pairs_img.tolist(), pairs_txt.tolist())]
    assert sum(calls) == 5  # 7 pairs, 5 distinct
    torch.testing.assert_close(got, torch.stack(alone).float(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_stage_writes_metrics_plots_and_a_self_contained_report(tmp_path):
    torch.set_num_threads(1)
    world = make_world(tmp_path, n_web=12)
    bootstrap.run(boot_cfg(world, tmp_path / "boot", itm_threshold=SPLIT, phrases={"min_texts": 1}),
                  lenient_validation(), RankInfo(0, 1, 0))
    bootstrap.run(boot_cfg(world, tmp_path / "greedy", itm_threshold=SPLIT, decoding="greedy"),
                  lenient_validation(), RankInfo(0, 1, 0))
    write_truth(tmp_path / "web", 12)
    cfg = EvaluateConfig(test_manifest=str(world.test), round1_captioner=str(world.captioner),
                         round1_filter=str(world.filter), round2_captioner=str(world.captioner),
                         round2_filter=str(world.filter), bootstrap=str(tmp_path / "boot"),
                         web_manifest=str(world.web), test_scenes=str(tmp_path / "none"),
                         web_truth=str(tmp_path / "web"), out=str(tmp_path / "eval"), k_test=4,
                         grid_images=5, threads=1, decoding_runs=[str(tmp_path / "greedy")],
                         train_manifests=[str(world.human), str(world.web)])
    evaluate.run(cfg)
    out = tmp_path / "eval"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_set"] == {"images": 8, "distinct_images": 8, "seen_in_training": 0,
                                   "by_manifest": {str(world.human): 0, str(world.web): 0}}
    for key in evaluate.HEADLINE:
        assert key in metrics["round1"] and key in metrics["round2"] and key in metrics["gain"]
    assert metrics["round1"]["attribute_accuracy"] is None  # no scenes: skipped, not failed
    assert metrics["gain"]["i2t_r1"] == 0.0  # the same models twice
    intervals = metrics["gain_interval"]["metrics"]
    assert "bleu4" not in intervals and {"cider", "i2t_r1", "t2i_r5"} <= set(intervals)
    for iv in intervals.values():  # the same models twice: every resample ties
        assert iv["gain"] == iv["low"] == iv["high"] == 0.0 and iv["above_zero"] == 0.5
    assert "gain_low" in pd.read_csv(out / "plots" / "rounds.csv").columns
    f = metrics["filter"]
    assert set(f["kept_fraction_by_kind"]) == {"correct", "junk", "other_image", "wrong_attribute"}
    assert 0.0 <= f["auroc"] <= 1.0 and f["itm_threshold"] == SPLIT == f["score_threshold"]
    assert f["signal"] == "itm" and f["auroc"] == f["auroc_itm"] and 0.0 <= f["auroc_itc"] <= 1.0
    assert f["itc_temperature"] > 0 and 0.0 <= f["auroc_itm_itc"] <= 1.0
    assert set(f["auroc_by_kind"]) == {"junk", "other_image", "wrong_attribute"}
    assert set(f["auroc_by_attribute"]) == {"shape"}  # truth.csv's detail "shape:square->ring"
    assert f["auroc_by_presence"].keys() == {"shape"} and f["auroc_by_presence"]["shape"].keys() == {"absent"}
    runs = {row["bootstrap"]: (label, row) for label, row in metrics["decoding"].items()}
    assert set(runs) == {str(tmp_path / "boot"), str(tmp_path / "greedy")}
    for root, (label, row) in runs.items():
        scores = pd.read_parquet(Path(root) / "scores.parquet")
        syn = scores[scores["kind"] == "synthetic"]
        assert label.startswith("greedy(" if root.endswith("greedy") else "nucleus(")
        assert row["synthetic"] == len(syn) and row["noise_ratio"] == pytest.approx((syn["reason"] != "").mean())
        assert 0.0 <= row["wrong_fraction"] <= 1.0
    for name in ("rounds", "itm_hist"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert len(pd.read_csv(out / "plots" / f"{name}.csv")) > 0
    page = (out / "report.html").read_text()
    assert "Test set: 8 images, none byte-identical" in page
    assert "Captions by attribute" not in page  # real data: no scenes, no attribute table
    assert page.count("Synthetic captions by decoding") == 1
    assert page.count('class="card"') == 5 and "http" not in page and "<script" not in page
    assert page.count("data:image/png;base64,") == 2 + 5
    decisions = evaluate.web_decisions(cfg)
    assert page.count('class="removed"') + page.count('class="kept"') >= 5  # a web line per card at least
    removed_web = decisions.loc[(decisions["source"] == "web") & ~decisions["kept"], "caption"]
    for text in removed_web:
        if text in page:  # every removed web text on the page is struck through
            assert f'<span class="removed">{text}</span>' in page
    assert 'class="removed"' in page and 'class="kept"' in page  # SPLIT keeps some, removes some
    # the bootstrap's phrase table, re-counted from the decisions, is in metrics.json and the page
    unseen = metrics["unseen_phrases"]
    assert unseen == json.loads((tmp_path / "boot" / "metrics.json").read_text())["unseen_phrases"]
    web_rows = decisions[decisions["source"] == "web"]
    assert unseen["texts"] == len(web_rows) == 12 and unseen["top"]
    for row in unseen["top"]:
        has = [row["phrase"] in phrases(c, 2) for c in web_rows["caption"]]
        assert row["texts"] == sum(has) and row["kept"] == int(web_rows["kept"][has].sum())
        assert f"<td>{row['phrase']}</td>" in page
    assert page.count("Phrases no human caption uses") == 1


def test_report_breaks_position_down_by_where_misplaced_objects_are_put(synth_test):
    refs, scenes = synth_test
    keys = list(refs)
    rounds = {}
    for name, shift in (("round1", 1), ("round2", 0)):  # round 1 shuffled, round 2 the references
        captions = {k: refs[keys[(i + shift) % len(keys)]][0] for i, k in enumerate(keys)}
        rounds[name] = evaluate.attribute_scores(captions, scenes)
    gain = {k: rounds["round2"][k] - v for k, v in rounds["round1"].items()}
    table = report.rounds_table({**rounds, "gain": gain}, report.ATTRIBUTE_ROWS).set_index("metric")
    pair_rows = ("known_pair_accuracy", "novel_pair_accuracy")  # only where the human captions miss pairs
    assert list(table.index) == [r for r in report.ATTRIBUTE_ROWS if r not in pair_rows]
    assert table.loc["position_accuracy", "round2"] == 1.0 and table.loc["position_unplaced", "round2"] == 0.0
    misplaced = list(evaluate.PLACEMENT_KEYS.values())
    assert table.loc[["position_accuracy", *misplaced], "round1"].sum() == pytest.approx(1.0)
    assert table.loc[misplaced, "gain"].sum() == pytest.approx(-table.loc["position_accuracy", "gain"])
    page = report.render_html({**rounds, "gain": gain}, {}, "")
    assert page.count("Captions by attribute") == 1 and "position_other_object" in page


def test_report_cards_show_the_captioner_s_confidence_only_when_scored():
    from types import SimpleNamespace

    from components import report

    row = SimpleNamespace(kept=False, caption="a <red> ring", itm_score=0.91, caption_confidence=0.42)
    line = report._line(row, "synthetic")
    assert '<span class="removed">a &lt;red&gt; ring</span> (0.91, confidence 0.42)' in line
    assert "confidence" not in report._line(SimpleNamespace(**{**vars(row), "caption_confidence": np.nan}), "web")
    assert "confidence" not in report._line(SimpleNamespace(kept=True, caption="x", itm_score=0.5), "web")


def test_score_histogram_renders_with_empty_or_one_sided_counts():
    import warnings

    bins = [0.025 + 0.05 * i for i in range(20)]
    cases = {"empty": ([0] * 20, [0] * 20), "clean only": ([5] * 20, [0] * 20),
             "spike": ([0] * 19 + [700], [3600] + [0] * 19)}  # the log axis's reason: a pile at 0
    for name, (clean, noisy) in cases.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            png = report.plot_histogram(pd.DataFrame({"bin": bins, "clean": clean, "noisy": noisy}), 0.8)
        assert png[:4] == b"\x89PNG", name


def test_test_images_seen_in_training_are_counted_per_manifest():
    test = pd.DataFrame({"image_key": ["t0", "t0", "t1", "t2", "t3"],
                         "sha256": ["a", "a", "b", "c", "a"]})  # t3 repeats t0's bytes
    train = {"human": pd.DataFrame({"sha256": ["a", "z"]}),
             "web": pd.DataFrame({"sha256": ["a", "c", "y"]})}
    overlap = evaluate.test_overlap(test, train)
    assert overlap == {"images": 4, "distinct_images": 3, "seen_in_training": 3,
                       "by_manifest": {"human": 2, "web": 3}}
    assert evaluate.test_overlap(test, {})["seen_in_training"] == 0
    line = report._test_set_line(overlap)
    assert "4 images, 3 of them byte-identical to training images (human: 2, web: 3)" in line
    assert "not checked" in report._test_set_line(evaluate.test_overlap(test, {}))
