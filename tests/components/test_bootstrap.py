"""The bootstrap stage on tiny random-weight models: conservation, resume, ranks, thresholds."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from components import batch_inference, bootstrap, bootstrap_merge
from components.batch_inference import (Images, caption, caption_with_confidence, checkpoint_hash, image_seed,
                                        prompt_ids, tokenize)
from components.config import BootstrapConfig
from components.distributed import RankInfo
from components.errors import CapfiltError
from components.schemas import read_manifest
from components.shards import ShardReader

sys.path.insert(0, str(Path(__file__).parent))
from capfilt_fixtures import SPLIT, boot_cfg, lenient_validation, make_world  # noqa: E402

ONE = RankInfo(rank=0, world_size=1, local_rank=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    return make_world(tmp_path_factory.mktemp("world"), n_web=10, web_shard=3)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory):
    """One uninterrupted single-rank run (SPLIT keeps some of everything)."""
    out = tmp_path_factory.mktemp("reference")
    cfg = boot_cfg(world, out, itm_threshold=SPLIT)
    result = bootstrap.run(cfg, lenient_validation(), ONE)
    return cfg, result


def _tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    manifest = read_manifest(out / "manifest.parquet", "bootstrapped")
    return manifest, pd.read_parquet(out / "removed.parquet")


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values("sample_id").reset_index(drop=True)


def test_every_web_text_lands_in_exactly_one_output(world, reference):
    cfg, result = reference
    manifest, removed = _tables(Path(cfg.out))
    web_ids = set(read_manifest(world.web, "ingested")["sample_id"])
    kept = set(manifest.loc[manifest["source"] == "web", "sample_id"])
    dropped = set(removed.loc[removed["source"] == "web", "sample_id"])
    assert kept | dropped == web_ids and not kept & dropped
    assert 0 < len(kept) < len(web_ids)  # SPLIT falls inside the random scores
    human = read_manifest(world.human, "ingested")
    assert set(manifest.loc[manifest["source"] == "human", "sample_id"]) == set(human["sample_id"])
    n_syn = (manifest["source"] == "synthetic").sum() + (removed["source"] == "synthetic").sum()
    assert n_syn == 10  # one caption per web image
    assert result.metrics["web_kept"] == len(kept) and result.metrics["web_texts"] == 10


def test_metrics_hold_the_phrase_table_unless_it_is_off(world, reference, tmp_path):
    cfg, result = reference
    table = result.metrics["unseen_phrases"]
    assert table["texts"] == 10 and table["min_texts"] == cfg.phrases.min_texts
    off = bootstrap.run(boot_cfg(world, tmp_path / "out", itm_threshold=SPLIT, phrases={"top": 0}),
                        lenient_validation(), ONE)
    assert "unseen_phrases" not in off.metrics


def test_rows_resolve_and_carry_provenance(world, reference):
    cfg, _ = reference
    manifest, removed = _tables(Path(cfg.out))
    with ShardReader(Path(cfg.out)) as reader:
        for row in pd.concat([manifest, removed]).itertuples():
            assert reader.read(row.shard, row.member)[:4] == b"\x89PNG"
    scored = manifest[manifest["source"] != "human"]
    assert set(scored["captioner"]) == {checkpoint_hash(world.captioner)}
    assert set(scored["filter"]) == {checkpoint_hash(world.filter)}
    assert (scored["itm_score"] >= SPLIT).all()
    assert (removed["itm_score"] < SPLIT).all()
    assert manifest.loc[manifest["source"] == "synthetic", "decoding"].str.startswith("nucleus(").all()


def test_resume_after_a_crash_equals_an_uninterrupted_run(world, reference, tmp_path, monkeypatch):
    cfg, _ = reference
    crash_cfg = boot_cfg(world, tmp_path / "out", itm_threshold=SPLIT)
    real, calls = bootstrap.process_shard, []

    def crash_after_two(shard, *args, **kwargs):
        if len(calls) == 2:
            raise RuntimeError("killed")
        calls.append(shard)
        return real(shard, *args, **kwargs)

    monkeypatch.setattr(bootstrap, "process_shard", crash_after_two)
    with pytest.raises(RuntimeError, match="killed"):
        bootstrap.run(crash_cfg, lenient_validation(), ONE)
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    assert len(list((tmp_path / "out" / "parts").glob("*/*.parquet"))) == 2
    calls.clear()
    monkeypatch.setattr(bootstrap, "process_shard", lambda shard, *a, **k: calls.append(shard) or real(shard, *a, **k))
    bootstrap.run(crash_cfg, lenient_validation(), ONE)
    assert len(calls) == 2  # 4 shards, 2 already scored
    for got, want in zip(_tables(tmp_path / "out"), _tables(Path(cfg.out)), strict=True):
        pd.testing.assert_frame_equal(got, want)


def test_two_ranks_give_the_one_rank_output(world, reference, tmp_path):
    cfg, _ = reference
    two = boot_cfg(world, tmp_path / "out", itm_threshold=SPLIT)
    assert bootstrap.run(two, lenient_validation(), RankInfo(1, 2, 1)) is None
    parts = sorted(p.name for p in (tmp_path / "out" / "parts").glob("*/*.parquet"))
    assert parts == ["shards__000001.tar.parquet", "shards__000003.tar.parquet"]
    assert bootstrap.run(two, lenient_validation(), RankInfo(0, 2, 0)) is not None
    for got, want in zip(_tables(tmp_path / "out"), _tables(Path(cfg.out)), strict=True):
        pd.testing.assert_frame_equal(_sorted(got), _sorted(want))


def test_rank_zero_names_missing_parts(world, tmp_path):
    cfg = boot_cfg(world, tmp_path / "out", merge_timeout_s=1)
    with pytest.raises(CapfiltError, match="shard parts still missing"):
        bootstrap.run(cfg, lenient_validation(), RankInfo(0, 2, 0))


def test_nucleus_captions_do_not_depend_on_the_batch(world, tmp_path):
    cfg = boot_cfg(world, tmp_path / "out", captions_per_image=2)
    models = bootstrap.load_models(cfg)
    web = read_manifest(world.web, "ingested")
    rows = web[web["shard"] == "shards/000000.tar"]
    images = Images(world.web.parent)
    pil = images.load(rows["shard"].tolist(), rows["member"].tolist())
    seeds = [image_seed(0, "shards/000000.tar", m) for m in rows["member"]]
    tensor = images.tensor(pil, models.captioner.image_size, models.device)
    together = caption(models.captioner, tensor, models.generation, "a picture of ", seeds)
    alone = [c for i in range(len(pil))
             for c in caption(models.captioner, tensor[i : i + 1], models.generation, "a picture of ", seeds[i : i + 1])]
    images.close()
    assert together == alone and len(together) == 2 * len(pil)
    other = [image_seed(1, "shards/000000.tar", m) for m in rows["member"]]
    assert caption(models.captioner, tensor, models.generation, "a picture of ", other) != together


@pytest.mark.parametrize("decoding", ["nucleus", "beam"])
def test_caption_confidence_is_the_step_decoder_s_own_token_probability(world, tmp_path, decoding):
    cfg = boot_cfg(world, tmp_path / "out", captions_per_image=2, decoding=decoding, synthetic_confidence=0.5)
    models = bootstrap.load_models(cfg)
    web = read_manifest(world.web, "ingested").drop_duplicates("member").head(3)
    images = Images(world.web.parent)
    tensor = images.tensor(images.load(web["shard"].tolist(), web["member"].tolist()),
                           models.captioner.image_size, models.device)
    images.close()
    seeds = [image_seed(0, s, m) for s, m in zip(web["shard"], web["member"], strict=True)]
    gen, cap = models.generation, models.captioner
    with torch.inference_mode():
        texts, confidence = caption_with_confidence(cap, tensor, gen, "a picture of ", seeds)
        assert texts == caption(cap, tensor, gen, "a picture of ", seeds)  # scoring changes no caption
        decoder, embeds = cap.model.text_decoder, cap.model.encode_image(tensor)
        prompt = prompt_ids(cap, "a picture of ", len(tensor), tensor.device)
        new = batch_inference._new_tokens(cap, embeds, prompt, gen, seeds)  # (6, L): the tokens captioned
        for row in range(len(texts)):  # re-walk each caption token by token through the KV cache
            image = row // 2
            logits, cache = decoder.prefill(prompt[image : image + 1], embeds[image : image + 1])
            logp = []
            for tok in new[row].tolist():
                logp.append(torch.log_softmax(logits.float(), -1)[0, tok])
                if tok == gen.eos_token_id:
                    break
                logits, cache = decoder.step(torch.tensor([[tok]]), cache)
            want = torch.stack(logp).mean().exp().item()
            assert confidence[row] == pytest.approx(want, rel=1e-4), (row, texts[row])
    assert all(0.0 < c < 1.0 for c in confidence)


def test_decide_removes_synthetic_captions_the_captioner_is_unsure_of():
    parts = pd.DataFrame({
        "kind": ["web", "synthetic", "synthetic", "synthetic"], "sample_id": ["a#0", "a#syn0", "b#syn0", "c#syn0"],
        "image_key": ["a", "a", "b", "c"], "caption": ["a red ring", "a blue bar", "a red bar", "a green ring"],
        "itm_score": [0.9, 0.9, 0.9, 0.4], "itc_score": [0.1] * 4, "caption_confidence": [np.nan, 0.7, 0.3, 0.9],
    })
    got = bootstrap_merge.decide(parts, threshold=0.5, itc_threshold=None, synthetic_confidence=0.5)
    assert got["reason"].tolist() == ["", "", "confidence_below_threshold", "itm_below_threshold"]
    assert bootstrap_merge.decide(parts, 0.5, None)["reason"].tolist() == ["", "", "", "itm_below_threshold"]
    with pytest.raises(CapfiltError, match="no caption confidence"):
        bootstrap_merge.decide(parts.drop(columns="caption_confidence"), 0.5, None, synthetic_confidence=0.5)
    with pytest.raises(ValueError, match="greater than 0"):
        BootstrapConfig(synthetic_confidence=0.0)


def test_the_confidence_bar_end_to_end_re_uses_parts_across_bars(world, reference, tmp_path):
    cfg = boot_cfg(world, tmp_path / "out", itm_threshold=SPLIT, synthetic_confidence=0.5)
    result = bootstrap.run(cfg, lenient_validation(), ONE)
    scores = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    syn, web = scores[scores["kind"] == "synthetic"], scores[scores["kind"] == "web"]
    assert syn["caption_confidence"].between(0, 1, inclusive="neither").all() and web["caption_confidence"].isna().all()
    bar = float(syn["caption_confidence"].median())  # a bar that splits this run's captions
    parts = list((tmp_path / "out" / "parts").iterdir())
    again = bootstrap.run(cfg.model_copy(update={"synthetic_confidence": bar}), lenient_validation(), ONE)
    assert list((tmp_path / "out" / "parts").iterdir()) == parts  # one fingerprint for every bar
    scores = pd.read_parquet(tmp_path / "out" / "scores.parquet")
    syn = scores[scores["kind"] == "synthetic"]
    unsure = syn["caption_confidence"] < bar
    assert unsure.any() and (syn.loc[unsure, "reason"].isin(["confidence_below_threshold", "itm_below_threshold",
                                                              "empty_caption"])).all()
    assert (syn.loc[syn["reason"] == "", "caption_confidence"] >= bar).all()
    assert again.metrics["synthetic_confidence"] == bar and result.metrics["synthetic_confidence"] == 0.5
    ref_scores = pd.read_parquet(Path(reference[0].out) / "scores.parquet")  # the confidence changes no score
    merged = ref_scores.merge(scores, on="sample_id", suffixes=("", "_c"))
    np.testing.assert_allclose(merged["itm_score"], merged["itm_score_c"], rtol=1e-5, atol=1e-6)
    assert (merged["caption"] == merged["caption_c"]).all()
    web_kept = lambda df: set(df.loc[(df["kind"] == "web") & (df["reason"] == ""), "sample_id"])  # noqa: E731
    assert web_kept(scores) == web_kept(ref_scores)  # web texts never face the captioner's confidence


def test_decide_threshold_semantics():
    parts = pd.DataFrame({
        "kind": ["web", "web", "synthetic", "synthetic", "synthetic", "web"],
        "sample_id": ["a#0", "b#0", "a#syn0", "a#syn1", "b#syn0", "c#0"],
        "image_key": ["a", "b", "a", "a", "b", "c"],
        "caption": ["a red ring", "junk", "A red ring ", "a blue bar", " ", "x y"],
        "itm_score": [0.5, 0.49, 0.9, 0.8, 0.9, 0.7],
        "itc_score": [0.1, 0.1, 0.1, 0.1, 0.1, -0.2],
    })
    got = bootstrap_merge.decide(parts, threshold=0.5, itc_threshold=None)
    assert got["reason"].tolist() == ["", "itm_below_threshold", "duplicate", "", "empty_caption", ""]
    got = bootstrap_merge.decide(parts, threshold=0.5, itc_threshold=0.0)
    assert got["reason"].tolist()[5] == "itc_below_threshold"
    strict = bootstrap_merge.decide(parts, threshold=0.5, itc_threshold=None, synthetic_threshold=0.85)
    assert strict["reason"].tolist() == ["", "itm_below_threshold", "duplicate", "itm_below_threshold",
                                         "empty_caption", ""]  # a#syn1 (0.8) now fails; web rows as before
    lax = bootstrap_merge.decide(parts, threshold=0.85, itc_threshold=None, synthetic_threshold=0.5)
    assert lax["reason"].tolist() == ["itm_below_threshold", "itm_below_threshold", "", "itm_below_threshold",
                                      "empty_caption", "itm_below_threshold"]  # the web bar 0.85 > 0.5 holds
    with pytest.raises(ValueError, match="synthetic_threshold is a p\\(match\\) bar"):
        BootstrapConfig(signal="itm_itc", threshold="calibrated", synthetic_threshold=0.9)
    assert BootstrapConfig(itm_threshold=0.995, synthetic_threshold=0.99).synthetic_threshold == 0.99  # max applies
    with pytest.raises(ValueError, match="less than or equal to 63"):
        BootstrapConfig(prior_images=64)


def test_itm_itc_scores_add_the_itm_log_odds_and_the_itc_logit():
    p, cos = np.array([0.5, 0.9, 0.1, 0.9]), np.array([0.2, 0.2, 0.6, -0.4])
    np.testing.assert_array_equal(bootstrap_merge.filter_scores(p, cos, "itm", 0.05), p)
    got = bootstrap_merge.filter_scores(p, cos, "itm_itc", 0.05)
    np.testing.assert_allclose(got, np.log(p / (1 - p)) + cos / 0.05)
    assert got[2] > got[1] > got[0] > got[3]  # a strong cosine outweighs a weak p, and back
    assert np.isfinite(bootstrap_merge.filter_scores(np.array([0.0, 1.0]), np.zeros(2), "itm_itc", 0.1)).all()
    with pytest.raises(ValueError, match="itm | itm_itc"):
        bootstrap_merge.filter_scores(p, cos, "clip", 0.05)


def test_the_text_prior_correction_of_the_filter_score():
    p, cos = np.array([0.9, 0.9, 0.5, 0.2]), np.zeros(4)
    prior = np.array([-7.0, -1.0, np.nan, -9.0])  # specific, generic (matches anything), none, very specific
    np.testing.assert_array_equal(bootstrap_merge.filter_scores(p, cos, "itm", 0.05, prior, 0.0, -7.0), p)  # weight 0
    got = bootstrap_merge.filter_scores(p, cos, "itm", 0.05, prior, 0.5, -7.0)
    want = 1 / (1 + np.exp(-(np.log(p / (1 - p)) - 0.5 * np.nan_to_num(prior + 7.0))))
    np.testing.assert_allclose(got, want)
    assert got[0] == pytest.approx(0.9) and got[2] == pytest.approx(0.5)  # at the reference / no prior: unchanged
    assert got[1] < 0.5 and got[3] > 0.2  # the generic text falls below its 0.9, the very specific one rises
    both = bootstrap_merge.filter_scores(p, cos + 0.1, "itm_itc", 0.05, prior, 1.0, -7.0)
    np.testing.assert_allclose(both, np.log(p / (1 - p)) - np.nan_to_num(prior + 7.0) + 2.0)


def test_text_priors_are_mean_log_odds_against_reference_images_not_their_own(world):
    from components.batch_inference import image_ids, load_filter, prior_bank, text_scores
    from components.config import TextInput

    cpu = torch.device("cpu")
    filt = load_filter(world.filter, cpu)
    web = read_manifest(world.web, "ingested")
    root = world.web.parent
    rows = web.drop_duplicates("image_key").iloc[:3]
    images = Images(root)
    try:
        tensor = images.tensor(images.load(rows["shard"].tolist(), rows["member"].tolist()), filt.image_size, cpu)
    finally:
        images.close()
    texts, index, text = rows["caption"].tolist() * 2, torch.tensor([0, 1, 2] * 2), TextInput()
    keys = image_ids(root, rows["image_key"]) * 2
    with torch.inference_mode():
        bank = prior_bank(filt, root, web, k=2, seed=0, dev=cpu)
        assert len(bank.keys) == web["image_key"].nunique()  # a small corpus: every image
        choice = bank.choice(keys)
        assert choice.shape == (6, 2) and torch.equal(choice[:3], choice[3:])  # by image, not by row
        assert all(bank.keys[int(c)] != key for row, key in zip(choice, keys) for c in row)  # never its own
        itm, _, prior = text_scores(filt, tensor, texts, index, text, bank, keys)
        plain, _, none = text_scores(filt, tensor, texts, index, text)
        _, _, alone = text_scores(filt, tensor[:1], texts[:1], torch.tensor([0]), text, bank, keys[:1])
        ids, mask = tokenize(filt.tokenizer, texts, text, cpu)
        want = []
        for j in range(2):
            logits = filt.model.itm_logits(bank.embeds, ids, mask, choice[:, j])
            want.append((logits[:, 1] - logits[:, 0]).numpy())
    np.testing.assert_allclose(prior, np.mean(want, axis=0), rtol=1e-4, atol=1e-4)
    assert prior[0] == pytest.approx(alone[0], abs=1e-4)  # the batch around a text does not matter
    np.testing.assert_allclose(itm, plain)  # the own-image score is untouched
    assert np.isnan(none).all()
    with pytest.raises(CapfiltError, match="lower bootstrap.prior_images"):
        prior_bank(filt, root, web.iloc[:2], k=2, seed=0, dev=cpu)


def test_a_text_s_reference_images_do_not_depend_on_where_the_corpus_lies():
    from components.batch_inference import PriorBank

    keys = [f"images/{i:03d}.png" for i in range(10)]
    here = PriorBank(torch.zeros(10, 1, 1), tuple(("/data/a", k) for k in keys), k=3, seed=0)
    there = PriorBank(torch.zeros(10, 1, 1), tuple(("/mnt/b", k) for k in keys), k=3, seed=0)
    texts = ["images/004.png", "images/other.png"]
    mine = here.choice([("/data/a", t) for t in texts])
    assert torch.equal(mine, there.choice([("/mnt/b", t) for t in texts]))  # same keys, same picks
    assert 4 not in mine[0].tolist()  # never the text's own image
    assert not torch.equal(mine, PriorBank(here.embeds, here.keys, k=3, seed=1).choice(
        [("/data/a", t) for t in texts]))  # the run seed changes them


def test_a_calibrated_threshold_with_the_prior_uses_the_corrected_scores(world, tmp_path):
    cfg = boot_cfg(world, tmp_path / "out", threshold="calibrated", calibration_keep=0.75, calibration_samples=8,
                   prior_images=1)
    models = bootstrap.load_models(cfg)
    human = read_manifest(world.human, "ingested")
    threshold, info = bootstrap_merge.resolve_threshold(cfg, human, models)
    pairs, _ = bootstrap_merge.calibration_pairs(human, cfg)
    itm, itc, prior = bootstrap_merge.pair_scores(pairs, world.human.parent, models, cfg)
    assert np.isfinite(prior).all() and info["prior_reference"] == pytest.approx(float(np.median(prior)))
    scores = bootstrap_merge.filter_scores(itm, itc, cfg.signal, bootstrap_merge.filter_temperature(models), prior,
                                           cfg.prior_weight, info["prior_reference"])
    assert (scores >= threshold).mean() >= 0.75 and info["human_kept"] == pytest.approx((scores >= threshold).mean())
    assert not np.allclose(scores, itm)  # the corrected score, not p(match)
    with pytest.raises(CapfiltError, match="prior bank scores 0 images"):
        bootstrap.run(cfg, lenient_validation(), ONE, models=dataclasses.replace(models, bank=None))


def test_the_text_prior_end_to_end_and_across_ranks(world, tmp_path):
    one = boot_cfg(world, tmp_path / "one", itm_threshold=SPLIT, prior_images=1, calibration_samples=8)
    result = bootstrap.run(one, lenient_validation(), ONE)
    scores = pd.read_parquet(tmp_path / "one" / "scores.parquet")
    info = result.metrics["threshold"]
    assert info["mode"] == "fixed" and info["prior_images"] == 1 and np.isfinite(info["prior_reference"])
    assert np.isfinite(scores["itm_prior"]).all()
    np.testing.assert_allclose(scores["filter_score"], bootstrap_merge.filter_scores(
        scores["itm_score"].to_numpy(), scores["itc_score"].to_numpy(), "itm", 1.0, scores["itm_prior"].to_numpy(),
        0.5, info["prior_reference"]))
    assert (scores["filter_score"] != scores["itm_score"]).any()
    kept = scores["reason"] == ""
    assert (scores.loc[kept, "filter_score"] >= SPLIT).all()
    assert (scores.loc[scores["reason"] == "itm_below_threshold", "filter_score"] < SPLIT).all()
    manifest, removed = _tables(tmp_path / "one")
    web = read_manifest(world.web, "ingested")
    landed = pd.concat([manifest.loc[manifest["source"] == "web", "sample_id"], removed.loc[
        removed["source"] == "web", "sample_id"]])
    assert sorted(landed) == sorted(web["sample_id"])  # every web text in exactly one output
    two = boot_cfg(world, tmp_path / "two", itm_threshold=SPLIT, prior_images=1, calibration_samples=8)
    assert bootstrap.run(two, lenient_validation(), RankInfo(1, 2, 1)) is None
    assert bootstrap.run(two, lenient_validation(), RankInfo(0, 2, 0)) is not None
    for got, want in zip(_tables(tmp_path / "two"), _tables(tmp_path / "one"), strict=True):
        pd.testing.assert_frame_equal(_sorted(got), _sorted(want))


def test_decide_on_the_itm_itc_signal():
    parts = pd.DataFrame({"kind": ["web", "web", "synthetic"], "sample_id": ["a#0", "b#0", "a#syn0"],
                          "image_key": ["a", "b", "a"], "caption": ["a red ring", "junk", "a blue bar"],
                          "itm_score": [0.2, 0.6, 0.5], "itc_score": [0.3, 0.0, 0.05]})
    got = bootstrap_merge.decide(parts, threshold=1.0, itc_threshold=None, signal="itm_itc", temp=0.1)
    np.testing.assert_allclose(got["filter_score"], [np.log(0.25) + 3.0, np.log(1.5), 0.5])
    assert got["reason"].tolist() == ["", "score_below_threshold", "score_below_threshold"]


def test_a_fixed_threshold_needs_the_itm_signal(world, tmp_path):
    with pytest.raises(ValueError, match="threshold: calibrated"):
        boot_cfg(world, tmp_path, signal="itm_itc")
    assert boot_cfg(world, tmp_path, signal="itm_itc", threshold="calibrated").signal == "itm_itc"


def test_the_itm_itc_signal_end_to_end(world, tmp_path):
    cfg = boot_cfg(world, tmp_path / "out", signal="itm_itc", threshold="calibrated", calibration_keep=0.5,
                   calibration_samples=8)
    result = bootstrap.run(cfg, lenient_validation(), ONE)
    manifest, removed = _tables(Path(cfg.out))
    scores = pd.read_parquet(Path(cfg.out) / "scores.parquet")
    assert len(scores) == 20 and set(scores["kind"]) == {"web", "synthetic"}  # 10 web texts + 10 captions
    temp = result.metrics["itc_temperature"]
    np.testing.assert_allclose(scores["filter_score"], bootstrap_merge.filter_scores(
        scores["itm_score"].to_numpy(), scores["itc_score"].to_numpy(), "itm_itc", temp))
    threshold = result.metrics["score_threshold"]
    assert result.metrics["signal"] == "itm_itc" and result.metrics["itm_threshold"] is None
    kept = scores[scores["reason"] == ""]
    assert (kept["filter_score"] >= threshold).all()
    assert set(kept["sample_id"]) == set(manifest.loc[manifest["source"] != "human", "sample_id"])
    assert set(scores.loc[scores["reason"] != "", "sample_id"]) == set(removed["sample_id"])
    assert (scores.loc[scores["reason"] == "score_below_threshold", "filter_score"] < threshold).all()


def test_keep_threshold_keeps_the_asked_fraction():
    scores = np.random.default_rng(0).random(200)
    for keep in (0.5, 0.9, 0.95, 1.0):
        t = bootstrap_merge.keep_threshold(scores, keep)
        assert (scores >= t).mean() >= keep
        assert (scores > t).mean() < keep  # the largest such threshold
    assert bootstrap_merge.keep_threshold(np.arange(100) / 100, 0.95) == 0.05


def test_calibrated_threshold_keeps_the_human_pairs(world, tmp_path):
    cfg = boot_cfg(world, tmp_path / "out", threshold="calibrated", calibration_keep=0.75, calibration_samples=8)
    models = bootstrap.load_models(cfg)
    human = read_manifest(world.human, "ingested")
    threshold, info = bootstrap_merge.resolve_threshold(cfg, human, models)
    pairs, source = bootstrap_merge.calibration_pairs(human, cfg)
    itm, itc, _ = bootstrap_merge.pair_scores(pairs, world.human.parent, models, cfg)
    scores = bootstrap_merge.filter_scores(itm, itc, cfg.signal, bootstrap_merge.filter_temperature(models))
    assert info["mode"] == "calibrated" and info["n"] == 8 and "training pairs" in source
    assert (scores >= threshold).mean() >= 0.75 and info["human_kept"] >= 0.75
    val = human.assign(split=["val"] * 4 + ["train"] * (len(human) - 4))
    assert len(bootstrap_merge.calibration_pairs(val, cfg)[0]) == 4  # a val split wins


def test_mismatched_pairs_put_every_caption_on_an_image_it_does_not_describe(world):
    human = read_manifest(world.human, "ingested")  # captions repeat across images here
    moved = bootstrap_merge.mismatched_pairs(human, human, seed=0)
    own = set(zip(human["image_key"], human["caption"]))
    assert 0 < len(moved) < len(human)
    assert not set(zip(moved["image_key"], moved["caption"])) & own
    assert set(moved["caption"]) <= set(human["caption"])


def _oracle_scores(world):
    """pair_scores that give p(match) 0.9 to a manifest pair of the human set and 0.1 to any other."""
    human = read_manifest(world.human, "ingested")
    own = set(zip(human["image_key"], human["caption"]))

    def scores(pairs, root, models, cfg):
        itm = np.array([0.9 if p in own else 0.1 for p in zip(pairs["image_key"], pairs["caption"])])
        return itm, np.zeros(len(pairs)), np.full(len(pairs), np.nan)
    return scores


def test_a_filter_that_cannot_tell_pairs_apart_stops_the_stage_before_any_image(world, tmp_path, monkeypatch):
    cfg = boot_cfg(world, tmp_path / "out", itm_threshold=SPLIT, min_filter_auroc=0.99)
    models = bootstrap.load_models(cfg)
    human = read_manifest(world.human, "ingested")
    monkeypatch.setattr(bootstrap, "process_shard", lambda *a, **k: pytest.fail("scored a shard"))
    with pytest.raises(CapfiltError, match=r"does not tell human pairs .*AUROC 0\.\d{3}.*min_filter_auroc is 0\.99"):
        bootstrap.run(cfg, lenient_validation(), ONE, models)
    assert not list((tmp_path / "out").rglob("*.parquet"))
    # the random filter's AUROC, under the bar that stopped it
    info = bootstrap_merge.filter_check(cfg.model_copy(update={"min_filter_auroc": 0.0}), human, models)
    assert 0.0 < info["auroc"] < 0.99 and info["matched"] == len(human) and 0 < info["mismatched"] < len(human)
    assert bootstrap_merge.filter_check(cfg.model_copy(update={"min_filter_auroc": None}), human, models) is None


def test_a_filter_that_separates_pairs_passes_the_check_and_it_is_recorded(world, tmp_path, monkeypatch):
    cfg = boot_cfg(world, tmp_path / "out", itm_threshold=SPLIT, min_filter_auroc=0.99)
    fake = _oracle_scores(world)
    checked = []

    def pair_scores(pairs, root, models, c):
        checked.append(len(pairs))
        return fake(pairs, root, models, c)
    monkeypatch.setattr(bootstrap_merge, "pair_scores", pair_scores)
    result = bootstrap.run(cfg, lenient_validation(), ONE)  # a fixed threshold: only the check scores pairs
    check = result.metrics["filter_check"]
    assert check["auroc"] == 1.0 and check["min_auroc"] == 0.99 and check["matched"] == 12
    assert checked == [12 + check["mismatched"]]  # one pass over both sets
    assert yaml.safe_load((tmp_path / "out" / "metrics.json").read_text())["filter_check"] == check


def test_the_filter_check_scores_at_most_filter_check_pairs(world, monkeypatch):
    monkeypatch.setattr(bootstrap_merge, "pair_scores", _oracle_scores(world))
    cfg = boot_cfg(world, world.root / "unused", min_filter_auroc=0.99, filter_check_pairs=4)
    info = bootstrap_merge.filter_check(cfg, read_manifest(world.human, "ingested"), bootstrap.load_models(cfg))
    assert info["matched"] == 4 and info["mismatched"] <= 4 and info["pairs"].startswith("4 of the ")
    assert info["auroc"] == 1.0


def test_bad_checkpoints_are_named(world, tmp_path):
    with pytest.raises(CapfiltError, match="nowhere"):
        bootstrap.load_models(boot_cfg(world, tmp_path, captioner=str(tmp_path / "nowhere")))
    with pytest.raises(CapfiltError, match="BlipCaptioner"):
        bootstrap.load_models(boot_cfg(world, tmp_path, filter=str(world.captioner)))


@pytest.mark.slow
def test_kill_minus_nine_then_restart_gives_the_same_manifest(world, reference, tmp_path):
    cfg, _ = reference
    params = {"bootstrap": boot_cfg(world, tmp_path / "out", itm_threshold=SPLIT, batch_size=1).model_dump(),
              "validation": lenient_validation().model_dump()}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [str(Path(sys.executable).parent / "capfilt"), "stage", "bootstrap", "--params", str(tmp_path / "params.yaml")]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if list((tmp_path / "out" / "parts").glob("*/*.parquet")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    assert not (tmp_path / "out" / "manifest.parquet").exists()
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    for got, want in zip(_tables(tmp_path / "out"), _tables(Path(cfg.out)), strict=True):
        pd.testing.assert_frame_equal(got, want)


def test_dvc_stages_match_params_and_the_stage_table():
    from components.config import load_params
    from components.stages import RANKED_STAGES, STAGES

    root = Path(__file__).resolve().parents[2]
    dvc = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    p = load_params(root / "params.yaml")
    for name in ("bootstrap", "evaluate"):
        assert dvc[name]["cmd"] == f"capfilt stage {name}" and name in STAGES
    assert "bootstrap" in RANKED_STAGES
    boot, ev = dvc["bootstrap"], dvc["evaluate"]
    assert {p.bootstrap.captioner, p.bootstrap.filter} <= set(boot["deps"])
    web = Path(p.bootstrap.web_manifest)
    assert {str(web), str(web.parent / "shards")} <= set(boot["deps"])
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in boot["outs"]]
    assert all(o.startswith(p.bootstrap.out + "/") for o in outs)
    assert {p.evaluate.round1_captioner, p.evaluate.round1_filter, p.evaluate.round2_captioner,
            p.evaluate.round2_filter, f"{p.evaluate.bootstrap}/manifest.parquet"} <= set(ev["deps"])
    assert next(iter(ev["metrics"][0])) == f"{p.evaluate.out}/metrics.json"
    assert p.bootstrap.captioner == f"{p.finetune.round1_out}/captioner/model"
    assert p.evaluate.round2_filter == f"{p.finetune.round2_out}/filter/model"
    assert p.retrain.manifests == [f"{p.bootstrap.out}/manifest.parquet"]


def test_bf16_precision_scores_close_to_fp32_and_bad_precision_is_named(world, tmp_path, cpu_bf16_units, caplog):
    from components.batch_inference import autocast, load_filter, score_texts

    cfg = boot_cfg(world, tmp_path / "out")
    models = bootstrap.load_models(cfg)
    web = read_manifest(world.web, "ingested")
    images = Images(world.web.parent)
    tensor = images.tensor(images.load(web["shard"].tolist(), web["member"].tolist()),
                           models.filter.image_size, models.device)
    images.close()
    index = torch.arange(len(web))
    scores = {}
    cpu_bf16_units(False, False)  # a CPU without bf16 units
    for precision in ("fp32", "bf16"):
        with caplog.at_level(logging.WARNING, logger="components.hardware"):
            filt = bootstrap.load_models(cfg.model_copy(update={"precision": precision})).filter
        warned = [r for r in caplog.records if r.name == "components.hardware"]
        assert len(warned) == (precision == "bf16" and models.device.type == "cpu")  # once for both models
        stored = torch.float32 if precision == "fp32" else torch.bfloat16  # weights kept in the autocast dtype
        assert {p.dtype for p in filt.model.parameters()} == {stored}
        with torch.inference_mode(), autocast(models.device, precision):
            scores[precision] = np.array(score_texts(filt, tensor, web["caption"].tolist(), index, cfg.text))
    assert np.abs(scores["bf16"] - scores["fp32"]).max() < 0.05
    assert not np.array_equal(scores["bf16"], scores["fp32"])  # bf16 really ran
    with pytest.raises(CapfiltError, match="unknown inference precision 'fp8'"):
        autocast(models.device, "fp8")
    with pytest.raises(CapfiltError, match="unknown inference precision 'fp8'"):
        load_filter(cfg.filter, models.device, "fp8")  # before any weight is read
    bootstrap.run(boot_cfg(world, tmp_path / "bf16", precision="bf16"), lenient_validation(), ONE)
    manifest, removed = _tables(tmp_path / "bf16")
    kept = set(manifest.loc[manifest["source"] == "web", "sample_id"])
    dropped = set(removed.loc[removed["source"] == "web", "sample_id"])
    assert kept | dropped == set(web["sample_id"]) and not kept & dropped  # conservation in bf16 too
