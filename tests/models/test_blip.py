"""BLIP models: presets, encoder/decoder sharing, decoupling, momentum, queues, ITM scoring."""

import copy

import pytest
import torch
import torch.nn.functional as F

from models.blip import BlipCaptioner, BlipFilter, BlipPretrain, count_parameters
from models.blip_base import with_first_token
from models.config import resolve_config
from models.losses import image_id_targets, itm_labels, itm_loss, lm_labels, lm_loss

TINY = resolve_config("tiny", {"text.num_layers": 2, "vision.depth": 2, "queue_size": 16, "text.vocab_size": 60})
B, T = 4, 8


def _batch(cfg=TINY, b=B, t=T, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    image = torch.randn(b, 3, size, size, generator=g)
    ids = torch.randint(5, cfg.text.vocab_size, (b, t), generator=g)
    ids[:, 0] = cfg.text.cls_token_id
    mask = torch.ones(b, t, dtype=torch.long)
    mask[0, t - 2:] = 0
    ids[0, t - 2:] = cfg.text.pad_token_id
    return image, ids, mask


@pytest.fixture(scope="module")
def pretrain():
    torch.manual_seed(0)
    return BlipPretrain(TINY)


def test_tiny_pretrain_step_reaches_every_objective(pretrain):
    image, ids, mask = _batch()
    pretrain.zero_grad()
    out = pretrain(image, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(0))
    for value in (out.loss, out.loss_itc, out.loss_itm, out.loss_lm):
        assert value.dim() == 0 and torch.isfinite(value)
    torch.testing.assert_close(out.loss, out.loss_itc + out.loss_itm + out.loss_lm)
    assert 0.0 <= out.itm_accuracy.item() <= 1.0 and not out.itm_accuracy.requires_grad
    out.loss.backward()
    layer = pretrain.text_encoder.encoder.layer[0]
    dec_layer = pretrain.text_decoder.bert.encoder.layer[0]
    for p in (layer.crossattention.self.key.weight, layer.attention.self.query.weight,
              dec_layer.attention.self.query.weight, pretrain.itm_head.weight, pretrain.temp,
              pretrain.visual_encoder.pos_embed, pretrain.text_decoder.cls.predictions.bias):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in pretrain.visual_encoder_m.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["base", "large"])
def test_big_presets_at_reduced_depth(preset):
    cfg = resolve_config(preset, {"vision.depth": 1, "text.num_layers": 1, "queue_size": 8})
    torch.manual_seed(0)
    model = BlipPretrain(cfg)
    image, ids, mask = _batch(cfg, b=2, t=6)
    with torch.no_grad():
        embeds = model.encode_image(image)
        out = model(image, ids, mask, alpha=0.4)
    assert embeds.shape == (2, 197, cfg.vision.width)
    assert torch.isfinite(out.loss)
    assert model.text_encoder.encoder.layer[0].crossattention.self.key.in_features == cfg.vision.width


def test_sharing_scheme(pretrain):
    enc, dec = pretrain.text_encoder, pretrain.text_decoder.bert
    assert dec.embeddings.word_embeddings.weight is enc.embeddings.word_embeddings.weight
    assert pretrain.text_decoder.cls.predictions.decoder.weight is enc.embeddings.word_embeddings.weight
    for el, dl in zip(enc.encoder.layer, dec.encoder.layer):
        assert dl.crossattention.self.key.weight is el.crossattention.self.key.weight
        assert dl.crossattention.output.LayerNorm.weight is el.crossattention.output.LayerNorm.weight
        assert dl.intermediate.dense.weight is el.intermediate.dense.weight
        assert dl.output.LayerNorm.bias is el.output.LayerNorm.bias
        assert dl.attention.self.query.weight is not el.attention.self.query.weight
        assert dl.attention.output.dense.weight is not el.attention.output.dense.weight
    # the momentum encoder is a separate copy
    assert pretrain.text_encoder_m.embeddings.word_embeddings.weight is not enc.embeddings.word_embeddings.weight
    state = pretrain.state_dict()
    for name in ["encoder.layer.1.crossattention.self.query.weight", "encoder.layer.1.output.dense.weight",
                 "embeddings.word_embeddings.weight", "encoder.layer.1.attention.self.key.bias"]:
        assert f"text_encoder.{name}" in state and f"text_decoder.bert.{name}" in state
    assert {"image_queue", "text_queue", "queue_ptr", "temp", "vision_proj_m.weight", "itm_head.weight",
            "text_decoder.cls.predictions.decoder.weight", "visual_encoder_m.cls_token"} <= set(state)
    # unique trainable parameters: the decoder only adds its self-attention and LM transform
    layer = enc.encoder.layer[0]
    self_attn = sum(p.numel() for p in layer.attention.parameters())
    head = sum(p.numel() for p in pretrain.text_decoder.cls.predictions.transform.parameters())
    head += pretrain.text_decoder.cls.predictions.bias.numel()
    encoder_side = sum(p.numel() for n, p in pretrain.named_parameters()
                       if p.requires_grad and not n.startswith("text_decoder"))
    assert count_parameters(pretrain, trainable_only=True) == encoder_side + len(enc.encoder.layer) * self_attn + head


def test_unshared_cross_attention_option():
    cfg = resolve_config("tiny", {"text.num_layers": 1, "vision.depth": 1, "share_cross_attention": False,
                                  "queue_size": 16, "text.vocab_size": 60})
    model = BlipPretrain(cfg)
    el, dl = model.text_encoder.encoder.layer[0], model.text_decoder.bert.encoder.layer[0]
    assert dl.crossattention.self.key.weight is not el.crossattention.self.key.weight
    assert dl.intermediate.dense.weight is el.intermediate.dense.weight
    image, ids, mask = _batch(cfg)
    assert torch.isfinite(model(image, ids, mask, alpha=0.4).loss)


def test_lm_loss_with_shared_image_keys_equals_plain_decoder(pretrain):
    pretrain.eval()
    image, ids, mask = _batch(seed=2)
    with torch.no_grad():
        out = pretrain(image, ids, mask, alpha=0.0)
        dec_ids = with_first_token(ids, TINY.text.bos_token_id)
        logits = pretrain.text_decoder(dec_ids, mask, pretrain.visual_encoder(image))
        expected = lm_loss(logits, lm_labels(dec_ids, mask), TINY.label_smoothing)
    pretrain.train()
    torch.testing.assert_close(out.loss_lm, expected)


def test_temp_is_clamped(pretrain):
    image, ids, mask = _batch()
    for start, clamped in [(2.0, 0.5), (1e-5, 0.001)]:
        with torch.no_grad():
            pretrain.temp.fill_(start)
            pretrain(image, ids, mask, alpha=0.4)
        assert pretrain.temp.item() == pytest.approx(clamped)
    with torch.no_grad():
        pretrain.temp.fill_(0.07)


def test_momentum_update_happens_before_momentum_forward(pretrain):
    image, ids, mask = _batch()
    online = pretrain.visual_encoder.patch_embed.proj.weight.detach().clone()
    before = pretrain.visual_encoder_m.patch_embed.proj.weight.detach().clone()
    seen = {}

    def record(module, args):
        seen.setdefault("w", module.patch_embed.proj.weight.detach().clone())

    hook = pretrain.visual_encoder_m.register_forward_pre_hook(record)
    try:
        with torch.no_grad():
            pretrain(image, ids, mask, alpha=0.4)
    finally:
        hook.remove()
    m = TINY.momentum
    torch.testing.assert_close(seen["w"], m * before + (1 - m) * online)
    assert not torch.equal(seen["w"], before)


def test_queue_holds_momentum_features_and_gather_is_injected(pretrain):
    image, ids, mask = _batch(seed=3)
    pretrain.eval()
    with torch.no_grad():
        pretrain.queue_ptr.zero_()
        pretrain(image, ids, mask, alpha=0.4)
        assert pretrain.queue_ptr.item() == B
        feat_m, text_m = pretrain.momentum_features(image, with_first_token(ids, TINY.text.cls_token_id), mask)
        torch.testing.assert_close(pretrain.image_queue[:, :B], feat_m.t())
        torch.testing.assert_close(pretrain.text_queue[:, :B], text_m.t())
        pretrain.gather = lambda x: torch.cat([x, x])  # two fake ranks
        try:
            pretrain(image, ids, mask, alpha=0.4)
            assert pretrain.queue_ptr.item() == B + 2 * B
            with pytest.raises(ValueError, match="queue_size 16 is not a multiple of the global batch 6"):
                pretrain(image[:3], ids[:3], mask[:3], alpha=0.4)
        finally:
            pretrain.gather = lambda x: x
    pretrain.train()


def test_decoupled_copies_from_pretrain_state(pretrain):
    state = pretrain.state_dict()
    captioner = BlipCaptioner.from_pretrain_state_dict(TINY, state)
    filt = BlipFilter.from_pretrain_state_dict(TINY, state)
    torch.testing.assert_close(captioner.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight,
                               state["text_decoder.bert.encoder.layer.0.crossattention.self.key.weight"])
    torch.testing.assert_close(filt.text_encoder_m.embeddings.word_embeddings.weight,
                               state["text_encoder_m.embeddings.word_embeddings.weight"])
    torch.testing.assert_close(filt.image_queue, state["image_queue"])
    assert filt.ptr_queue.item() == 0 and filt.idx_queue.eq(-100).all()
    with torch.no_grad():
        captioner.text_decoder.bert.embeddings.word_embeddings.weight.add_(1.0)
    assert not torch.equal(captioner.text_decoder.bert.embeddings.word_embeddings.weight,
                           filt.text_encoder.embeddings.word_embeddings.weight)
    assert not torch.equal(captioner.text_decoder.bert.embeddings.word_embeddings.weight,
                           pretrain.text_encoder.embeddings.word_embeddings.weight)
    # the LM head stays tied inside the captioner
    assert captioner.text_decoder.cls.predictions.decoder.weight is \
        captioner.text_decoder.bert.embeddings.word_embeddings.weight
    broken = {k: v for k, v in state.items() if not k.startswith("text_decoder.cls")}
    with pytest.raises(ValueError, match="text_decoder.cls.predictions"):
        BlipCaptioner.from_pretrain_state_dict(TINY, broken)
    other_vocab = resolve_config("tiny", {"text.num_layers": 2, "vision.depth": 2, "queue_size": 16,
                                          "text.vocab_size": 61})
    with pytest.raises(ValueError, match="word_embeddings.weight has shape"):
        BlipCaptioner.from_pretrain_state_dict(other_vocab, state)
    smaller_queue = resolve_config("tiny", {"text.num_layers": 2, "vision.depth": 2, "queue_size": 8,
                                            "text.vocab_size": 60})
    assert BlipFilter.from_pretrain_state_dict(smaller_queue, state).image_queue.shape == (128, 8)


def test_filter_step_with_image_id_positives():
    torch.manual_seed(0)
    filt = BlipFilter(TINY)
    image, ids, mask = _batch()
    out = filt(image, ids, mask, torch.tensor([5, 5, 6, 7]), alpha=0.4, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and filt.itm_head.weight.grad.abs().sum() > 0
    assert filt.idx_queue[0, :B].tolist() == [5, 5, 6, 7] and filt.ptr_queue.item() == B
    # every caption of one image: no negative exists, ITM falls back to positives only
    same = filt(image, ids, mask, torch.zeros(B, dtype=torch.long), alpha=0.4)
    assert torch.isfinite(same.loss)


def test_pretrain_itc_image_positives():
    torch.manual_seed(0)
    base = BlipPretrain(TINY)
    image, ids, mask = _batch()

    def step(model, image_ids, image_positives):
        return model(image, ids, mask, alpha=0.4, image_ids=image_ids, image_positives=image_positives,
                     generator=torch.Generator().manual_seed(0))
    distinct = torch.arange(B)
    plain = step(copy.deepcopy(base), distinct, False)
    # distinct ids and an empty id queue: the targets are BLIP's diagonal, so is the loss
    torch.testing.assert_close(step(copy.deepcopy(base), distinct, True).loss_itc, plain.loss_itc)
    shared = torch.tensor([5, 5, 6, 7])
    model = copy.deepcopy(base)
    with_pos = step(model, shared, True)
    assert not torch.allclose(with_pos.loss_itc, step(copy.deepcopy(base), shared, False).loss_itc)
    assert model.idx_queue[0, :B].tolist() == [5, 5, 6, 7] and model.idx_queue[0, B:].eq(-100).all()
    # next step: the queued captions of image 5 are positives of this batch's image-5 rows
    targets = image_id_targets(shared, model.idx_queue)
    assert targets[0, B:B + 2].tolist() == [0.25, 0.25] and targets[2, B + 2].item() == 0.5
    with pytest.raises(ValueError, match="image_positives needs image_ids"):
        step(copy.deepcopy(base), None, True)
    # a filter built from this pre-trained state starts its own id queue
    assert BlipFilter.from_pretrain_state_dict(TINY, model.state_dict()).idx_queue.eq(-100).all()


@pytest.mark.parametrize("cls", [BlipPretrain, BlipFilter])
def test_word_swap_negatives_join_the_itm_batch_as_mismatches(cls):
    torch.manual_seed(0)
    model = cls(TINY)
    image, ids, mask = _batch()
    swapped = ids.clone()
    swapped[:, 2] = (swapped[:, 2] + 1) % TINY.text.vocab_size
    valid = torch.tensor([True, False, True, True])
    logits = []
    hook = model.itm_head.register_forward_hook(lambda m, i, out: logits.append(out.detach()))

    def run(negatives=None):
        return model(image, ids, mask, image_ids=torch.arange(B), alpha=0.4,
                     generator=torch.Generator().manual_seed(1), negatives=negatives)
    try:
        plain = run()
        none_valid = run((swapped, mask, torch.zeros(B, dtype=torch.bool)))
        out = run((swapped, mask, valid))
    finally:
        hook.remove()
    assert [x.shape[0] for x in logits] == [3 * B, 3 * B, 3 * B + 3]  # one more row per valid negative
    torch.testing.assert_close(none_valid.loss_itm, plain.loss_itm)
    labels = itm_labels(B, 2 * B + 3)
    per_row = F.cross_entropy(logits[2], labels, reduction="none")
    weight = torch.ones(len(labels))
    weight[:B] = TINY.itm_positive_weight
    weight[:B][valid] *= 2.0  # the positive of a row with an extra negative counts twice
    want = (per_row * weight).sum() / weight.sum()
    torch.testing.assert_close(out.loss_itm, want)  # every added row is labelled a mismatch
    with torch.no_grad():  # ... and scores the swapped text against its own image
        own = model.itm_logits(model.encode_image(image), swapped[valid], mask[valid], torch.arange(B)[valid])
    torch.testing.assert_close(logits[2][-3:], own, atol=1e-5, rtol=1e-4)
    out.loss.backward()
    assert torch.isfinite(out.loss)


@pytest.mark.parametrize("cls", [BlipPretrain, BlipFilter])
def test_itm_negative_hardness_scales_the_sampling_logits(cls):
    sim = torch.tensor([[10.0, 0.0, 2.0, -3.0], [1.0, 8.0, 0.0, 0.0]])
    positive = torch.tensor([[True, False, False, False], [False, True, True, False]])
    hard = cls(resolve_config("tiny", {"text.num_layers": 1, "vision.depth": 1, "queue_size": 16,
                                       "text.vocab_size": 60}))
    w_hard, _ = hard.negative_weights(sim, sim, positive, 0.0)
    expected = torch.softmax(sim, 1).masked_fill(positive, 0.0)
    torch.testing.assert_close(w_hard, expected)
    uniform = cls(resolve_config("tiny", {"text.num_layers": 1, "vision.depth": 1, "queue_size": 16,
                                          "text.vocab_size": 60, "itm_negative_hardness": 0.0}))
    w_t2i, w_i2t = uniform.negative_weights(sim, -sim, positive, 0.0)
    for w in (w_t2i, w_i2t):  # the same weight on every non-positive, whatever the similarity
        assert (w[positive] == 0).all()
        assert torch.allclose(w[0, 1:], w[0, 1]) and torch.allclose(w[1, [0, 3]], w[1, 0])
        assert w[1, 0] > 0


def test_filter_negative_all_rank_path():
    cfg = resolve_config("tiny", {"text.num_layers": 1, "vision.depth": 1, "queue_size": 16,
                                  "text.vocab_size": 60, "negative_all_rank": True})
    torch.manual_seed(0)
    filt = BlipFilter(cfg)
    image, ids, mask = _batch(cfg)
    out = filt(image, ids, mask, torch.arange(B), alpha=0.4)
    out.loss.backward()
    assert torch.isfinite(out.loss) and filt.visual_encoder.cls_token.grad is not None


def test_itm_scores_encode_each_image_once_and_match_unbatched(pretrain):
    pretrain.eval()
    calls = []
    hook = pretrain.visual_encoder.register_forward_hook(lambda *a: calls.append(1))
    images, ids, mask = _batch(seed=4)
    ids = ids.repeat(2, 1)[:6]
    mask = mask.repeat(2, 1)[:6]
    index = torch.tensor([0, 0, 1, 1, 2, 3])
    try:
        with torch.inference_mode():
            embeds = pretrain.encode_image(images)
            scores = pretrain.itm_scores(embeds, ids, mask, index)
            sims = pretrain.itc_similarity(embeds, ids, mask)
            texts = [row[m.bool()] for row, m in zip(ids, mask)]
            listed = pretrain.itm_scores(embeds, texts, None, index)
    finally:
        hook.remove()
    assert len(calls) == 1 and scores.shape == (6,) and sims.shape == (B, 6)
    assert ((scores > 0) & (scores < 1)).all() and sims.abs().max() <= 1 + 1e-5
    torch.testing.assert_close(listed, scores, rtol=0, atol=1e-5)
    with torch.no_grad():
        for row in range(6):
            enc = with_first_token(ids[row:row + 1], TINY.text.enc_token_id)
            hidden = pretrain.text_encoder(enc, mask[row:row + 1], "multimodal", embeds[index[row]][None])
            single = pretrain.itm_head(hidden[:, 0]).softmax(1)[0, 1]
            assert scores[row].item() == pytest.approx(single.item(), abs=1e-5)
    pretrain.train()


def test_captioner_step_decoder_matches_full_forward():
    torch.manual_seed(0)
    captioner = BlipCaptioner(TINY).eval()
    image, ids, mask = _batch(seed=5)
    ids = with_first_token(ids, TINY.text.bos_token_id)
    with torch.inference_mode():
        embeds = captioner.encode_image(image)
        full = captioner.decoder_logits(ids, None, embeds)
        decoder = captioner.step_decoder()
        logits, cache = decoder.prefill(ids[:, :2], embeds)
        out = [logits]
        for t in range(2, T):
            logits, cache = decoder.step(ids[:, t:t + 1], cache)
            out.append(logits)
        cache = decoder.reorder(cache, torch.tensor([3, 3, 0]))
        assert cache.batch_size == 3
    torch.testing.assert_close(torch.stack(out, 1), full[:, 1:], rtol=0, atol=1e-5)
    loss = captioner(image, ids, mask, prompt_length=3)
    loss.loss.backward()
    assert torch.isfinite(loss.loss) and captioner.visual_encoder.cls_token.grad is not None


def test_momentum_step_gathers_a_group_at_a_time_and_matches_one_pass(pretrain):
    import contextlib
    import copy

    a, b = copy.deepcopy(pretrain), copy.deepcopy(pretrain)
    with torch.no_grad():
        for p in a.visual_encoder.parameters():
            p.add_(0.5)  # so the EMA has somewhere to go
        for p in b.visual_encoder.parameters():
            p.add_(0.5)
    seen: list[int] = []

    def gathered(params):
        seen.append(len(params))
        return contextlib.nullcontext()

    a.momentum_step(gathered, group_size=3)
    b.momentum_step()
    assert seen[0] == 1 and max(seen[1:]) == 6  # temp alone, then at most 3 (online, momentum) pairs
    pairs = sum(len(list(online.parameters())) for online, _ in a.momentum_pairs())
    assert sum(seen[1:]) == 2 * pairs  # every pair exactly once
    for (key, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=key)
    moved = a.visual_encoder_m.patch_embed.proj.weight - pretrain.visual_encoder_m.patch_embed.proj.weight
    assert float(moved.abs().max()) > 0
