"""`capfilt caption` and `capfilt match`: a model directory applied to image files.

A thin layer over `components.batch_inference`, the inference path of the bootstrap and evaluate
stages: the same model loading, prompt ids, generation config, tokenisation and ITM/ITC scoring.
What is its own is reading image files (through the checkpoint's eval transform, unreadable files
named) and the command defaults: BLIP's COCO beam search (3 beams) with its prompt, and BLIP's
repetition penalty of 1.1 for nucleus sampling (1.0 for greedy and beam). Nucleus samples of an
image come from a generator seeded by (`seed`, the image's path), so a caption does not depend on
the batch it was decoded in. Everything runs in fp32. Matching returns, per text, the ITM match
probability (softmax of the ITM head, class 1) and the ITC cosine similarity of the projected
features (no temperature), as the CapFilt filter uses them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from components import batch_inference as infer
from components.config import TextInput
from components.errors import CapfiltError
from models.generation import GenerationConfig

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


def _device(name: str | None) -> torch.device:
    """`name`, or the inference path's default (a GPU when there is one, else the CPU); a device
    this machine does not have is named."""
    if not name:
        return infer.device()
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise CapfiltError(f"--device {name!r}: not a torch device (cpu, cuda, cuda:1, mps, ...)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (dev.index is not None and dev.index >= count):
            raise CapfiltError(f"--device {name!r}: this machine has {count} CUDA device(s)")
    return dev


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


def generation_config(captioner: infer.Loaded, options: CaptionOptions) -> GenerationConfig:
    """One caption per image with `options`; the repetition penalty defaults by decoding."""
    penalty = options.repetition_penalty
    if penalty is None:
        penalty = NUCLEUS_REPETITION_PENALTY if options.decoding == "nucleus" else 1.0
    return infer.generation_config(captioner, options.decoding, 1, num_beams=options.num_beams,
                                   top_p=options.top_p, repetition_penalty=penalty,
                                   max_new_tokens=options.max_new_tokens,
                                   min_new_tokens=options.min_new_tokens)


def caption_images(model_dir: Path, images: Sequence[Path], options: CaptionOptions,
                   device: str | None = None) -> Iterator[dict[str, str]]:
    """One `{"image", "caption"}` per image, in order, decoded in batches."""
    if options.batch_size < 1:
        raise CapfiltError(f"--batch-size must be >= 1, got {options.batch_size}")
    dev = _device(device)
    captioner = infer.load_captioner(model_dir, dev)
    cfg = generation_config(captioner, options)
    step = options.batch_size
    for start in range(0, len(images), step):
        paths = list(images[start : start + step])
        pixels = load_images(paths, captioner.image_size).to(dev)
        seeds = [infer.image_seed(options.seed, str(p)) for p in paths]
        with torch.inference_mode(), infer.autocast(dev):
            captions = infer.caption(captioner, pixels, cfg, options.prompt, seeds)
        for path, text in zip(paths, captions, strict=True):
            yield {"image": str(path), "caption": text}


def text_input(model: Any, max_words: int = MAX_WORDS) -> TextInput:
    """BLIP's `pre_caption` word limit, cut to the model's text positions."""
    return TextInput(max_words=max_words, max_tokens=model.config.text.max_position_embeddings)


def match_texts(model_dir: Path, image: Path, texts: Sequence[str],
                device: str | None = None) -> list[dict[str, Any]]:
    """`{"text", "itm", "itc"}` per text against one image."""
    if not texts:
        raise CapfiltError("give at least one --text")
    dev = _device(device)
    filt = infer.load_filter(model_dir, dev)
    pixels = load_images([image], filt.image_size).to(dev)
    with torch.inference_mode(), infer.autocast(dev):
        itm, itc = infer.score_texts(filt, pixels, list(texts), torch.zeros(len(texts), dtype=torch.long),
                                     text_input(filt.model))
    return [{"text": text, "itm": round(p, 6), "itc": round(s, 6)}
            for text, p, s in zip(texts, itm, itc, strict=True)]
