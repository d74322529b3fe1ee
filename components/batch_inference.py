"""Batched inference shared by the bootstrap and evaluate stages: models, shard images, texts, captions.

`load_captioner` / `load_filter` open exported model directories (weights, config, tokenizer;
a class check names a directory that holds the wrong model) on the best device, and record the
short sha256 of `model.safetensors` that bootstrapped manifests carry as provenance. `Images`
decodes shard members and transforms them once per model input size (squash-resize + CLIP
normalisation, BLIP's eval transform). `tokenize` turns texts into padded ids as training does
(`pre_caption`, `[CLS] ... [SEP]`, truncation keeping `[SEP]`). `caption` runs the captioner:
beam and greedy through `models.generation.generate`; nucleus through `sample_nucleus`, which
draws each row's uniforms from that image's own generator, so a caption depends on (seed, image)
only — not on the batch it was decoded in, the rank, or a restart. `caption_with_confidence` also
scores each caption by the captioner's own per-token probability (one teacher-forced pass).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from components.config import AugmentConfig, TextInput
from components.data import build_transform, encode_texts
from components.errors import CapfiltError
from components.hardware import warn_emulated_bf16
from components.model_io import load_any_tokenizer, load_model
from components.shards import ShardReader
from components.text import pre_caption
from models.generation import GenerationConfig, StepDecoder, decode_batch, generate

# The sampling rules (repetition penalty + EOS block, then top-p) are reused, not copied.
from models.generation import nucleus_sample, process_logits


@dataclass
class Loaded:
    """An exported model (eval mode, on its device), its tokenizer and the short hash of its weights."""

    model: Any  # BlipCaptioner | BlipFilter | BlipPretrain
    tokenizer: Any  # tokenizers.Tokenizer
    digest: str  # first 16 hex digits of sha256(model.safetensors)
    image_size: int


def device(local_rank: int = 0) -> torch.device:
    """This rank's GPU when there are any (one per local rank), else the CPU (never hard-coded)."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def inference_dtype(dev: torch.device, precision: str = "auto") -> torch.dtype:
    """Inference precision: `auto` = bf16 on a GPU, fp32 on the CPU; `bf16` = bf16 on either (worth
    it on CPUs with native bf16 matmuls: AVX512-BF16 or AMX); `fp32`."""
    if precision not in ("auto", "fp32", "bf16"):
        raise CapfiltError(f"unknown inference precision {precision!r}; use auto, fp32 or bf16")
    if precision == "bf16" or (precision == "auto" and dev.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def autocast(dev: torch.device, precision: str = "auto") -> AbstractContextManager[Any]:
    """bf16 autocast where `inference_dtype` is bf16, else nothing (plain fp32)."""
    if inference_dtype(dev, precision) == torch.bfloat16:
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return nullcontext()


def for_inference(loaded: Loaded, precision: str = "auto") -> Loaded:
    """Store a loaded model's weights in its inference dtype (in place; returns `loaded`).

    Under bf16 autocast, fp32 weights are cast again at every call; with few rows per call (a
    decoding step) that is a third of the time: a 768-wide MLP on 64 rows took 1.22 ms with fp32
    weights and 0.80 ms with bf16 ones on a 2-core AVX512-BF16 CPU. Never for training."""
    dev = next(loaded.model.parameters()).device
    loaded.model.to(inference_dtype(dev, precision))
    return loaded


def checkpoint_hash(directory: Path | str) -> str:
    """Short sha256 of `directory/model.safetensors`, streamed (base/large files are big)."""
    path = Path(directory) / "model.safetensors"
    if not path.is_file():
        raise CapfiltError(f"{path}: not found; is {directory} an exported capfilt model directory?")
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _load(directory: Path | str, kinds: tuple[str, ...], dev: torch.device, precision: str) -> Loaded:
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CapfiltError(f"{directory}: no exported model (config.json missing); train or convert one first")
    # an unknown precision fails here, before the weights are read
    if inference_dtype(dev, precision) == torch.bfloat16 and dev.type == "cpu":
        warn_emulated_bf16("precision bf16")
    model = load_model(directory, kinds).to(dev).eval()
    loaded = Loaded(model, load_any_tokenizer(directory), checkpoint_hash(directory),
                    model.config.vision.image_size)
    return for_inference(loaded, precision)


def load_captioner(directory: Path | str, dev: torch.device, precision: str = "auto") -> Loaded:
    """A captioner (or pre-trained) model directory: weights + config + tokenizer, the weights in
    the inference dtype of `precision` (run it under `autocast(dev, precision)`)."""
    return _load(directory, ("captioner", "pretrain"), dev, precision)


def load_filter(directory: Path | str, dev: torch.device, precision: str = "auto") -> Loaded:
    """A filter (or pre-trained) model directory: weights + config + tokenizer, as `load_captioner`."""
    return _load(directory, ("filter", "pretrain"), dev, precision)


class Images:
    """Decodes shard members (paths relative to `root`) and transforms them per input size."""

    def __init__(self, root: Path) -> None:
        self.reader = ShardReader(root, max_open=16)
        self._transforms: dict[int, Any] = {}

    def load(self, shards: Sequence[str], members: Sequence[str]) -> list[Image.Image]:
        images = []
        for shard, member in zip(shards, members, strict=True):
            try:
                data = self.reader.read(shard, member)
                images.append(Image.open(io.BytesIO(data)).convert("RGB"))
            except (OSError, KeyError) as exc:
                raise CapfiltError(f"{self.reader.root / shard}: cannot read image {member!r}: {exc}") from None
        return images

    def tensor(self, images: Sequence[Image.Image], size: int, dev: torch.device) -> Tensor:
        """(B, 3, size, size) normalised, on `dev`."""
        if size not in self._transforms:
            self._transforms[size] = build_transform(size, AugmentConfig(enabled=False))
        transform = self._transforms[size]
        return torch.stack([transform(im) for im in images]).to(dev)

    def close(self) -> None:
        self.reader.close()


def tokenize(tokenizer: Any, texts: Sequence[str], text: TextInput, dev: torch.device) -> tuple[Tensor, Tensor]:
    """Texts -> ids (M, T) `[CLS] words [SEP] [PAD]...` and attention mask (M, T), as training."""
    ids, mask = encode_texts(tokenizer, [pre_caption(t, text.max_words) for t in texts], text.max_tokens)
    return ids.to(dev), mask.to(dev)


def score_texts(filt: Loaded, image: torch.Tensor, texts: list[str], image_index: torch.Tensor,
                text_cfg: TextInput) -> tuple[list[float], list[float]]:
    """ITM p(match) and ITC cosine of each text against its image; image (B, 3, H, W) encoded once."""
    itm, itc, _ = text_scores(filt, image, texts, image_index, text_cfg)
    return itm, itc


ImageId = tuple[str, str]  # (resolved manifest folder, image key): one image across manifests


PRIOR_BANK = 64  # reference images a text prior is measured against (at most; fewer in a smaller corpus)


@dataclass(frozen=True)
class PriorBank:
    """Reference images for text priors (`BootstrapConfig.prior_images`): a seeded sample of a
    corpus's images, encoded once. Each text is matched against `k` of them, picked from its
    image's key alone (never its own image), so its prior does not depend on the batch, the shard
    or the rank it was scored in."""

    embeds: Tensor  # (R, 1+N, Dv) image embeddings from the filter's `encode_image`
    keys: tuple[ImageId, ...]  # (R,) image identities (`image_ids`)
    k: int
    seed: int

    def choice(self, keys: Sequence[ImageId]) -> Tensor:
        """(M, k) long: bank rows for each text's image (`image_ids`); the draw is seeded by the
        image key alone, so the same corpus anywhere on disk picks the same images."""
        picked: dict[ImageId, list[int]] = {}  # an image's texts (web + synthetic) share their picks
        for key in keys:
            if key not in picked:
                order = np.random.default_rng(image_seed(self.seed, "prior", key[1])).permutation(len(self.keys))
                picked[key] = [int(r) for r in order if self.keys[r] != key][: self.k]
        return torch.tensor([picked[key] for key in keys], dtype=torch.long)


def image_ids(root: Path | str, image_keys: Iterable[str]) -> list[ImageId]:
    """The identities of `image_keys` of the manifest in `root` (the folder resolved once)."""
    folder = str(Path(root).resolve())
    return [(folder, key) for key in image_keys]


def prior_bank(filt: Loaded, root: Path, rows: Any, k: int, seed: int, dev: torch.device,
               size: int = PRIOR_BANK) -> PriorBank:
    """Encode `size` images drawn (seeded) from the distinct images of `rows` (a manifest frame
    with image_key, shard, member; shard paths relative to `root`); run under inference mode."""
    firsts = rows.drop_duplicates("image_key").sort_values("image_key", kind="stable")
    if min(size, len(firsts)) < k + 1:
        raise CapfiltError(f"{root}: {min(size, len(firsts))} reference images; a text prior over {k} other "
                           f"images needs at least {k + 1} (lower bootstrap.prior_images)")
    pick = np.sort(np.random.default_rng(seed).choice(len(firsts), size=min(size, len(firsts)), replace=False))
    chosen = firsts.iloc[pick]
    images = Images(root)
    try:
        pil = images.load(chosen["shard"].tolist(), chosen["member"].tolist())
        embeds = filt.model.encode_image(images.tensor(pil, filt.image_size, dev))
    finally:
        images.close()
    return PriorBank(embeds, tuple(image_ids(root, chosen["image_key"])), k, seed)


def text_scores(filt: Loaded, image: torch.Tensor, texts: list[str], image_index: torch.Tensor,
                text_cfg: TextInput, bank: PriorBank | None = None,
                keys: Sequence[ImageId] | None = None) -> tuple[list[float], list[float], list[float]]:
    """`score_texts` plus each text's prior: its mean ITM log-odds against `bank.k` reference
    images of `bank` that are not its own (`keys`: each text's image, `image_ids`), how well it
    matches images in general; NaN without a bank."""
    model, dev = filt.model, image.device
    embeds = model.encode_image(image)  # (B, 1+N, Dv)
    ids, mask = tokenize(filt.tokenizer, texts, text_cfg, dev)  # (M, T)
    index = image_index.to(dev)
    itm = model.itm_scores(embeds, ids, mask, index)  # (M,)
    cos = (model.image_features(embeds)[index] * model.text_features(ids, mask)).sum(-1)  # (M,)
    prior = torch.full((len(texts),), float("nan"))
    if bank is not None and texts:
        if keys is None or len(keys) != len(texts):
            raise ValueError("text priors need one image key per text")
        k, m = bank.k, len(texts)
        other = (embeds.shape[0] + bank.choice(keys).to(dev)).T.reshape(-1)  # (k * M,) into [embeds; bank]
        both = torch.cat([embeds, bank.embeds.to(embeds.dtype)])
        logits = model.itm_logits(both, ids.repeat(k, 1), mask.repeat(k, 1), other).float()  # (k * M, 2)
        prior = (logits[:, 1] - logits[:, 0]).view(k, m).mean(0).cpu()  # log-odds of a match
    return itm.float().clamp(0, 1).cpu().tolist(), cos.float().cpu().tolist(), prior.tolist()


def prompt_ids(captioner: Loaded, prompt: str, batch: int, dev: torch.device) -> Tensor:
    """(B, P): `[DEC]` + the prompt's tokens, no `[SEP]` (BLIP's generate)."""
    words = captioner.tokenizer.encode(prompt, add_special_tokens=False).ids if prompt else []
    ids = [captioner.model.config.text.bos_token_id, *words]
    return torch.tensor([ids] * batch, dtype=torch.long, device=dev)


def image_seed(seed: int, *parts: str) -> int:
    """A 63-bit seed from the run seed and an image's identity (e.g. its shard and member)."""
    digest = hashlib.blake2b("/".join([str(seed), *parts]).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def row_uniforms(seeds: Sequence[int], k: int, steps: int) -> Tensor:
    """(B*K, steps) uniforms; image i's K rows come from a generator seeded with seeds[i]."""
    rows = [torch.rand(k, steps, generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.cat(rows)


@torch.no_grad()
def sample_nucleus(decoder: StepDecoder, prompt: Tensor, image_embeds: Tensor, cfg: GenerationConfig,
                   uniforms: Tensor) -> Tensor:
    """Nucleus sampling with given uniforms (B*K, max_new_tokens): row r's token at step t is drawn
    with uniforms[r, t], whatever else is in the batch. Returns new tokens (B*K, L)."""
    k, n = cfg.num_return_sequences, prompt.shape[0] * cfg.num_return_sequences
    logits, cache = decoder.prefill(prompt, image_embeds)  # (B, V)
    dev = logits.device
    if k > 1:
        rows = torch.arange(prompt.shape[0], device=dev).repeat_interleave(k)  # (B*K,)
        cache, logits, prompt = decoder.reorder(cache, rows), logits[rows], prompt[rows]
    uniforms = uniforms.to(dev)
    live = torch.arange(n, device=dev)  # output row of each cache row
    out = torch.full((n, cfg.max_new_tokens), cfg.pad_token_id, dtype=torch.long, device=dev)
    for t in range(cfg.max_new_tokens):
        history = torch.cat([prompt[live], out[live, :t]], dim=1)  # (R, P + t)
        scores = process_logits(logits.to(torch.float32, copy=True), history, t, cfg)
        tok = nucleus_sample(scores / cfg.temperature, cfg.top_p, uniforms[live, t])  # (R,)
        out[live, t] = tok
        going = tok != cfg.eos_token_id
        if t + 1 == cfg.max_new_tokens or not bool(going.any()):
            break
        if not bool(going.all()):  # finished rows leave the decoder batch
            keep = going.nonzero().squeeze(1)
            cache, live, tok = decoder.reorder(cache, keep), live[keep], tok[keep]
        logits, cache = decoder.step(tok.unsqueeze(1), cache)
    return out


def _new_tokens(captioner: Loaded, embeds: Tensor, prompt_t: Tensor, cfg: GenerationConfig,
                seeds: Sequence[int] | None) -> Tensor:
    """(B*K, L) generated tokens (EOS, then padding) for image embeddings (B, 1+N, Dv)."""
    if cfg.decoding == "nucleus":
        if seeds is None or len(seeds) != embeds.shape[0]:
            raise ValueError("nucleus captions need one seed per image")
        uniforms = row_uniforms(seeds, cfg.num_return_sequences, cfg.max_new_tokens)
        return sample_nucleus(captioner.model.text_decoder, prompt_t, embeds, cfg, uniforms)
    return generate(captioner.model.text_decoder, prompt_t, embeds, cfg).new_tokens


def _decode(captioner: Loaded, new: Tensor, cfg: GenerationConfig) -> list[str]:
    rows = decode_batch(new.cpu(), cfg.eos_token_id, cfg.pad_token_id)
    return [t.strip() for t in captioner.tokenizer.decode_batch(rows, skip_special_tokens=True)]


def caption(captioner: Loaded, image: Tensor, cfg: GenerationConfig, prompt: str,
            seeds: Sequence[int] | None = None) -> list[str]:
    """K captions per image (image-major), prompt stripped. Nucleus needs one seed per image."""
    return caption_with_confidence(captioner, image, cfg, prompt, seeds, score=False)[0]


def token_confidence(captioner: Loaded, embeds: Tensor, prompt_t: Tensor, new: Tensor, eos: int) -> Tensor:
    """(B*K,) the geometric-mean probability the captioner gives each of its captions' tokens, EOS
    included and the prompt not, teacher-forced in one causal pass (raw model probabilities: no
    repetition penalty, no top-p). embeds (B, 1+N, Dv), prompt_t (B, P), new (B*K, L)."""
    k = new.shape[0] // embeds.shape[0]
    if k > 1:
        embeds, prompt_t = embeds.repeat_interleave(k, 0), prompt_t.repeat_interleave(k, 0)
    n_prompt, width = prompt_t.shape[1], new.shape[1]
    is_eos = new == eos
    length = torch.where(is_eos.any(1), is_eos.int().argmax(1) + 1, width)  # (R,) tokens up to EOS
    ids = torch.cat([prompt_t, new], dim=1)  # (R, P + L)
    mask = (torch.arange(n_prompt + width, device=new.device)[None] < n_prompt + length[:, None]).long()
    logits = captioner.model.decoder_logits(ids, mask, embeds)[:, n_prompt - 1 : -1]  # (R, L, V) predicting new
    logp = torch.log_softmax(logits.float(), dim=-1).gather(2, new.unsqueeze(2)).squeeze(2)  # (R, L)
    valid = torch.arange(width, device=new.device)[None] < length[:, None]
    return ((logp * valid).sum(1) / length).exp()


def caption_with_confidence(captioner: Loaded, image: Tensor, cfg: GenerationConfig, prompt: str,
                            seeds: Sequence[int] | None = None,
                            score: bool = True) -> tuple[list[str], list[float] | None]:
    """`caption`, and how sure the captioner is of each caption (`token_confidence`; None unless `score`)."""
    prompt_t = prompt_ids(captioner, prompt, image.shape[0], image.device)
    positions = captioner.model.config.text.max_position_embeddings
    if prompt_t.shape[1] + cfg.max_new_tokens > positions:  # else a ValueError deep in decoding
        raise CapfiltError(f"caption settings: max_new_tokens {cfg.max_new_tokens} + the prompt's "
                           f"{prompt_t.shape[1]} tokens exceed the captioner's {positions} text positions; "
                           f"use max_new_tokens <= {positions - prompt_t.shape[1]}")
    embeds = captioner.model.encode_image(image)  # (B, 1+N, Dv)
    new = _new_tokens(captioner, embeds, prompt_t, cfg, seeds)
    if not score:
        return _decode(captioner, new, cfg), None
    confidence = token_confidence(captioner, embeds, prompt_t, new, cfg.eos_token_id)
    return _decode(captioner, new, cfg), confidence.float().cpu().tolist()


def generation_config(captioner: Loaded, decoding: str, k: int, *, num_beams: int, top_p: float,
                      repetition_penalty: float, max_new_tokens: int, min_new_tokens: int) -> GenerationConfig:
    """A `GenerationConfig` with the captioner's special ids; bad settings are a CapfiltError."""
    text = captioner.model.config.text
    if num_beams < 1:  # before K raises it: 0 beams would quietly become K
        raise CapfiltError(f"caption settings: num_beams must be >= 1, got {num_beams}")
    beams = max(num_beams, k) if decoding == "beam" else num_beams
    try:
        return GenerationConfig(decoding=decoding, num_beams=beams, max_new_tokens=max_new_tokens,  # type: ignore[arg-type]
                                min_new_tokens=min_new_tokens, repetition_penalty=repetition_penalty,
                                top_p=top_p, num_return_sequences=k, eos_token_id=text.sep_token_id,
                                pad_token_id=text.pad_token_id)
    except ValueError as exc:
        raise CapfiltError(f"caption settings: {exc}") from None
