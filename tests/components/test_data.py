"""Manifests → per-rank, per-worker, resumable batches with the BLIP transforms and tokenisation."""

from __future__ import annotations

import dataclasses
import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from components.config import AugmentConfig, TextAugmentConfig, TextInput
from components.data import CLIP_MEAN, CLIP_STD, ManifestBatches, epoch_order, load_pairs
from components.shards import ShardReader
from components.errors import CapfiltError
from components.text import SwapTable, partial_caption, pre_caption
from components.tokenizer import load_tokenizer

sys.path.insert(0, str(Path(__file__).parent))
from train_corpus import make_corpus, make_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    train = make_corpus(root / "a", n_images=40, captions=2, seed=0)
    other = make_corpus(root / "b", n_images=8, captions=1, seed=1)
    held = make_corpus(root / "c", n_images=8, captions=1, seed=2, split="test")
    return train, other, held, load_tokenizer(make_tokenizer(root / "tok"))


def _source(pairs, tok, micro=8, rank=0, world=1, workers=0, augment=False, prompt="", seed=0,
            partial=0.0, swap=0.0, exchange=0.0, max_tokens=12):
    return ManifestBatches(pairs, tok, TextInput(max_tokens=max_tokens), AugmentConfig(enabled=augment), 32,
                           micro, rank, world, seed=seed, shuffle_buffer=16, num_workers=workers,
                           prompt=prompt, text_augment=TextAugmentConfig(partial=partial, swap_negative=swap,
                                                                          exchange_negative=exchange))


def _all(source, epoch=0, skip=0):
    return list(source.batches(epoch, skip))


def _two_objects(pairs):
    """The pairs with a second object in each caption, so that it has two colours to exchange."""
    return dataclasses.replace(pairs, caption=[f"{c} and a {['green', 'yellow'][i % 2]} square"
                                               for i, c in enumerate(pairs.caption)])


def test_pairs_keep_train_rows_and_number_images_densely(corpus):
    train, other, held, _ = corpus
    pairs = load_pairs([train, other, held])
    assert len(pairs) == 40 * 2 + 8  # the test split is left out
    assert sorted(set(pairs.image_id.tolist())) == list(range(48))  # same keys, other manifest: new ids
    first = [i for i, m in enumerate(pairs.member) if m == "000000.png"]
    assert len({pairs.image_id[i] for i in first}) == 2  # 000000 of each manifest
    with pytest.raises(CapfiltError, match="no 'train' rows"):
        load_pairs([held])
    with pytest.raises(CapfiltError, match="manifest not found"):
        load_pairs([held.parent / "missing.parquet"])


def test_batches_are_typed_and_tokenised(corpus):
    train, _, _, tok = corpus
    batch = _all(_source(load_pairs([train]), tok))[0]
    assert batch.image.shape == (8, 3, 32, 32) and batch.image.dtype == torch.float32
    ids, mask = batch.input_ids, batch.attention_mask
    assert ids.shape == mask.shape and ids.shape[1] <= 12
    assert (ids[:, 0] == tok.token_to_id("[CLS]")).all()
    lengths = mask.sum(1)
    assert (ids[torch.arange(8), lengths - 1] == tok.token_to_id("[SEP]")).all()  # kept when truncating
    assert (ids[mask == 0] == 0).all() and batch.image_ids.dtype == torch.long


def test_the_order_is_seeded_per_epoch_and_covers_every_row(corpus):
    pairs = load_pairs([corpus[0]])
    a, b = epoch_order(pairs, 0, 0, 16), epoch_order(pairs, 0, 0, 16)
    assert np.array_equal(a, b) and sorted(a.tolist()) == list(range(len(pairs)))
    assert not np.array_equal(a, epoch_order(pairs, 0, 1, 16))
    assert not np.array_equal(a, epoch_order(pairs, 1, 0, 16))


def test_two_ranks_split_what_one_rank_sees(corpus):
    pairs, tok = load_pairs([corpus[0]]), corpus[3]
    one = _all(_source(pairs, tok, micro=8))
    r0 = _all(_source(pairs, tok, micro=4, rank=0, world=2))
    r1 = _all(_source(pairs, tok, micro=4, rank=1, world=2))
    assert len(one) == len(r0) == len(r1) == 10  # 80 rows // 8, the rest dropped
    for whole, a, b in zip(one, r0, r1):
        assert torch.equal(whole.image_ids, torch.cat([a.image_ids, b.image_ids]))
        assert torch.equal(whole.image, torch.cat([a.image, b.image]))


def test_skip_and_workers_do_not_change_the_stream(corpus):
    pairs, tok = load_pairs([corpus[0]]), corpus[3]
    base = _all(_source(pairs, tok))
    skipped = _all(_source(pairs, tok), skip=3)
    assert [b.image_ids.tolist() for b in skipped] == [b.image_ids.tolist() for b in base[3:]]
    workers = _all(_source(pairs, tok, workers=2))
    assert [b.image_ids.tolist() for b in workers] == [b.image_ids.tolist() for b in base]


def test_augmentation_is_switchable_and_reproducible(corpus):
    pairs, tok = load_pairs([corpus[0]]), corpus[3]
    plain = _all(_source(pairs, tok))[0].image
    aug1 = _all(_source(pairs, tok, augment=True))[0].image
    aug2 = _all(_source(pairs, tok, augment=True))[0].image
    assert torch.equal(aug1, aug2) and not torch.equal(aug1, plain)
    # off = BLIP's eval transform: resize, then CLIP mean/std (grey 128 is slightly above the mean)
    first = epoch_order(pairs, 0, 0, 16)[0]
    with ShardReader(pairs.roots[0]) as reader:
        raw = Image.open(io.BytesIO(reader.read(pairs.shard[first], pairs.member[first]))).convert("RGB")
    want = (torch.from_numpy(np.array(raw)).permute(2, 0, 1) / 255.0 - torch.tensor(CLIP_MEAN)[:, None, None])
    want = want / torch.tensor(CLIP_STD)[:, None, None]
    torch.testing.assert_close(plain[0], want, atol=0.05, rtol=0)
    assert not torch.equal(_all(_source(pairs, tok, augment=True), epoch=1)[0].image, aug1)


def test_partial_captions_keep_words_in_order_and_never_come_out_empty():
    rng = np.random.default_rng(0)
    caption = "a large red ring at the top, two blue squares and a green bar with a small cross"
    outs = [partial_caption(caption, rng, 0.15) for _ in range(200)]
    for out in outs:
        words, it = out.split(), iter(caption.replace(",", "").split())
        assert words and all(w in it for w in words)  # a subsequence of the caption's words
    assert len(set(outs)) > 50 and sum(len(o.split()) for o in outs) / 200 < 0.6 * len(caption.split())
    assert partial_caption("ring", rng, 0.99) == "ring"


def test_partial_caption_augmentation_is_seeded_and_switchable(corpus):
    pairs, tok = load_pairs([corpus[0]]), corpus[3]
    plain = _all(_source(pairs, tok))
    half = _all(_source(pairs, tok, partial=0.5))
    again = _all(_source(pairs, tok, partial=0.5))
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(half, again))  # resume-stable
    rows = [(a.attention_mask.sum(1), b.attention_mask.sum(1)) for a, b in zip(plain, half)]
    assert all(bool((h <= p).all()) for p, h in rows)  # a partial caption is never longer
    changed = sum(int((h < p).sum()) for p, h in rows) / sum(len(p) for p, _ in rows)
    assert 0.2 < changed < 0.6  # about half were cut (a cut may drop nothing from one clause)
    assert all(torch.equal(a.image, b.image) and torch.equal(a.image_ids, b.image_ids) for a, b in zip(plain, half))


def test_swap_table_replaces_one_word_by_a_context_mate():
    captions = ["A red ring.", "a blue ring", "a blue ring", "a blue ring", "a green ring"]
    table = SwapTable.build(captions, min_count=1)
    rng = np.random.default_rng(0)
    outs = [table.negative("a red ring", rng) for _ in range(400)]
    assert set(outs) == {"a blue ring", "a green ring"}  # red's mates in ("a", "ring"), never itself
    assert 0.68 < outs.count("a blue ring") / 400 < 0.82  # in proportion to use (3 : 1)
    assert set(table.negative("a blue ring", rng) for _ in range(50)) == {"a red ring", "a green ring"}
    assert table.negative("a picture of a cross", rng) is None  # no word has a mate
    assert len(SwapTable.build(captions, min_count=2)) == 0  # red and green seen once: blue alone
    commas = SwapTable.build(["a red ring, a cross", "a red ring a cross"], min_count=1)
    assert commas.negative("a red ring, a cross", rng) is None  # "ring," -> "ring" would still be true


def test_exchange_binds_the_same_words_to_other_objects():
    captions = ["a red ring in the upper left and a blue cross at the top", "a blue ring at the top",
                "a red cross in the lower left", "a red ring at the top", "a blue cross in the lower left"]
    table = SwapTable.build(captions, min_count=1)
    rng = np.random.default_rng(0)
    outs = {table.exchange("a red ring in the upper left and a blue cross at the top", rng) for _ in range(200)}
    # red/blue and ring/cross are mates in each other's contexts; "in"/"at" are too, but an
    # exchange of function words only rewords the caption, so it is never drawn
    assert outs == {"a blue ring in the upper left and a red cross at the top",
                    "a red cross in the upper left and a blue ring at the top"}
    assert table.exchange("a red ring in the upper left", rng) is None  # one object: nothing to rebind
    commas = SwapTable.build(["a red ring, a blue cross", "a red cross, a blue ring"], min_count=1)
    # ring and cross are mates in ("red", "a") and ("blue", end); the colours have none here. Each
    # slot keeps its punctuation, the word moves without it
    outs = {commas.exchange("a red ring, a blue cross", rng) for _ in range(100)}
    assert outs == {"a red cross, a blue ring"}
    assert SwapTable.build(["a red ring", "a ring red"], min_count=1).exchange("a red ring", rng) is None  # neighbours
    with pytest.raises(ValueError, match="sum to at most 1"):
        TextAugmentConfig(swap_negative=0.6, exchange_negative=0.5)


def test_exchange_negatives_reorder_the_caption_s_own_words(corpus):
    pairs, tok = _two_objects(load_pairs([corpus[0]])), corpus[3]
    plain, mixed = _all(_source(pairs, tok, max_tokens=24)), _all(_source(pairs, tok, exchange=1.0, max_tokens=24))
    again = _all(_source(pairs, tok, exchange=1.0, max_tokens=24))
    assert all(torch.equal(a.negative_ids, b.negative_ids) for a, b in zip(mixed, again))  # seeded
    exchanged = 0
    for p, s in zip(plain, mixed):
        assert torch.equal(p.input_ids, s.input_ids[:, : p.input_ids.shape[1]])  # positives untouched
        for row in np.flatnonzero(s.has_negative.numpy()):
            pos = tok.decode(s.input_ids[row][s.attention_mask[row].bool()].tolist()).split()
            neg = tok.decode(s.negative_ids[row][s.negative_mask[row].bool()].tolist()).split()
            assert sorted(pos) == sorted(neg) and pos != neg  # same words, other order
            exchanged += 1
    assert exchanged > 0.5 * len(pairs)


def test_swap_and_exchange_share_one_draw(corpus):
    pairs, tok = _two_objects(load_pairs([corpus[0]])), corpus[3]
    texts = [pre_caption(c, 30) for c in pairs.caption]

    def negatives(swap, exchange):
        source = _source(pairs, tok, swap=swap, exchange=exchange, max_tokens=24)
        return [source._negative(r, t) for r, t in enumerate(texts)]

    swaps, both = negatives(0.5, 0.0), negatives(0.5, 0.5)
    kinds = {"swap" if sorted(n.split()) != sorted(t.split()) else "exchange"
             for n, t in zip(both, texts, strict=True) if n is not None}
    assert kinds == {"swap", "exchange"}  # both kinds come out of one mixed draw
    assert all(b == s for s, b in zip(swaps, both, strict=True) if s is not None)  # a row's swap is unchanged


def _corpus_source(pairs, tok, share, pool=None, seed=0):
    return ManifestBatches(pairs, tok, TextInput(max_tokens=24), AugmentConfig(), 32, 8, seed=seed,
                           shuffle_buffer=16, text_augment=TextAugmentConfig(corpus_negative=share),
                           negative_pool=pool)


def test_corpus_negatives_come_from_the_pool_and_are_seeded(corpus):
    pairs, tok = load_pairs([corpus[0]]), corpus[3]
    pool = ["DSCN0042.jpg", "product image 3 of 6", "Stock photo of a Red Ring for sale"]
    decoded = {tok.decode(tok.encode(pre_caption(t, 30)).ids) for t in pool}
    batches = _all(_corpus_source(pairs, tok, 1.0, pool))
    again = _all(_corpus_source(pairs, tok, 1.0, pool))
    assert all(torch.equal(a.negative_ids, b.negative_ids) for a, b in zip(batches, again))  # seeded
    drawn = []
    for b in batches:
        assert bool(b.has_negative.all())  # every caption brings one at share 1
        drawn += [tok.decode(b.negative_ids[r][b.negative_mask[r].bool()].tolist()) for r in range(len(b.has_negative))]
    assert set(drawn) == decoded  # pool texts only (in pre_caption form), each of them drawn
    half = [int(b.has_negative.sum()) for b in _all(_corpus_source(pairs, tok, 0.5, pool))]
    assert 0.25 * len(pairs) < sum(half) < 0.75 * len(pairs)
    with pytest.raises(CapfiltError, match="corpus_negative needs texts"):
        _corpus_source(pairs, tok, 0.5, [])
    with pytest.raises(ValueError, match="corpus_negative is 1.2"):
        TextAugmentConfig(exchange_negative=0.5, corpus_negative=0.7)


def test_corpus_negatives_without_a_pool_are_captions_of_other_images(corpus):
    pairs, tok = load_pairs([corpus[0]]), corpus[3]
    source = _corpus_source(pairs, tok, 1.0)
    texts = [pre_caption(c, 30) for c in pairs.caption]
    by_text: dict[str, set[int]] = {}
    for t, i in zip(texts, pairs.image_id):
        by_text.setdefault(t, set()).add(int(i))
    seen = 0
    for row, text in enumerate(texts):
        negative = source._negative(row, text)
        if negative is not None:
            seen += 1
            assert by_text[negative] - {int(pairs.image_id[row])}  # a caption some other image has
    assert seen > 0.9 * len(texts)
    two = _two_objects(pairs)  # two clauses per caption: a cut one is shorter
    cut = ManifestBatches(two, tok, TextInput(max_tokens=24), AugmentConfig(), 32, 8, seed=0, shuffle_buffer=16,
                          text_augment=TextAugmentConfig(partial=1.0, word_drop=0.0, corpus_negative=1.0))
    full = [pre_caption(c, 30) for c in two.caption]
    words = [set(t.split()) for t in full]
    negatives = [cut._negative(row, pre_caption(cut._caption(row), 30)) for row in range(len(full))]
    for row, negative in enumerate(negatives):
        if negative is not None:  # cut like the positives: part of some other image's caption
            assert any(set(negative.split()) <= w and two.image_id[i] != two.image_id[row] for i, w in enumerate(words))
    assert sum(n is not None and n not in full for n in negatives) > 0.3 * len(full)  # most of them cut


def test_a_swap_the_token_limit_cuts_off_is_no_negative(corpus):
    pairs, tok = load_pairs([corpus[0]]), corpus[3]
    short = ManifestBatches(pairs, tok, TextInput(max_tokens=4), AugmentConfig(), 32, 8, seed=0,
                            shuffle_buffer=16, text_augment=TextAugmentConfig(swap_negative=1.0))
    rows = [(b.has_negative, (b.negative_ids != b.input_ids).any(1)) for b in _all(short)]
    has, differ = torch.cat([h for h, _ in rows]), torch.cat([d for _, d in rows])
    assert torch.equal(has, differ)  # a negative is kept exactly where its tokens differ
    assert 0 < int(has.sum()) < len(has)  # [CLS] w1 w2 [SEP]: later swaps are cut off


def test_swap_negatives_are_seeded_and_differ_from_their_caption_by_one_word(corpus):
    pairs, tok = load_pairs([corpus[0]]), corpus[3]
    plain = _all(_source(pairs, tok))
    assert plain[0].negative_ids is None
    swapped = _all(_source(pairs, tok, swap=1.0))
    again = _all(_source(pairs, tok, swap=1.0))
    assert all(torch.equal(a.negative_ids, b.negative_ids) for a, b in zip(swapped, again))
    valid = 0
    for p, s in zip(plain, swapped):
        assert torch.equal(p.input_ids, s.input_ids[:, : p.input_ids.shape[1]])  # positives untouched
        assert s.negative_ids.shape == s.input_ids.shape and s.has_negative.dtype == torch.bool
        for row in range(len(s.has_negative)):
            pos = s.input_ids[row][s.attention_mask[row].bool()]
            neg = s.negative_ids[row][s.negative_mask[row].bool()]
            if s.has_negative[row]:
                valid += 1
                assert tok.decode(pos.tolist()) != tok.decode(neg.tolist())
                assert len(tok.decode(pos.tolist()).split()) == len(tok.decode(neg.tolist()).split())
    assert valid > 0.5 * sum(len(s.has_negative) for s in swapped)
    moved = swapped[0].to("cpu", torch.float64)
    assert moved.has_negative is not None and moved.image.dtype == torch.float64


def test_the_captioner_prompt_is_prepended_and_counted(corpus):
    pairs, tok = load_pairs([corpus[0]]), corpus[3]
    batch = _all(_source(pairs, tok, prompt="a picture of "))[0]
    prompt_ids = tok.encode("a picture of ").ids[:-1]  # [CLS] a picture of
    assert batch.prompt_length == len(prompt_ids) >= 4
    assert (batch.input_ids[:, : batch.prompt_length] == torch.tensor(prompt_ids)).all()


def test_too_few_pairs_for_a_global_batch_is_an_error(corpus):
    pairs = load_pairs([corpus[1]])  # 8 rows
    with pytest.raises(CapfiltError, match="fewer than one global batch"):
        _source(pairs, corpus[3], micro=8, world=2)
