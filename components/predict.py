"""`capfilt caption` and `capfilt match`: a model directory applied to image files.

Images go through the checkpoint's eval transform (squash-resize to the model's image size,
bicubic, CLIP mean/std); texts through the checkpoint's own tokenizer. Captions come from
`models.generation.generate` with `[DEC]` + the tokenized prompt (no `[SEP]`) as the decoder
prefix, so the prompt is never part of the returned caption. BLIP hard-codes a repetition penalty
of 1.1 for nucleus sampling; it is the default here too (1.0 for greedy and beam). Matching
returns, per text, the ITM match probability (softmax of the ITM head, class 1) and the ITC
cosine similarity of the projected features (no temperature), as the CapFilt filter uses them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from components.errors import CapfiltError
from components.model_io import load_model
from components.text import pre_caption
from components.tokenizer import load_tokenizer
from models.generation import GenerationConfig, decode_batch, generate

log = logging.getLogger(__name__)

NUCLEUS_REPETITION_PENALTY = 1.1  # BLIP's generate(sample=True)
MAX_WORDS = 30  # BLIP's pre_caption limit for retrieval texts


@dataclass(frozen=True)
class CaptionOptions:
    """How `caption` decodes (defaults: BLIP's COCO beam search with its prompt)."""

    decoding: Literal["greedy", "beam", "nucleus"] = "beam"
    num_beams: int = 3
    top_p: float = 0.9
    max_new_tokens: int = 20
    min_new_tokens: int = 1
    prompt: str = "a picture of "
    seed: int = 0
    repetition_penalty: float | None = None  # None: 1.1 for nucleus, 1.0 otherwise
    batch_size: int = 16


def pick_device(name: str | None) -> torch.device:
    """`name`, or CUDA when available, else CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_images(paths: Sequence[Path], image_size: int) -> Tensor:
    """Image files -> (B, 3, S, S) through BLIP's eval transform; unreadable files are named."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    from components.config import AugmentConfig
    from components.data import build_transform

    transform = build_transform(image_size, AugmentConfig(enabled=False))
    tensors = []
    for path in paths:
        try:
            with Image.open(path) as im:
                tensors.append(transform(ImageOps.exif_transpose(im).convert("RGB")))
        except FileNotFoundError:
            raise CapfiltError(f"{path}: image not found") from None
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            raise CapfiltError(f"{path}: not a readable image ({exc})") from None
    return torch.stack(tensors)


def _generation_config(model: nn.Module, options: CaptionOptions) -> GenerationConfig:
    text = model.config.text
    penalty = options.repetition_penalty
    if penalty is None:
        penalty = NUCLEUS_REPETITION_PENALTY if options.decoding == "nucleus" else 1.0
    try:
        return GenerationConfig(decoding=options.decoding, num_beams=options.num_beams,
                                max_new_tokens=options.max_new_tokens, min_new_tokens=options.min_new_tokens,
                                repetition_penalty=penalty, top_p=options.top_p,
                                eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id)
    except ValueError as exc:
        raise CapfiltError(str(exc)) from None


def prompt_ids(tokenizer: Any, prompt: str, bos_token_id: int) -> list[int]:
    """`[DEC]` + the prompt's tokens, without `[CLS]`/`[SEP]`."""
    return [bos_token_id] + tokenizer.encode(prompt, add_special_tokens=False).ids


def caption_images(model_dir: Path, images: Sequence[Path], options: CaptionOptions,
                   device: str | None = None) -> Iterator[dict[str, str]]:
    """One `{"image", "caption"}` per image, in order, decoded in batches."""
    dev = pick_device(device)
    model = load_model(model_dir, ("captioner", "pretrain")).to(dev)
    tokenizer = load_tokenizer(Path(model_dir))
    cfg = _generation_config(model, options)
    prefix = prompt_ids(tokenizer, options.prompt, model.config.text.bos_token_id)
    generator = torch.Generator(device="cpu").manual_seed(options.seed)
    step = max(1, options.batch_size)
    for start in range(0, len(images), step):
        paths = list(images[start : start + step])
        pixels = load_images(paths, model.config.vision.image_size).to(dev)
        prompt = torch.tensor([prefix] * len(paths), device=dev)
        with torch.inference_mode():
            embeds = model.encode_image(pixels)  # (B, 1+N, Dv)
            out = generate(model.text_decoder, prompt, embeds, cfg, generator=generator)
        rows = decode_batch(out.new_tokens.cpu(), cfg.eos_token_id, cfg.pad_token_id)
        for path, ids in zip(paths, rows, strict=True):
            yield {"image": str(path), "caption": tokenizer.decode(ids, skip_special_tokens=True).strip()}


def text_ids(tokenizer: Any, texts: Sequence[str], cls_id: int, sep_id: int, max_len: int) -> list[Tensor]:
    """`[CLS] words [SEP]` per text (BLIP's `pre_caption`, cut to the model's positions)."""
    rows = []
    for text in texts:
        words = tokenizer.encode(pre_caption(text, MAX_WORDS), add_special_tokens=False).ids[: max_len - 2]
        rows.append(torch.tensor([cls_id, *words, sep_id]))
    return rows


def match_texts(model_dir: Path, image: Path, texts: Sequence[str],
                device: str | None = None) -> list[dict[str, Any]]:
    """`{"text", "itm", "itc"}` per text against one image."""
    if not texts:
        raise CapfiltError("give at least one --text")
    dev = pick_device(device)
    model = load_model(model_dir, ("filter", "pretrain")).to(dev)
    tokenizer = load_tokenizer(Path(model_dir))
    t = model.config.text
    rows = [r.to(dev) for r in text_ids(tokenizer, texts, t.cls_token_id, t.sep_token_id, t.max_position_embeddings)]
    with torch.inference_mode():
        embeds = model.encode_image(load_images([image], model.config.vision.image_size).to(dev))
        itm = model.itm_scores(embeds, rows, None, torch.zeros(len(rows), dtype=torch.long, device=dev))
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=t.pad_token_id)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True)
        itc = model.itc_similarity(embeds, ids, mask)[0]  # (M,)
    return [{"text": text, "itm": round(float(p), 6), "itc": round(float(s), 6)}
            for text, p, s in zip(texts, itm.cpu(), itc.cpu(), strict=True)]
