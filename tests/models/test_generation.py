"""Tests for models/generation.py against small reference step decoders (a Markov table LM, a
random GRU decoder) and, for beam search, against transformers' own `generate` on a tiny random
BLIP text decoder."""

import itertools

import pytest
import torch
from torch import nn

from models.generation import GenerationConfig, decode_batch, generate, strip_prompt

PAD, EOS, DEC = 0, 1, 2


class TableLM:
    """Next-token logits = table[last token] + a per-image bias; the cache is the last token."""

    def __init__(self, table: torch.Tensor, dtype: torch.dtype = torch.float32):
        self.table, self.dtype = table, dtype
        self.prefill_rows: list[int] = []
        self.step_rows: list[int] = []
        self.reorder_sizes: list[int] = []

    def prefill(self, input_ids, image_embeds):  # image_embeds (B, 1, V): additive logit bias
        self.prefill_rows.append(input_ids.shape[0])
        cache = {"last": input_ids[:, -1], "bias": image_embeds[:, 0]}
        return self._logits(cache), cache

    def step(self, input_ids, cache):
        self.step_rows.append(input_ids.shape[0])
        cache = {"last": input_ids[:, 0], "bias": cache["bias"]}
        return self._logits(cache), cache

    def reorder(self, cache, index):
        self.reorder_sizes.append(index.numel())
        return {k: v[index] for k, v in cache.items()}

    def _logits(self, cache):
        return (self.table[cache["last"]] + cache["bias"]).to(self.dtype)


class GRUDecoder(nn.Module):
    """Random history-dependent decoder (float64, so batched and per-row runs agree bit-wise)."""

    def __init__(self, vocab: int = 23, hidden: int = 16, dim: int = 8, seed: int = 0,
                 eos_bias: float = 1.5, scale: float = 3.0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, hidden)
        self.img = nn.Linear(dim, hidden)
        self.cell = nn.GRUCell(hidden, hidden)
        self.out = nn.Linear(hidden, vocab)
        with torch.no_grad():
            self.out.weight.mul_(scale)
            self.out.bias[EOS] += eos_bias
            self.out.bias[PAD] -= 10.0
        self.double()
        self.step_rows: list[int] = []

    def prefill(self, input_ids, image_embeds):
        h = torch.tanh(self.img(image_embeds.mean(1)))  # (B, H)
        for t in range(input_ids.shape[1]):
            h = self.cell(self.emb(input_ids[:, t]), h)
        return self.out(h), h

    def step(self, input_ids, cache):
        self.step_rows.append(input_ids.shape[0])
        h = self.cell(self.emb(input_ids[:, 0]), cache)
        return self.out(h), h

    def reorder(self, cache, index):
        return cache[index]


def _table(rows: dict[int, dict[int, float]], vocab: int) -> torch.Tensor:
    """Log-prob table from sparse next-token probabilities (other tokens get ~1e-6)."""
    table = torch.full((vocab, vocab), 1e-6)
    for src, probs in rows.items():
        for dst, p in probs.items():
            table[src, dst] = p
    return table.log()


def _images(b: int, dim: int = 8, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 5, dim, generator=gen, dtype=torch.float64)


def _prompt(b: int) -> torch.Tensor:
    return torch.tensor([[DEC, 7, 8, 9]]).repeat(b, 1)


def _cfg(**kw) -> GenerationConfig:
    base = dict(eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=12)
    return GenerationConfig(**{**base, **kw})


def _seq_logprob(table: torch.Tensor, start: int, seq: tuple[int, ...]) -> float:
    logp = torch.log_softmax(table, dim=-1)
    return sum(float(logp[a, b]) for a, b in zip((start,) + seq[:-1], seq))


@pytest.mark.parametrize("rep,min_new,lp", [(1.0, 1, 1.0), (1.3, 4, 1.0), (1.6, 2, 0.6)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_equals_one_beam(seed, rep, min_new, lp):
    dec, img = GRUDecoder(seed=seed), _images(4, seed=seed)
    kw = dict(repetition_penalty=rep, min_new_tokens=min_new, length_penalty=lp)
    greedy = generate(dec, _prompt(4), img, _cfg(decoding="greedy", **kw))
    greedy_steps = len(dec.step_rows)
    dec.step_rows.clear()
    beam = generate(dec, _prompt(4), img, _cfg(decoding="beam", num_beams=1, **kw))
    assert torch.equal(greedy.tokens, beam.tokens)
    torch.testing.assert_close(greedy.scores, beam.scores)
    assert greedy_steps == len(dec.step_rows)
    assert (greedy.new_tokens == EOS).any(), "the case should exercise EOS"


def test_beam_finds_the_optimum_where_greedy_does_not():
    a, b, c = 3, 4, 5
    table = _table({DEC: {a: 0.5, b: 0.4, c: 0.1}, a: {a: 0.36, b: 0.34, c: 0.30},
                    b: {a: 0.05, b: 0.05, c: 0.9}, c: {a: 0.4, b: 0.3, c: 0.3}}, vocab=6)
    prompt, img = torch.tensor([[DEC]]), torch.zeros(1, 1, 6)
    kw = dict(max_new_tokens=3, min_new_tokens=3)  # fixed length: EOS blocked throughout
    non_eos = [t for t in range(6) if t != EOS]
    best = max(itertools.product(non_eos, repeat=3), key=lambda s: _seq_logprob(table, DEC, s))
    beam = generate(TableLM(table), prompt, img, _cfg(decoding="beam", num_beams=3, **kw))
    greedy = generate(TableLM(table), prompt, img, _cfg(decoding="greedy", **kw))
    assert tuple(beam.new_tokens[0].tolist()) == best == (a, b, c)  # .5*.34*.9
    assert tuple(greedy.new_tokens[0].tolist()) == (a, a, a)  # .5*.36*.36
    assert beam.scores[0].item() == pytest.approx(_seq_logprob(table, DEC, best) / 3, abs=1e-5)
    assert greedy.scores[0] < beam.scores[0]


def test_batched_beam_search_equals_per_image():
    dec, img, b = GRUDecoder(seed=3), _images(5, seed=3), 5
    cfg = _cfg(decoding="beam", num_beams=3, num_return_sequences=2, repetition_penalty=1.2,
               min_new_tokens=2)
    batched = generate(dec, _prompt(b), img, cfg)
    assert batched.tokens.shape[0] == b * 2
    single = [generate(dec, _prompt(1), img[i:i + 1], cfg) for i in range(b)]
    expected = [row for out in single for row in decode_batch(out.new_tokens, EOS, PAD)]
    assert decode_batch(batched.new_tokens, EOS, PAD) == expected
    torch.testing.assert_close(batched.scores, torch.cat([s.scores for s in single]))
    assert len({len(r) for r in expected}) > 1, "images should finish at different lengths"


@pytest.mark.parametrize("top_p", [0.0, 1e-6])
def test_nucleus_with_vanishing_top_p_is_greedy(top_p):
    dec, img = GRUDecoder(seed=4), _images(6, seed=4)
    greedy = generate(dec, _prompt(6), img, _cfg(decoding="greedy"))
    nucleus = generate(dec, _prompt(6), img, _cfg(decoding="nucleus", top_p=top_p, temperature=0.7),
                       generator=torch.Generator().manual_seed(0))
    assert torch.equal(greedy.tokens, nucleus.tokens)


# cumulative mass .30 .55 .70 .82 .90: the nucleus ends with the token that reaches top_p
@pytest.mark.parametrize("top_p,size", [(0.8, 4), (0.6, 3), (0.25, 1), (1.0, 8)])
def test_nucleus_samples_only_the_nucleus_with_renormalised_frequencies(top_p, size):
    probs = torch.tensor([0.30, 0.25, 0.15, 0.12, 0.08, 0.05, 0.03, 0.02])
    table = probs.log().expand(8, 8).clone()  # the same distribution from every state
    n = 4000
    cfg = _cfg(decoding="nucleus", top_p=top_p, max_new_tokens=1, min_new_tokens=0,
               num_return_sequences=n, eos_token_id=7, pad_token_id=6)
    out = generate(TableLM(table), torch.tensor([[DEC]]), torch.zeros(1, 1, 8), cfg,
                   generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(out.new_tokens[:, 0], minlength=8).double()
    assert counts[size:].sum() == 0 and (counts[:size] > 0).all()
    expected = probs[:size].double() / probs[:size].sum()
    freq = counts[:size] / n
    assert (freq - expected).abs().max() < 0.03  # ~4 standard deviations at n=4000
    torch.testing.assert_close(out.scores, probs.log()[out.new_tokens[:, 0]])


def test_nucleus_larger_than_the_first_top_k_window():
    v, top_p, n = 300, 0.9, 3000
    logits = torch.randn(v, generator=torch.Generator().manual_seed(0)) * 0.3  # flat, no ties
    sorted_p, order = logits.softmax(-1).sort(descending=True)
    nucleus = set(order[(sorted_p.cumsum(-1) - sorted_p) < top_p].tolist())
    assert 64 < len(nucleus) < v
    cfg = _cfg(decoding="nucleus", top_p=top_p, max_new_tokens=1, min_new_tokens=0,
               num_return_sequences=n, eos_token_id=v - 1)
    dec = TableLM(logits.expand(v, v).clone())
    out = generate(dec, torch.tensor([[DEC]]), torch.zeros(1, 1, v), cfg,
                   generator=torch.Generator().manual_seed(1))
    sampled = set(out.new_tokens[:, 0].tolist())
    assert sampled <= nucleus and len(sampled) > 0.8 * len(nucleus)


def test_nucleus_seed_reproducible_and_seed_sensitive():
    dec, img = GRUDecoder(seed=5), _images(2, seed=5)
    cfg = _cfg(decoding="nucleus", top_p=0.95, temperature=1.5, num_return_sequences=3)

    def run(seed):
        return generate(dec, _prompt(2), img, cfg, generator=torch.Generator().manual_seed(seed))

    first, again, other = run(11), run(11), run(12)
    assert torch.equal(first.tokens, again.tokens) and torch.equal(first.scores, again.scores)
    assert not torch.equal(first.tokens[:, :6], other.tokens[:, :6])
    assert first.tokens.shape[0] == 6 and len({tuple(r) for r in first.tokens.tolist()}) > 1


@pytest.mark.parametrize("decoding", ["nucleus", "beam"])
def test_k_sequences_per_image_are_image_major(decoding):
    b, k, v = 3, 2, 10
    table = torch.zeros(v, v)
    table[:, EOS] = -30.0
    bias = torch.zeros(b, 1, v)
    for i in range(b):
        bias[i, 0, 4 + i] = 5.0  # image i prefers token 4+i
    cfg = _cfg(decoding=decoding, num_beams=3, num_return_sequences=k, max_new_tokens=4)
    out = generate(TableLM(table), torch.full((b, 2), DEC), bias, cfg,
                   generator=torch.Generator().manual_seed(0))
    assert out.tokens.shape == (b * k, 2 + 4) and out.new_tokens.shape == (b * k, 4)
    assert out.scores.shape == (b * k,)
    assert torch.equal(strip_prompt(out.tokens, 2), out.new_tokens)
    for row in range(b * k):
        assert (out.new_tokens[row] == 4 + row // k).float().mean() >= 0.5
    if decoding == "beam":
        pairs = out.scores.view(b, k)
        assert (pairs[:, 0] >= pairs[:, 1]).all()
        assert torch.equal(out.new_tokens[0], torch.full((4,), 4))


def _eos_lover(v: int = 8) -> TableLM:
    table = torch.zeros(v, v)
    table[:, EOS] = 10.0
    return TableLM(table)


@pytest.mark.parametrize("decoding", ["greedy", "beam", "nucleus"])
@pytest.mark.parametrize("min_new", [1, 3])
def test_min_new_tokens_blocks_eos_and_search_stops_when_all_finished(decoding, min_new):
    dec, b = _eos_lover(), 3
    cfg = _cfg(decoding=decoding, min_new_tokens=min_new, max_new_tokens=20,
               num_return_sequences=2 if decoding != "greedy" else 1)
    out = generate(dec, torch.full((b, 2), DEC), torch.zeros(b, 1, 8), cfg,
                   generator=torch.Generator().manual_seed(0))
    first_eos = (out.new_tokens == EOS).int().argmax(dim=1)
    assert (out.new_tokens == EOS).any(dim=1).all()
    # as HF's min_length: EOS is allowed once min_new tokens exist, so it is token min_new + 1
    assert (first_eos == min_new).all()
    assert out.new_tokens.shape[1] == min_new + 1
    assert len(dec.step_rows) == min_new  # no step after every row has emitted EOS
    assert dec.prefill_rows == [b]


@pytest.mark.parametrize("decoding,rows,step_rows", [("greedy", 1, [1] * 4),
                                                     ("nucleus", 2, [2] * 4),
                                                     ("beam", 3, [6, 3, 3, 3])])
def test_prefill_once_then_expand_and_drop_finished_rows(decoding, rows, step_rows):
    v = 8
    table = torch.zeros(v, v)
    table[:, EOS] = -30.0
    bias = torch.zeros(2, 1, v)
    bias[0, 0, EOS] = 60.0  # image 0 ends at once, image 1 never
    dec = TableLM(table)
    cfg = _cfg(decoding=decoding, num_beams=3, max_new_tokens=5, min_new_tokens=0,
               num_return_sequences=1 if decoding != "nucleus" else 2)
    out = generate(dec, torch.full((2, 3), DEC), bias, cfg,
                   generator=torch.Generator().manual_seed(0))
    assert dec.prefill_rows == [2]
    if rows > 1:
        assert dec.reorder_sizes[0] == 2 * rows  # prefill rows expanded to beams / samples
    # image 0's rows leave the batch once it is done; a beam image needs num_beams finished
    # hypotheses first (HF's rule), which takes one more step here
    assert dec.step_rows == step_rows
    k = cfg.num_return_sequences
    assert (out.new_tokens[:k, 0] == EOS).all() and (out.new_tokens[:k, 1:] == PAD).all()
    assert (out.new_tokens[k:] != EOS).all() and out.new_tokens.shape[1] == 5


@pytest.mark.parametrize("decoding", ["greedy", "nucleus"])
def test_repetition_penalty_breaks_a_self_loop_and_covers_the_prompt(decoding):
    a, b = 3, 4
    table = _table({s: {a: 0.6, b: 0.4} for s in (DEC, a, b)}, vocab=5)
    kw = dict(decoding=decoding, top_p=0.0, max_new_tokens=4, min_new_tokens=4)
    gen = torch.Generator().manual_seed(0)

    def run(prompt, penalty):
        out = generate(TableLM(table), torch.tensor([prompt]), torch.zeros(1, 1, 5),
                       _cfg(repetition_penalty=penalty, **kw), generator=gen)
        return out.new_tokens[0].tolist()

    assert run([DEC], 1.0) == [a, a, a, a]
    # log .6 * 3 < log .4 once `a` was seen; when both were seen `a` wins again
    assert run([DEC], 3.0) == [a, b, a, a]
    assert run([DEC, a], 3.0)[0] == b  # the prompt counts as history (as in HF)


def test_beam_repetition_penalty_changes_the_beam():
    a, b = 3, 4
    table = _table({s: {a: 0.6, b: 0.4} for s in (DEC, a, b)}, vocab=5)
    kw = dict(decoding="beam", num_beams=2, max_new_tokens=3, min_new_tokens=3)
    img, prompt = torch.zeros(1, 1, 5), torch.tensor([[DEC]])
    plain = generate(TableLM(table), prompt, img, _cfg(**kw))
    penal = generate(TableLM(table), prompt, img, _cfg(repetition_penalty=3.0, **kw))
    assert plain.new_tokens[0].tolist() == [a, a, a]
    assert penal.new_tokens[0].tolist() != [a, a, a]
    assert penal.scores[0] < plain.scores[0]


@pytest.mark.parametrize("decoding", ["greedy", "beam", "nucleus"])
def test_works_under_inference_mode_with_bf16_logits(decoding):
    v = 12
    table = torch.randn(v, v, generator=torch.Generator().manual_seed(0)) * 3
    dec = TableLM(table, dtype=torch.bfloat16)
    with torch.inference_mode():
        out = generate(dec, torch.full((3, 2), DEC), torch.zeros(3, 1, v),
                       _cfg(decoding=decoding, max_new_tokens=6),
                       generator=torch.Generator().manual_seed(0))
    assert out.scores.dtype == torch.float32 and torch.isfinite(out.scores).all()
    assert out.tokens.dtype == torch.long and out.tokens.shape[0] == 3


def test_decode_batch_cuts_at_first_eos():
    rows = torch.tensor([[5, 6, EOS, PAD], [5, EOS, 7, EOS], [5, 6, 7, 8], [EOS, PAD, PAD, PAD]])
    assert decode_batch(rows, EOS, PAD) == [[5, 6], [5], [5, 6, 7, 8], []]
    assert strip_prompt(torch.arange(12).view(2, 6), 4).tolist() == [[4, 5], [10, 11]]


@pytest.mark.parametrize("bad", [dict(decoding="topk"), dict(num_beams=0), dict(max_new_tokens=0),
                                 dict(min_new_tokens=30), dict(repetition_penalty=0.0),
                                 dict(top_p=1.5), dict(temperature=0.0),
                                 dict(num_beams=2, num_return_sequences=3),
                                 dict(decoding="greedy", num_return_sequences=2)])
def test_invalid_config_is_rejected(bad):
    with pytest.raises(ValueError, match="invalid GenerationConfig"):
        _cfg(**bad)


def test_mismatched_batch_is_rejected():
    with pytest.raises(ValueError, match="one prompt row per image"):
        generate(_eos_lover(), torch.full((2, 2), DEC), torch.zeros(3, 1, 8), _cfg())


# ------------------------------------------------------------------- parity with transformers


class HFStepDecoder:
    """StepDecoder over transformers' BLIP text decoder and its own KV cache."""

    def __init__(self, model):
        self.model = model

    def prefill(self, input_ids, image_embeds):
        out = self.model(input_ids=input_ids, encoder_hidden_states=image_embeds, use_cache=True)
        return out.logits[:, -1], (out.past_key_values, image_embeds)

    def step(self, input_ids, cache):
        past, image_embeds = cache
        out = self.model(input_ids=input_ids, encoder_hidden_states=image_embeds,
                         past_key_values=past, use_cache=True)
        return out.logits[:, -1], (out.past_key_values, image_embeds)

    def reorder(self, cache, index):
        past, image_embeds = cache
        past.reorder_cache(index)
        return past, image_embeds[index]


def _tiny_blip_decoder(seed: int):
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel

    cfg = BlipTextConfig(vocab_size=40, hidden_size=16, encoder_hidden_size=12,
                         intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         bos_token_id=DEC, eos_token_id=EOS, sep_token_id=EOS, pad_token_id=PAD,
                         hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    model = BlipTextLMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)  # peakier distributions than the default init
        model.cls.predictions.bias[EOS] += 4.0 + seed  # make EOS common so hypotheses finish
    return model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beam_search_matches_transformers(seed):
    model, b, max_new = _tiny_blip_decoder(seed), 5, 12
    img = torch.randn(b, 5, 12, generator=torch.Generator().manual_seed(seed))
    prompt = _prompt(b)
    cases = [(1.0, 1.0, 3, 1), (1.1, 1.0, 3, 1), (1.5, 0.5, 4, 3), (1.2, 0.0, 2, 2)]
    finished = 0
    for rep, lp, nb, min_new in cases:
        cfg = _cfg(decoding="beam", num_beams=nb, max_new_tokens=max_new, min_new_tokens=min_new,
                   repetition_penalty=rep, length_penalty=lp, num_return_sequences=2)
        ours = generate(HFStepDecoder(model), prompt, img, cfg)
        ref = model.generate(input_ids=prompt, encoder_hidden_states=img, num_beams=nb,
                             max_length=4 + max_new, min_length=4 + min_new, repetition_penalty=rep,
                             length_penalty=lp, eos_token_id=EOS, pad_token_id=PAD, do_sample=False,
                             num_return_sequences=2, return_dict_in_generate=True,
                             output_scores=True)
        # HF pads finished rows with EOS when pad_token_id is 0, so compare the cut sequences
        ref_new = strip_prompt(ref.sequences, 4)
        assert decode_batch(ours.new_tokens, EOS, PAD) == decode_batch(ref_new, EOS, PAD)
        assert ours.new_tokens.shape == ref_new.shape
        torch.testing.assert_close(ours.scores, ref.sequences_scores, atol=1e-5, rtol=1e-5)
        finished += int((ours.new_tokens == EOS).any(dim=1).sum())
    assert finished > 0


def test_greedy_matches_transformers_without_penalty():
    model, b = _tiny_blip_decoder(3), 4
    img = torch.randn(b, 5, 12, generator=torch.Generator().manual_seed(3))
    ours = generate(HFStepDecoder(model), _prompt(b), img,
                    _cfg(decoding="greedy", min_new_tokens=2))
    ref = model.generate(input_ids=_prompt(b), encoder_hidden_states=img, num_beams=1,
                         do_sample=False,
                         max_length=16, min_length=6, eos_token_id=EOS, pad_token_id=PAD)
    assert decode_batch(ours.new_tokens, EOS, PAD) == decode_batch(strip_prompt(ref, 4), EOS, PAD)
    assert ours.new_tokens.shape[1] == ref.shape[1] - 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("decoding", ["beam", "nucleus"])
def test_cuda_matches_cpu_with_a_cpu_generator(decoding):
    dec, img = GRUDecoder(seed=6), _images(3, seed=6)
    cfg = _cfg(decoding=decoding, num_return_sequences=2, repetition_penalty=1.2)
    cpu = generate(dec, _prompt(3), img, cfg, generator=torch.Generator().manual_seed(0))
    gpu = generate(dec.cuda(), _prompt(3).cuda(), img.cuda(), cfg,
                   generator=torch.Generator().manual_seed(0))
    assert gpu.tokens.is_cuda
    assert decode_batch(gpu.new_tokens.cpu(), EOS, PAD) == decode_batch(cpu.new_tokens, EOS, PAD)
