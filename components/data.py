"""Training data: validated manifests → images from their tar shards → typed `Batch`es, per rank.

`load_pairs` reads one or more manifests through the schemas (ingested or bootstrapped, decided
by their columns), keeps the `split: train` rows, and gives every image a dense integer id (the
positive groups of the filter). `ManifestBatches` is the loop's batch source: for epoch `e` it
orders the rows deterministically from `seed + e` the way a streaming reader would (shards in a
shuffled order, then rows shuffled within a window of `shuffle_buffer`), cuts global batches of
`micro_batch × world_size` rows (the last partial one is dropped), and hands rank `r` its slice
of each; data-loader workers take whole batches round-robin, so the order does not depend on the
number of workers and a resumed run skips batches without decoding them. Images are decoded in
the workers and transformed with BLIP's train transform (random resized crop, flip, RandAugment)
or the eval transform (resize + CLIP normalisation), each sample seeded from its position;
captions pass through `pre_caption` and the WordPiece tokenizer in the collate.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from components.config import AugmentConfig, TextAugmentConfig, TextInput
from components.errors import CapfiltError
from components.schemas import read_manifest
from components.shards import ShardReader
from components.text import SwapTable, partial_caption, pre_caption

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class Batch:
    """One micro-batch. Captions are `[CLS] (prompt) words [SEP] [PAD]...`."""

    image: torch.Tensor  # (B, 3, H, W) float, normalised
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = token
    image_ids: torch.Tensor  # (B,) long, dense per image (captions of one image share it)
    prompt_length: int = 0  # [CLS] + prompt tokens, not predicted by the captioner's LM loss
    # Word-swap / -exchange ITM negatives (`text_augment`): row i's text with one word swapped or two exchanged.
    negative_ids: torch.Tensor | None = None  # (B, T) long
    negative_mask: torch.Tensor | None = None  # (B, T) long
    has_negative: torch.Tensor | None = None  # (B,) bool: rows without one are ignored

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Batch:
        """On `device`; the image also in `dtype` when given (bf16/fp16 training)."""
        image = self.image.to(device) if dtype is None else self.image.to(device, dtype)
        moved = {k: getattr(self, k).to(device) for k in ("negative_ids", "negative_mask", "has_negative")
                 if getattr(self, k) is not None}
        return replace(self, image=image, input_ids=self.input_ids.to(device),
                       attention_mask=self.attention_mask.to(device), image_ids=self.image_ids.to(device),
                       **moved)


@dataclass(frozen=True)
class Pairs:
    """The training rows of some manifests, in storage order."""

    roots: list[Path]  # each manifest's folder (shard paths are relative to it)
    root_index: np.ndarray  # (N,) which root a row's shard lives under
    shard: list[str]  # (N,)
    member: list[str]  # (N,)
    caption: list[str]  # (N,)
    image_id: np.ndarray  # (N,) dense ids over (manifest, image_key)

    def __len__(self) -> int:
        return len(self.caption)


def manifest_kind(path: Path) -> str:
    """`bootstrapped` when the file has the bootstrap columns, else `ingested`."""
    if not path.is_file():
        raise CapfiltError(f"{path}: manifest not found")
    try:
        names = set(pq.read_schema(path).names)
    except Exception as exc:  # pyarrow raises several types for a non-parquet file
        raise CapfiltError(f"{path}: not a readable parquet file: {exc}") from None
    return "bootstrapped" if "itm_score" in names else "ingested"


def load_pairs(paths: Sequence[str | Path], split: str = "train") -> Pairs:
    """Validated rows of `split` from every manifest, concatenated."""
    frames, roots = [], []
    for i, raw in enumerate(paths):
        path = Path(raw)
        df = read_manifest(path, manifest_kind(path))  # type: ignore[arg-type]
        df = df[df["split"] == split]
        frames.append(df.assign(_root=i, _group=f"{i}:" + df["image_key"].astype(str)))
        roots.append(path.parent)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if table.empty:
        raise CapfiltError(f"no {split!r} rows in {', '.join(str(p) for p in paths)}")
    table = table.sort_values(["_root", "shard", "member"], kind="stable").reset_index(drop=True)
    codes, _ = pd.factorize(table["_group"], sort=False)
    return Pairs(roots=roots, root_index=table["_root"].to_numpy(), shard=table["shard"].tolist(),
                 member=table["member"].tolist(), caption=table["caption"].tolist(),
                 image_id=np.asarray(codes, dtype=np.int64))


def epoch_order(pairs: Pairs, seed: int, epoch: int, window: int) -> np.ndarray:
    """Row indices of one epoch: shards in a seeded order, rows shuffled within `window`."""
    rng = np.random.default_rng([seed, epoch])
    keys = [f"{r}/{s}" for r, s in zip(pairs.root_index, pairs.shard)]
    shards = sorted(set(keys))
    perm = rng.permutation(len(shards))
    position = {k: int(perm[i]) for i, k in enumerate(shards)}
    shard_pos = np.array([position[k] for k in keys], dtype=np.int64)
    order = np.lexsort((np.arange(len(keys)), shard_pos))  # shards shuffled, rows kept in order
    for start in range(0, len(order), window):
        block = order[start : start + window]
        order[start : start + window] = block[rng.permutation(len(block))]
    return order


def build_transform(image_size: int, augment: AugmentConfig):
    """BLIP's train transform when `augment.enabled`, else its eval transform (squash-resize)."""
    from torchvision import transforms as T

    bicubic = T.InterpolationMode.BICUBIC
    tail = [T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)]
    if not augment.enabled:
        return T.Compose([T.Resize((image_size, image_size), interpolation=bicubic), *tail])
    steps = [T.RandomResizedCrop(image_size, scale=(augment.min_scale, 1.0), interpolation=bicubic)]
    if augment.hflip:
        steps.append(T.RandomHorizontalFlip())
    if augment.randaugment:
        steps.append(T.RandAugment(num_ops=2, magnitude=5))
    return T.Compose(steps + tail)


def encode_texts(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), both long (len(texts), T): `[CLS] ... [SEP] [PAD]...`, T the longest text
    capped at `max_tokens`, longer texts truncated keeping their [SEP]."""
    encoded = tokenizer.encode_batch(list(texts))
    length = min(max_tokens, max(len(e.ids) for e in encoded))
    ids = torch.zeros(len(texts), length, dtype=torch.long)  # [PAD] = 0
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        tokens = e.ids if len(e.ids) <= length else e.ids[: length - 1] + [e.ids[-1]]  # keep [SEP]
        ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        mask[i, : len(tokens)] = 1
    return ids, mask


SWAP_TABLE_CAPTIONS = 200_000  # a swap table is built from at most this many captions


def _swap_table(captions: list[str], max_words: int) -> SwapTable:
    """The word-swap table of a corpus; a large one contributes a fixed random sample (every rank
    draws the same), which bounds the build at a few seconds whatever the corpus size."""
    if len(captions) > SWAP_TABLE_CAPTIONS:
        picked = np.random.default_rng(0).choice(len(captions), SWAP_TABLE_CAPTIONS, replace=False)
        captions = [captions[i] for i in np.sort(picked)]
    return SwapTable.build(captions, max_words=max_words)


def _sample_seed(seed: int, epoch: int, row: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{epoch}/{row}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ManifestBatches(IterableDataset):
    """This rank's micro-batches; also the loop's `BatchSource` (`batches(epoch, skip)`)."""

    def __init__(self, pairs: Pairs, tokenizer: object, text: TextInput, augment: AugmentConfig,
                 image_size: int, micro_batch: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle_buffer: int = 1000, num_workers: int = 0,
                 prompt: str = "", text_augment: TextAugmentConfig | None = None,
                 negative_pool: Sequence[str] | None = None) -> None:
        super().__init__()
        self.pairs, self.tokenizer, self.text, self.prompt = pairs, tokenizer, text, prompt
        self.text_augment = aug = text_augment or TextAugmentConfig()
        words = aug.swap_negative + aug.exchange_negative
        self.swaps = _swap_table(pairs.caption, text.max_words) if words > 0 else None
        self.negatives = words + aug.corpus_negative > 0
        # corpus negatives: texts of other images; None = this stage's captions (other images' only)
        self.pool = [t for t in negative_pool if t.strip()] if negative_pool is not None else None
        if aug.corpus_negative > 0 and self.pool is not None and not self.pool:
            raise CapfiltError("text_augment.corpus_negative needs texts, and the negative manifests hold none")
        self.transform = build_transform(image_size, augment)
        self.augment = augment.enabled
        self.micro, self.rank, self.world = micro_batch, rank, world_size
        self.seed, self.window, self.num_workers = seed, shuffle_buffer, num_workers
        self.epoch, self.skip = 0, 0
        self.prompt_length = len(tokenizer.encode(prompt).ids) - 1 if prompt else 0  # [CLS] + prompt
        if len(pairs) < micro_batch * world_size:
            raise CapfiltError(f"{len(pairs)} training pairs are fewer than one global batch "
                               f"({micro_batch} × {world_size} ranks); lower train.micro_batch")

    def batches_per_epoch(self) -> int:
        return len(self.pairs) // (self.micro * self.world)

    def _rows(self, epoch: int, batch: int, order: np.ndarray) -> np.ndarray:
        start = batch * self.micro * self.world + self.rank * self.micro
        return order[start : start + self.micro]

    def __iter__(self) -> Iterator[Batch]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        order = epoch_order(self.pairs, self.seed, self.epoch, self.window)
        reader = ShardReader(Path("."), max_open=64)  # re-indexing a tar costs ms
        try:
            for b in range(self.skip, self.batches_per_epoch()):
                if (b - self.skip) % workers == worker:
                    yield self._collate(self._rows(self.epoch, b, order), reader)
        finally:
            reader.close()

    def _image(self, row: int, reader: ShardReader) -> torch.Tensor:
        p = self.pairs
        root = p.roots[p.root_index[row]]
        try:
            data = reader.read(str(root / p.shard[row]), p.member[row])
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except (OSError, KeyError) as exc:
            raise CapfiltError(f"{root / p.shard[row]}: cannot read image {p.member[row]!r}: {exc}") from None
        if not self.augment:
            return self.transform(image)
        with torch.random.fork_rng(devices=[]):  # per-sample seed: same crops after a resume
            torch.manual_seed(_sample_seed(self.seed, self.epoch, int(row)))
            return self.transform(image)

    def _caption(self, row: int) -> str:
        caption, aug = self.pairs.caption[row], self.text_augment
        if aug.partial <= 0:
            return caption
        rng = np.random.default_rng(_sample_seed(self.seed + 1, self.epoch, row))  # resume-stable
        if rng.random() >= aug.partial:
            return caption
        return partial_caption(caption, rng, aug.word_drop)

    def _negative(self, row: int, text: str) -> str | None:
        """The word-swap, word-exchange or corpus negative of `text` (pre_caption form) for this row, or None."""
        rng = np.random.default_rng(_sample_seed(self.seed + 2, self.epoch, row))  # resume-stable
        draw, aug = rng.random(), self.text_augment
        if draw < aug.swap_negative:
            return self.swaps.negative(text, rng)
        if draw < aug.swap_negative + aug.exchange_negative:
            return self.swaps.exchange(text, rng)
        if draw < aug.swap_negative + aug.exchange_negative + aug.corpus_negative:
            return self._corpus_text(row, rng)
        return None

    def _corpus_text(self, row: int, rng: np.random.Generator) -> str | None:
        """A text of another image: from the negative pool as it is, else another image's caption
        here as that row's positive reads (cut like it when `partial`: a negative no longer or
        shorter than the positives, so length tells nothing)."""
        if self.pool is not None:
            return pre_caption(self.pool[int(rng.integers(len(self.pool)))], self.text.max_words)
        ids = self.pairs.image_id
        for _ in range(8):  # one image's captions are a tiny share of a corpus: a miss is rare
            other = int(rng.integers(len(ids)))
            if ids[other] != ids[row]:
                return pre_caption(self._caption(other), self.text.max_words)
        return None

    def _collate(self, rows: np.ndarray, reader: ShardReader) -> Batch:
        images = torch.stack([self._image(int(r), reader) for r in rows])  # (B, 3, H, W)
        texts = [pre_caption(self._caption(int(r)), self.text.max_words) for r in rows]
        image_ids = torch.from_numpy(self.pairs.image_id[rows])
        if not self.negatives:
            ids, mask = encode_texts(self.tokenizer, [self.prompt + t for t in texts], self.text.max_tokens)
            return Batch(images, ids, mask, image_ids, self.prompt_length)
        negatives = [self._negative(int(r), t) for r, t in zip(rows, texts, strict=True)]
        has = torch.tensor([n is not None for n in negatives])
        filled = [t if n is None else n for n, t in zip(negatives, texts, strict=True)]  # (ignored where None)
        both, both_mask = encode_texts(self.tokenizer, [self.prompt + t for t in texts + filled],
                                       self.text.max_tokens)
        b = len(rows)  # positives and negatives share one padded length T
        has &= (both[b:] != both[:b]).any(1)  # a swap past the token limit, or one the tokenizer undoes
        return Batch(images, both[:b], both_mask[:b], image_ids, self.prompt_length,
                     negative_ids=both[b:], negative_mask=both_mask[b:], has_negative=has)

    def batches(self, epoch: int, skip: int) -> Iterator[Batch]:
        """The loop's entry point: a DataLoader over this dataset for `epoch`, from batch `skip`."""
        self.epoch, self.skip = epoch, skip
        workers = min(self.num_workers, max(0, self.batches_per_epoch() - skip))
        loader = DataLoader(self, batch_size=None, num_workers=workers,
                            persistent_workers=False, prefetch_factor=2 if workers else None)
        return iter(loader)
