"""Fixtures for the bootstrap and evaluate tests: tiny random-weight checkpoint directories, a
trained toy tokenizer, and human / web / test manifests with their tar shards (no training)."""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from components.checkpoints import save_model_dir
from components.config import BootstrapConfig, ValidationConfig
from components.schemas import write_manifest
from components.shards import ShardWriter
from components.tokenizer import SPECIAL_TOKENS, save_tokenizer
from models.blip import BlipCaptioner, BlipFilter
from models.config import resolve_config, to_dict

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("square", "ring", "cross", "bar")
CELLS = ("top left", "top right", "bottom left", "bottom right")
SPLIT = 0.8  # an ITM threshold inside the fixture models' (deterministic) random scores, ~0.78-0.82


def caption_of(i: int) -> str:
    return f"a {COLOURS[i % 4]} {SHAPES[(i // 4) % 4]} at the {CELLS[(i // 16) % 4]}"


@dataclass(frozen=True)
class World:
    root: Path
    tokenizer: Path
    captioner: Path
    filter: Path
    human: Path  # manifest paths
    web: Path
    test: Path


def image_png(i: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(i)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "PNG")
    return buf.getvalue()


def write_split(folder: Path, prefix: str, n_images: int, captions: int, source: str, split: str,
                shard_size: int = 3, start: int = 0) -> Path:
    """Images `prefix_000000.png`... in shards of `shard_size`, `captions` rows per image."""
    writer = ShardWriter(folder, max_count=shard_size)
    rows = []
    for i in range(n_images):
        data = image_png(start + i)
        key = f"images/{prefix}_{i:06d}.png"
        shard = writer.add(f"{i:06d}", {"png": data})
        for c in range(captions):
            rows.append(dict(sample_id=f"{key}#{c}", image_key=key, caption=caption_of(start + i + c),
                             source=source, split=split, width=32, height=32,
                             sha256=hashlib.sha256(data).hexdigest(), shard=shard,
                             member=f"{i:06d}.png", ref=f"{prefix}.json:{i}"))
    writer.close()
    path = folder / "manifest.parquet"
    write_manifest(pd.DataFrame(rows), path, "ingested")
    return path


def fixed_tokenizer(texts: list[str]):
    """A WordPiece tokenizer over exactly the words of `texts` (the trainer breaks frequency ties
    differently from run to run; random-model scores must not move with it)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    words = sorted({w for t in texts for w in t.lower().split()})
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, *words])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


def tiny_config(tokenizer) -> object:
    special = {"pad_token_id": "[PAD]", "cls_token_id": "[CLS]", "sep_token_id": "[SEP]",
               "bos_token_id": "[DEC]", "enc_token_id": "[ENC]"}
    overrides = {f"text.{k}": tokenizer.token_to_id(v) for k, v in special.items()}
    overrides.update({"text.vocab_size": tokenizer.get_vocab_size(), "vision.image_size": 32,
                      "vision.width": 32, "vision.depth": 1, "vision.heads": 2, "text.hidden_size": 32,
                      "text.num_layers": 1, "text.num_heads": 2, "text.intermediate_size": 64,
                      "embed_dim": 16, "queue_size": 64})
    return resolve_config("tiny", overrides)


def make_world(root: Path, n_web: int = 10, web_shard: int = 3, seed: int = 0) -> World:
    """Tokenizer, random captioner and filter directories, and three small manifests."""
    tok_dir = root / "tokenizer"
    words = [caption_of(i) for i in range(64)] + ["a picture of", "click here to zoom"]
    save_tokenizer(fixed_tokenizer(words), tok_dir)
    tok = fixed_tokenizer(words)
    config = tiny_config(tok)
    torch.manual_seed(seed)
    cap = save_model_dir(root / "captioner", BlipCaptioner(config), to_dict(config), tok_dir)
    filt = save_model_dir(root / "filter", BlipFilter(config), to_dict(config), tok_dir)
    human = write_split(root / "ingest" / "human", "human", 6, 2, "human", "train", start=100)
    web = write_split(root / "ingest" / "web", "web", n_web, 1, "web", "train", shard_size=web_shard)
    test = write_split(root / "ingest" / "test", "test", 8, 2, "human", "test", start=200)
    return World(root, tok_dir, cap, filt, human, web, test)


def boot_cfg(world: World, out: Path, **update: object) -> BootstrapConfig:
    base = {"web_manifest": str(world.web), "human_manifest": str(world.human),
            "captioner": str(world.captioner), "filter": str(world.filter), "out": str(out),
            "batch_size": 2, "max_new_tokens": 6, "merge_timeout_s": 5, "threads": 1}
    base.update(update)
    return BootstrapConfig.model_validate(base)


def lenient_validation() -> ValidationConfig:
    """Random models keep arbitrary fractions: no source-mix bounds in these tests."""
    return ValidationConfig(min_synthetic_fraction=0.0, max_synthetic_fraction=1.0,
                            max_duplicate_pair_fraction=1.0)


NOISE_KINDS = ("correct", "junk", "other_image", "wrong_attribute")
SCENE = ('{"background":"black","objects":[{"colour":"red","extent":20,"position":"top left",'
         '"shape":"square","size":"large","x":4,"y":4}]}')


def write_truth(folder: Path, n_web: int) -> Path:
    """A synth-style `truth.csv`: noise kinds cycle; every scene is one large red square, top left."""
    import csv

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "truth.csv").open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image_id", "noise", "text", "source_id", "detail", "scene"])
        for i in range(n_web):
            kind = NOISE_KINDS[i % 4]
            detail = "shape:square->ring" if kind == "wrong_attribute" else ""
            w.writerow([f"web_{i:06d}", kind, caption_of(i), "", detail, SCENE])
    return folder
