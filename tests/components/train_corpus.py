"""A tiny image-text corpus for the training-stage tests: a validated manifest, shards, tokenizer.

Each image is a grey canvas with one coloured square on the left or the right; its captions name
the colour and the side, so a captioner can learn them and a filter can tell a true caption from
one naming another colour.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from components.config import TokenizerConfig
from components.schemas import write_manifest
from components.shards import ShardWriter
from components.tokenizer import save_tokenizer, train_tokenizer

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SIDES = ("left", "right")
TEMPLATES = ("a {c} square on the {s}", "the {s} side has a {c} square", "{c} square at the {s}")


def draw(colour: str, side: str, size: int = 32, jitter: int = 0) -> bytes:
    canvas = np.full((size, size, 3), 128, dtype=np.uint8)
    half, q = size // 2, size // 4
    x0 = (0 if side == "left" else half) + q // 2 + jitter
    canvas[q + jitter : q + half + jitter, x0 : x0 + q] = COLOURS[colour]
    buf = io.BytesIO()
    Image.fromarray(canvas).save(buf, format="PNG")
    return buf.getvalue()


def caption_for(colour: str, side: str, template: int) -> str:
    return TEMPLATES[template % len(TEMPLATES)].format(c=colour, s=side)


def make_corpus(folder: Path, n_images: int = 48, captions: int = 2, seed: int = 0,
                split: str = "train", shard_size: int = 16) -> Path:
    """Write `folder/manifest.parquet` + `folder/shards/`; return the manifest path."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(folder, max_count=shard_size)
    rows = []
    for i in range(n_images):
        colour, side = list(COLOURS)[rng.integers(4)], SIDES[rng.integers(2)]
        png = draw(colour, side, jitter=int(rng.integers(3)))
        key = f"{i:06d}"
        shard = writer.add(key, {"png": png})
        for j in range(captions):
            rows.append({"sample_id": f"{key}#{j}", "image_key": key, "caption": caption_for(colour, side, j + i),
                         "source": "human", "split": split, "width": 32, "height": 32,
                         "sha256": hashlib.sha256(png).hexdigest(), "shard": shard, "member": f"{key}.png",
                         "ref": f"synthetic:{i}"})
    writer.close()
    return write_manifest(pd.DataFrame(rows), folder / "manifest.parquet", "ingested")


def make_tokenizer(folder: Path) -> Path:
    texts = [caption_for(c, s, t) for c in COLOURS for s in SIDES for t in range(3)] + ["a picture of"]
    save_tokenizer(train_tokenizer(texts * 3, TokenizerConfig(vocab_size=100)), folder)
    return folder
