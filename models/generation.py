"""Caption decoding over a KV-cached step decoder: batched beam search, greedy and nucleus sampling.

The search code only talks to a `StepDecoder` (prefill once per image, then one token per step, and
`reorder` to select/repeat cache rows), so the BLIP captioner and the tiny reference decoders of the
tests share it. Beam search follows the semantics of Hugging Face transformers (5.x) so captions can
be compared with `generate(num_beams=...)`: log-softmax scores, then the logits processors
(repetition penalty, then the EOS block of `min_new_tokens`), 2*num_beams candidates per image,
a bounded set of finished hypotheses scored by `sum_logprob / new_len**length_penalty` (new_len
counts the EOS), and HF's default `early_stopping=False` stopping heuristic. Greedy decoding is the
one-beam case of that search and returns the same tokens and scores. Nucleus sampling applies the
repetition penalty and EOS block to the raw logits, then temperature, then top-p. The repetition
penalty covers the prompt as well as the generated tokens, as HF does. Images whose search is over,
and sampled rows that emitted EOS, leave the decoder batch; the loop stops when none is left or
after `max_new_tokens`. All search math is done in float32 on the device the logits come in on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

Decoding = Literal["greedy", "beam", "nucleus"]
_NEG = -1.0e9  # HF's "impossible" score offset; kept additive so ties break as in HF


class StepDecoder(Protocol):
    """What the search needs from a captioner's text decoder."""

    def prefill(self, input_ids: Tensor, image_embeds: Tensor) -> tuple[Tensor, Any]:
        """input_ids (B, T) prompt; image_embeds (B, N, Dv) -> next-token logits (B, V), cache."""

    def step(self, input_ids: Tensor, cache: Any) -> tuple[Tensor, Any]:
        """input_ids (R, 1) newest token per cache row -> logits (R, V), cache."""

    def reorder(self, cache: Any, index: Tensor) -> Any:
        """Select/repeat cache rows: index (R',) long into the current R rows."""


@dataclass(frozen=True)
class GenerationConfig:
    decoding: Decoding = "beam"
    num_beams: int = 3  # beam width (beam only)
    max_new_tokens: int = 20  # generated tokens, EOS included (BLIP's max_length counts the prompt)
    min_new_tokens: int = 1  # EOS is blocked until this many new tokens exist
    repetition_penalty: float = 1.0  # CTRL/HF style over prompt + generated tokens; 1.0 = off
    top_p: float = 0.9  # nucleus mass (nucleus only); 0 keeps just the top token
    temperature: float = 1.0  # nucleus only
    num_return_sequences: int = 1  # captions per image: K samples, or the top-K beams
    length_penalty: float = 1.0  # beam/greedy score = sum_logprob / new_len**length_penalty
    eos_token_id: int = 102  # [SEP]
    pad_token_id: int = 0  # [PAD], fills positions after EOS

    def __post_init__(self) -> None:
        problems = []
        if self.decoding not in ("greedy", "beam", "nucleus"):
            problems.append(f"decoding must be greedy, beam or nucleus, got {self.decoding!r}")
        if self.num_beams < 1:
            problems.append(f"num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            problems.append(
                f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not 0 <= self.top_p <= 1:
            problems.append(f"top_p must be in [0, 1], got {self.top_p}")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0, got {self.temperature}")
        if self.num_return_sequences < 1:
            problems.append(f"num_return_sequences must be >= 1, got {self.num_return_sequences}")
        if self.decoding == "beam" and self.num_return_sequences > self.num_beams:
            problems.append("num_return_sequences must be <= num_beams for beam search")
        if self.decoding == "greedy" and self.num_return_sequences != 1:
            problems.append("greedy decoding returns one sequence per image "
                            "(num_return_sequences=1)")
        if problems:
            raise ValueError("invalid GenerationConfig: " + "; ".join(problems))


@dataclass(frozen=True)
class Generated:
    tokens: Tensor  # (B*K, T + L) prompt + generated, pad after EOS; rows image-major
    new_tokens: Tensor  # (B*K, L) generated part only, EOS included where produced
    scores: Tensor  # (B*K,) beam/greedy: length-normalised log-prob; nucleus: summed log-prob


def strip_prompt(tokens: Tensor, prompt_len: int) -> Tensor:
    """(R, T + L) -> (R, L): drop the prompt columns."""
    return tokens[:, prompt_len:]


def decode_batch(new_tokens: Tensor, eos_token_id: int, pad_token_id: int) -> list[list[int]]:
    """Token id lists, each cut before its first EOS; rows without EOS lose trailing padding."""
    rows = []
    for row in new_tokens.tolist():
        if eos_token_id in row:
            row = row[: row.index(eos_token_id)]
        else:
            while row and row[-1] == pad_token_id:
                row.pop()
        rows.append(row)
    return rows


@torch.no_grad()
def generate(decoder: StepDecoder, prompt_ids: Tensor, image_embeds: Tensor, cfg: GenerationConfig,
             generator: torch.Generator | None = None) -> Generated:
    """Decode K captions per image (image-major rows) with the search named by `cfg.decoding`.
    prompt_ids (B, T) long, image_embeds (B, N, Dv); raises ValueError on inconsistent inputs."""
    if prompt_ids.dim() != 2 or prompt_ids.shape[1] < 1 or prompt_ids.is_floating_point():
        raise ValueError("prompt_ids must be an integer (B, T>=1) tensor, "
                         f"got {tuple(prompt_ids.shape)} {prompt_ids.dtype}")
    if image_embeds.shape[0] != prompt_ids.shape[0]:
        raise ValueError(f"image_embeds has {image_embeds.shape[0]} rows but prompt_ids has "
                         f"{prompt_ids.shape[0]}; pass one prompt row per image")
    logits, cache = decoder.prefill(prompt_ids, image_embeds)
    vocab = logits.shape[-1]
    if not (0 <= cfg.eos_token_id < vocab and 0 <= cfg.pad_token_id < vocab):
        raise ValueError(f"eos_token_id {cfg.eos_token_id} / pad_token_id {cfg.pad_token_id} "
                         f"outside the decoder's vocabulary of {vocab}")
    prompt = prompt_ids.to(device=logits.device, dtype=torch.long)
    if cfg.decoding == "beam":
        new, scores = _beam_search(decoder, logits, cache, prompt, cfg)
    else:
        new, scores = _row_search(decoder, logits, cache, prompt, cfg, generator)
    tokens = torch.cat([prompt.repeat_interleave(cfg.num_return_sequences, dim=0), new], dim=1)
    logger.debug("%s decoding: %d rows, %d new tokens", cfg.decoding, new.shape[0], new.shape[1])
    return Generated(tokens=tokens, new_tokens=new, scores=scores)


# --------------------------------------------------------------------------- logits processors


def process_logits(scores: Tensor, history: Tensor, t: int, cfg: GenerationConfig) -> Tensor:
    """In place on a tensor the search owns, (R, V): the repetition penalty over history (R, S)
    (HF/CTRL rule: negative scores are multiplied, positive ones divided), then the EOS block while
    fewer than min_new_tokens exist."""
    if cfg.repetition_penalty != 1.0:
        seen = scores.gather(1, history)  # (R, S)
        seen = torch.where(seen < 0, seen * cfg.repetition_penalty, seen / cfg.repetition_penalty)
        scores.scatter_(1, history, seen)
    if t < cfg.min_new_tokens:
        scores[:, cfg.eos_token_id] = float("-inf")
    return scores


def _top_sorted(probs: Tensor, top_p: float) -> tuple[Tensor, Tensor]:
    """The descending head of probs (R, V) that holds the nucleus of every row, with its ids.
    A growing top-k: a full sort of a BERT vocabulary costs ~30x more on CPU."""
    v, k = probs.shape[-1], min(probs.shape[-1], 64)
    while True:
        head, ids = probs.topk(k, dim=-1)  # (R, k), sorted descending
        # the token after the head has mass-before = head mass, so it is out when that is >= top_p
        if k == v or bool((head.sum(-1) >= top_p).all()):
            return head, ids
        k = min(v, 4 * k)


def nucleus_sample(scores: Tensor, top_p: float, u: Tensor) -> Tensor:
    """Inverse-CDF sample from the smallest top set with mass >= top_p.
    scores (R, V), u (R,) uniforms in [0, 1) -> token ids (R,)."""
    probs = scores.softmax(dim=-1)
    if top_p >= 1.0:  # no truncation: sample in vocabulary order
        head, ids = probs, None
        keep = torch.ones_like(probs, dtype=torch.bool)
    else:
        head, ids = _top_sorted(probs, top_p)
        keep = (head.cumsum(-1) - head) < top_p  # mass strictly before a token < top_p
        keep[:, 0] = True  # the top token is always kept (top_p == 0 is argmax)
    cdf = (head * keep).cumsum(-1)  # (R, k) unnormalised CDF over the nucleus
    pos = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True)  # (R, 1)
    pos = torch.minimum(pos, keep.sum(-1, keepdim=True) - 1)  # rounding must not leave the nucleus
    return (pos if ids is None else ids.gather(1, pos)).squeeze(1)


# --------------------------------------------------------------------------- row-wise decoding


def _pick(logits: Tensor, history: Tensor, t: int, cfg: GenerationConfig,
          u: Tensor | None) -> tuple[Tensor, Tensor]:
    """Next token and its log-prob per row; greedy mirrors one-beam search, nucleus HF sampling."""
    if cfg.decoding == "greedy":
        logp = process_logits(F.log_softmax(logits.float(), dim=-1), history, t, cfg)
        tok = logp.argmax(dim=-1)
    else:
        scores = process_logits(logits.to(torch.float32, copy=True), history, t, cfg)
        logp = F.log_softmax(scores, dim=-1)
        tok = nucleus_sample(scores / cfg.temperature, cfg.top_p, u)
    return tok, logp.gather(1, tok.unsqueeze(1)).squeeze(1)


def _uniforms(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """n uniforms drawn on the generator's device (CPU generators work with CUDA logits)."""
    where = generator.device if generator is not None else device
    return torch.rand(n, generator=generator, device=where).to(device)


def _row_search(decoder: StepDecoder, logits: Tensor, cache: Any, prompt: Tensor,
                cfg: GenerationConfig, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Greedy or nucleus: K independent rows per image; finished rows leave the decoder batch."""
    dev, k = logits.device, cfg.num_return_sequences
    n = prompt.shape[0] * k
    if k > 1:
        rows = torch.arange(prompt.shape[0], device=dev).repeat_interleave(k)  # (B*K,)
        cache, logits, prompt = decoder.reorder(cache, rows), logits[rows], prompt[rows]
    live = torch.arange(n, device=dev)  # output row of each cache row
    alive = torch.ones(n, dtype=torch.bool, device=dev)  # per cache row: no EOS yet
    out = torch.full((n, cfg.max_new_tokens), cfg.pad_token_id, dtype=torch.long, device=dev)
    logp_sum = torch.zeros(n, device=dev)
    length = torch.zeros(n, dtype=torch.long, device=dev)
    for t in range(cfg.max_new_tokens):
        # one uniform per output row every step, so a row's draws do not depend on compaction
        u = _uniforms(n, generator, dev)[live] if cfg.decoding == "nucleus" else None
        history = torch.cat([prompt[live], out[live, :t]], dim=1)  # (R, T + t)
        tok, logp = _pick(logits, history, t, cfg, u)
        tok = torch.where(alive, tok, cfg.pad_token_id)
        out[live, t] = tok
        logp_sum[live] += torch.where(alive, logp, 0.0)
        length[live] += alive.long()
        alive = alive & (tok != cfg.eos_token_id)
        if t + 1 == cfg.max_new_tokens or not bool(alive.any()):
            break
        if 4 * int((~alive).sum()) >= alive.numel():  # drop finished rows once they are >= 1/4
            keep = alive.nonzero().squeeze(1)
            cache = decoder.reorder(cache, keep)
            live, alive, tok = live[keep], alive[keep], tok[keep]
        logits, cache = decoder.step(tok.unsqueeze(1), cache)
    width = int(length.max())
    if cfg.decoding == "greedy":
        logp_sum = logp_sum / length.clamp_min(1).float() ** cfg.length_penalty
    return out[:, :width], logp_sum


# --------------------------------------------------------------------------- beam search


@dataclass
class _Beams:
    """Search state of the A images still being decoded (mutable, internal)."""

    img: Tensor  # (A,) image index of each row
    run_seq: Tensor  # (A, nb, Lmax) running hypotheses, pad-filled
    run_scores: Tensor  # (A, nb) summed log-probs, sorted descending
    fin_seq: Tensor  # (A, nb, Lmax) best finished hypotheses
    fin_scores: Tensor  # (A, nb) length-normalised, sorted descending; _NEG when empty
    fin_len: Tensor  # (A, nb) new tokens in each finished hypothesis
    fin_done: Tensor  # (A, nb) slot holds a finished hypothesis
    open: Tensor  # (A,) HF's "improvement still possible" flag

    def select(self, keep: Tensor) -> _Beams:
        return _Beams(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))


def _init_beams(b: int, cfg: GenerationConfig, dev: torch.device) -> _Beams:
    nb, lmax = cfg.num_beams, cfg.max_new_tokens
    seq = torch.full((b, nb, lmax), cfg.pad_token_id, dtype=torch.long, device=dev)
    run_scores = torch.zeros(b, nb, device=dev)
    run_scores[:, 1:] = _NEG  # beams start as copies: only the first may propose tokens
    return _Beams(img=torch.arange(b, device=dev), run_seq=seq, run_scores=run_scores,
                  fin_seq=seq.clone(), fin_scores=torch.full((b, nb), _NEG, device=dev),
                  fin_len=torch.zeros(b, nb, dtype=torch.long, device=dev),
                  fin_done=torch.zeros(b, nb, dtype=torch.bool, device=dev),
                  open=torch.ones(b, dtype=torch.bool, device=dev))


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """x (A, M, ...) rows picked per image by idx (A, M') -> (A, M', ...)."""
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(*idx.shape, *x.shape[2:])
    return x.gather(1, idx)


def _beam_log_probs(logits: Tensor, st: _Beams, prompt: Tensor, t: int,
                    cfg: GenerationConfig) -> Tensor:
    """(A*R, V) logits with R rows per image (1 right after prefill) -> processed log-probs
    (A, nb, V)."""
    a, v = st.img.numel(), logits.shape[-1]
    r = logits.shape[0] // a
    hist = torch.cat([prompt[st.img].unsqueeze(1).expand(-1, r, -1), st.run_seq[:, :r, :t]], dim=2)
    logp = process_logits(F.log_softmax(logits.float(), dim=-1), hist.reshape(a * r, -1), t, cfg)
    return logp.view(a, r, v).expand(a, cfg.num_beams, v)


def _beam_update(st: _Beams, logp: Tensor, t: int, cfg: GenerationConfig) -> tuple[Tensor, Tensor]:
    """One HF beam step in place: returns parent beam (A, nb) of each new running beam and the
    (A, 2nb) mask of candidates that finished (EOS or the length limit)."""
    a, nb, v = logp.shape
    top_s, top_i = (logp + st.run_scores.unsqueeze(2)).view(a, nb * v).topk(2 * nb, dim=1)
    beam, tok = top_i // v, top_i % v  # (A, 2nb)
    cand = _gather(st.run_seq, beam)  # (A, 2nb, Lmax)
    cand[:, :, t] = tok
    hits = (tok == cfg.eos_token_id) | (t + 1 >= cfg.max_new_tokens)
    run_s = top_s + hits.float() * _NEG  # finished candidates cannot keep running
    nxt = run_s.topk(nb, dim=1).indices
    parent = beam.gather(1, nxt)
    st.run_seq, st.run_scores = _gather(cand, nxt), run_s.gather(1, nxt)
    # only the top-nb candidates may enter the finished set (closed images have already left the
    # batch, so HF's mask for them is not needed here)
    new_done = hits & (torch.arange(2 * nb, device=logp.device) < nb)
    fin_s = top_s / (t + 1) ** cfg.length_penalty + (~new_done).float() * _NEG
    merged = torch.cat([st.fin_scores, fin_s], dim=1)  # (A, 3nb)
    best = merged.topk(nb, dim=1).indices
    st.fin_scores = merged.gather(1, best)
    st.fin_seq = _gather(torch.cat([st.fin_seq, cand], dim=1), best)
    st.fin_len = torch.cat([st.fin_len, torch.full_like(tok, t + 1)], dim=1).gather(1, best)
    st.fin_done = torch.cat([st.fin_done, new_done], dim=1).gather(1, best)
    # HF early_stopping=False: stop an image once its best running beam, normalised by the current
    # length, cannot beat the worst of a full finished set
    best_run = st.run_scores[:, :1] / (t + 1) ** cfg.length_penalty
    worst = torch.where(st.fin_done, st.fin_scores.min(dim=1, keepdim=True).values, _NEG)
    st.open = st.open & (best_run > worst).any(dim=1)
    return parent, hits


def _beam_search(decoder: StepDecoder, logits: Tensor, cache: Any, prompt: Tensor,
                 cfg: GenerationConfig) -> tuple[Tensor, Tensor]:
    """Batched beam search; returns new tokens (B*K, L) and scores (B*K,)."""
    b = prompt.shape[0]
    st = _init_beams(b, cfg, logits.device)
    out_seq, out_scores = st.fin_seq.clone(), st.fin_scores.clone()
    out_len = st.fin_len.clone()
    for t in range(cfg.max_new_tokens):
        rows_per_img = logits.shape[0] // st.img.numel()
        parent, hits = _beam_update(st, _beam_log_probs(logits, st, prompt, t, cfg), t, cfg)
        stop_all = bool(hits.all())
        keep = torch.zeros_like(st.open) if stop_all else st.open
        gone = (~keep).nonzero().squeeze(1)
        out_seq[st.img[gone]], out_scores[st.img[gone]] = st.fin_seq[gone], st.fin_scores[gone]
        out_len[st.img[gone]] = st.fin_len[gone]
        if gone.numel() == keep.numel():
            break
        kept = keep.nonzero().squeeze(1)  # (A',)
        index = (kept.unsqueeze(1) * rows_per_img + parent[kept]).reshape(-1)  # (A'*nb,)
        st = st.select(kept)
        cache = decoder.reorder(cache, index)
        logits, cache = decoder.step(st.run_seq[:, :, t].reshape(-1, 1), cache)
    k = cfg.num_return_sequences
    width = int(out_len[:, :k].max())
    return out_seq[:, :k, :width].reshape(b * k, width), out_scores[:, :k].reshape(b * k)
