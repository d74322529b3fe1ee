"""The bootstrap stage (CapFilt): caption every web image, filter web and synthetic texts with ITM.

For each web image the captioner writes `captions_per_image` synthetic captions ("a picture of "
prompt, stripped) and the filter scores the original web text(s) and every synthetic caption
against the image; each model's ViT encodes each image once. Work goes shard by shard in
manifest order: rank r of W takes shards r, r+W, ... and writes one scored part per shard,
atomically, to `<out>/parts/<fingerprint>/`; parts already there are skipped, so a killed run
resumes where it stopped and gives the same manifest. Parts hold scores, not decisions: rank 0
waits for every part, applies the threshold (`components/bootstrap_merge.py`) and writes the
bootstrapped manifest. Nucleus captions draw from a generator seeded by (seed, shard, member),
so they do not depend on batching, ranks or restarts. The fingerprint covers the checkpoints,
the web manifest and the caption settings, never the threshold: re-thresholding re-uses parts.
With `synthetic_confidence` set, parts also hold each synthetic caption's confidence (the
captioner's geometric-mean token probability), and the merge removes the captions below it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm import tqdm

from components import bootstrap_merge
from components.config import BootstrapConfig, ValidationConfig
from components.distributed import RankInfo, rank_info
from components.errors import CapfiltError
from components.batch_inference import (Images, Loaded, PriorBank, autocast, caption_with_confidence, device,
                                        generation_config, image_ids, image_seed, load_captioner,
                                        load_filter, prior_bank, text_scores)
from components.schemas import read_manifest
from models.generation import GenerationConfig

log = logging.getLogger(__name__)

PART_COLUMNS = ("kind", "sample_id", "image_key", "caption", "shard", "member", "k", "itm_score", "itc_score",
                "itm_prior", "caption_confidence")


@dataclass(frozen=True)
class Models:
    """The loaded captioner and filter, where they run, and how captions are decoded."""

    captioner: Loaded
    filter: Loaded
    generation: GenerationConfig
    device: torch.device
    precision: str = "auto"  # see `batch_inference.autocast`
    bank: PriorBank | None = None  # reference images for text priors (`prior_images` > 0)


@dataclass(frozen=True)
class ShardWork:
    """What this rank did: shards scored now, shards found done, images scored, seconds."""

    done_now: list[str]
    skipped: list[str]
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.seconds if self.images and self.seconds > 0 else None


def decoding_label(cfg: BootstrapConfig) -> str:
    """The `decoding` cell of synthetic rows, e.g. `nucleus(top_p=0.9,rep=1.1,max_new=16,k=1)`."""
    if cfg.decoding == "nucleus":
        how = f"top_p={cfg.top_p}"
    elif cfg.decoding == "beam":
        how = f"beams={max(cfg.num_beams, cfg.captions_per_image)}"
    else:
        how = "argmax"
    return (f"{cfg.decoding}({how},rep={cfg.repetition_penalty},min_new={cfg.min_new_tokens},"
            f"max_new={cfg.max_new_tokens},k={cfg.captions_per_image},prompt={cfg.prompt!r})")


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(cfg: BootstrapConfig, models: Models) -> str:
    """What a part depends on: checkpoints, web manifest, caption and text settings, seed."""
    keys = ("captions_per_image", "decoding", "top_p", "repetition_penalty", "num_beams",
            "max_new_tokens", "min_new_tokens", "prompt", "seed", "precision", "prior_images")
    payload = {k: getattr(cfg, k) for k in keys}
    if cfg.synthetic_confidence is not None:  # parts then carry the captioner's confidence (any bar reuses them)
        payload["confidence"] = True
    payload.update(text=cfg.text.model_dump(), captioner=models.captioner.digest,
                   filter=models.filter.digest, web=_file_sha(Path(cfg.web_manifest)))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def load_models(cfg: BootstrapConfig, dev: torch.device | None = None) -> Models:
    """Open the captioner and filter directories named by `cfg` on `dev` (default: best device)."""
    dev = dev or device()
    captioner = load_captioner(cfg.captioner, dev, cfg.precision)
    filt = load_filter(cfg.filter, dev, cfg.precision)
    gen = generation_config(captioner, cfg.decoding, cfg.captions_per_image, num_beams=cfg.num_beams,
                            top_p=cfg.top_p, repetition_penalty=cfg.repetition_penalty,
                            max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens)
    bank = None
    if cfg.prior_images > 0:  # the web corpus's own images: the ones its texts might be confused with
        web = read_manifest(Path(cfg.web_manifest), "ingested")
        with torch.inference_mode(), autocast(dev, cfg.precision):
            bank = prior_bank(filt, Path(cfg.web_manifest).parent, web, cfg.prior_images, cfg.seed, dev)
    return Models(captioner, filt, gen, dev, cfg.precision, bank)


def part_path(parts_dir: Path, shard: str) -> Path:
    """The part file of one web shard (its relative path flattened into a file name)."""
    return parts_dir / (shard.replace("/", "__") + ".parquet")


def _batch_rows(batch: pd.DataFrame, shard: str, cfg: BootstrapConfig, models: Models,
                images: Images) -> list[dict]:
    """Caption and score one batch of images (all text rows of those images)."""
    firsts = batch.drop_duplicates("member")
    members = firsts["member"].tolist()
    pil = images.load([shard] * len(members), members)
    dev, k = models.device, cfg.captions_per_image
    seeds = [image_seed(cfg.seed, shard, m) for m in members]
    with torch.inference_mode(), autocast(dev, models.precision):
        cap_in = images.tensor(pil, models.captioner.image_size, dev)
        synthetic, confidence = caption_with_confidence(models.captioner, cap_in, models.generation, cfg.prompt,
                                                        seeds, score=cfg.synthetic_confidence is not None)
        filt_in = cap_in if models.filter.image_size == models.captioner.image_size else \
            images.tensor(pil, models.filter.image_size, dev)
        position = {m: i for i, m in enumerate(members)}
        web_index = [position[m] for m in batch["member"]]
        texts = batch["caption"].tolist() + synthetic
        index = torch.tensor(web_index + [i // k for i in range(len(synthetic))], dtype=torch.long)
        keys = image_ids(Path(cfg.web_manifest).parent,
                         [*batch["image_key"], *(key for key in firsts["image_key"] for _ in range(k))])
        itm, itc, prior = text_scores(models.filter, filt_in, texts, index, cfg.text, models.bank, keys)
    rows = [dict(kind="web", sample_id=r.sample_id, image_key=r.image_key, caption=r.caption,
                 shard=shard, member=r.member, k=-1, itm_score=itm[j], itc_score=itc[j], itm_prior=prior[j],
                 caption_confidence=float("nan"))
            for j, r in enumerate(batch.itertuples(index=False))]
    n_web = len(batch)
    for j, text in enumerate(synthetic):
        img = firsts.iloc[j // k]
        rows.append(dict(kind="synthetic", sample_id=f"{img.image_key}#syn{j % k}", image_key=img.image_key,
                         caption=text, shard=shard, member=img.member, k=j % k,
                         itm_score=itm[n_web + j], itc_score=itc[n_web + j], itm_prior=prior[n_web + j],
                         caption_confidence=float("nan") if confidence is None else confidence[j]))
    return rows


def process_shard(shard: str, web_rows: pd.DataFrame, cfg: BootstrapConfig, models: Models,
                  images: Images, bar: tqdm | None = None) -> pd.DataFrame:
    """The scored part of one shard: every web text and every synthetic caption, in member order."""
    web_rows = web_rows.sort_values(["member", "sample_id"], kind="stable")
    members = web_rows["member"].drop_duplicates().tolist()
    rows: list[dict] = []
    for start in range(0, len(members), cfg.batch_size):
        chunk = set(members[start : start + cfg.batch_size])
        batch = web_rows[web_rows["member"].isin(chunk)]
        rows += _batch_rows(batch, shard, cfg, models, images)
        if bar is not None:
            bar.update(len(chunk))
    return pd.DataFrame(rows, columns=list(PART_COLUMNS))


def _write_part(df: pd.DataFrame, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def my_shards(web: pd.DataFrame, rank: RankInfo) -> tuple[list[str], list[str]]:
    """(all web shards in order, the ones this rank scores: every world_size-th from rank)."""
    shards = sorted(web["shard"].unique().tolist())
    return shards, shards[rank.rank :: rank.world_size]


def score_shards(cfg: BootstrapConfig, web: pd.DataFrame, models: Models, parts_dir: Path,
                 rank: RankInfo) -> ShardWork:
    """Score this rank's shards that have no part yet; each part is written when its shard is done."""
    _, mine = my_shards(web, rank)
    todo = [s for s in mine if not part_path(parts_dir, s).is_file()]
    skipped = [s for s in mine if s not in todo]
    if skipped:
        log.info("rank %d: %d of %d shards already scored; resuming", rank.rank, len(skipped), len(mine))
    by_shard = {s: g for s, g in web.groupby("shard", sort=False) if s in set(todo)}
    n_images = sum(g["member"].nunique() for g in by_shard.values())
    images = Images(Path(cfg.web_manifest).parent)
    start = time.perf_counter()
    bar = tqdm(total=n_images, unit="img", desc=f"bootstrap rank {rank.rank}", position=rank.rank,
               dynamic_ncols=True, disable=None)
    try:
        for shard in todo:
            part = process_shard(shard, by_shard[shard], cfg, models, images, bar)
            _write_part(part, part_path(parts_dir, shard))
    finally:
        bar.close()
        images.close()
    return ShardWork(todo, skipped, n_images, time.perf_counter() - start)


def _wait_for_parts(parts_dir: Path, shards: list[str], timeout_s: int) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [s for s in shards if not part_path(parts_dir, s).is_file()]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise CapfiltError(f"{parts_dir}: {len(missing)} shard parts still missing after "
                               f"{timeout_s}s (e.g. {missing[0]}); did another rank fail?")
        time.sleep(1.0)


def run(cfg: BootstrapConfig, validation: ValidationConfig, rank: RankInfo | None = None,
        models: Models | None = None) -> bootstrap_merge.BootstrapResult | None:
    """`capfilt stage bootstrap`: score this rank's shards; rank 0 then merges. Returns the
    merge result on rank 0, None on the other ranks."""
    rank = rank or rank_info()
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // rank.world_size))
    web = read_manifest(Path(cfg.web_manifest), "ingested")
    models = models or load_models(cfg, device(rank.local_rank))
    banked = models.bank.k if models.bank is not None else 0
    if banked != cfg.prior_images:
        raise CapfiltError(f"bootstrap.prior_images is {cfg.prior_images} but the models' prior bank scores "
                           f"{banked} images per text; load them with load_models(cfg)")
    parts_dir = Path(cfg.out) / "parts" / fingerprint(cfg, models)
    parts_dir.mkdir(parents=True, exist_ok=True)
    log.info("bootstrap rank %d/%d: %d web texts, captioner %s, filter %s, %s", rank.rank,
             rank.world_size, len(web), models.captioner.digest, models.filter.digest, decoding_label(cfg))
    human = read_manifest(Path(cfg.human_manifest), "ingested")
    check = bootstrap_merge.filter_check(cfg, human, models)
    work = score_shards(cfg, web, models, parts_dir, rank)
    if rank.rank != 0:
        return None
    shards, _ = my_shards(web, rank)
    _wait_for_parts(parts_dir, shards, cfg.merge_timeout_s)
    parts = pd.concat([pd.read_parquet(part_path(parts_dir, s)) for s in shards], ignore_index=True)
    bootstrap_merge.drop_stale_parts(parts_dir)
    return bootstrap_merge.merge(cfg, validation, web, parts, models, decoding_label(cfg), work.images_per_s,
                                 human, check)
