"""Rank 0's half of the bootstrap stage: thresholds, the bootstrapped manifest, removed texts, metrics.

The scored parts of every web shard come in. Each text's filter score is its ITM p(match)
(`signal: itm`) or its ITM log-odds plus ITC logit (`signal: itm_itc`), the ITM part optionally
corrected by the text's prior (`prior_images`: its mean log-odds against other images, relative
to the median of held-out human pairs, times `prior_weight`); the threshold is either
`itm_threshold` or, with `threshold: calibrated`, the score that keeps `calibration_keep` of
held-out human pairs:
the human manifest's `val` rows when it has some, else a fixed sample (seeded by `seed`) of
`calibration_samples` human training pairs (the filter was fine-tuned on those, so this
threshold is a little strict; a val split is the better choice). A web text or synthetic caption
is kept when its score clears the threshold (and its ITC cosine `itc_threshold`, when set); a
synthetic caption that is empty or repeats a kept text of its image is removed as such. Every
web text lands in exactly one of `manifest.parquet` (with every human training pair and the
kept synthetic captions) or `removed.parquet` (with its score and the reason); `scores.parquet`
holds every scored text with its ITM, ITC and filter scores and the decision. The shards the
manifest points into are hard-linked (copied across file systems) under `<out>/shards/human/`
and `<out>/shards/web/`, so shard paths stay relative to the manifest's folder, as the schema
requires. The manifest passes the pandera schema and the GX suite before it is written.
metrics.json also says which phrases no human caption uses the filter removed most
(`unseen_phrases`, components/phrases.py).
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from components.config import BootstrapConfig, ValidationConfig
from components import atomic
from components.errors import CapfiltError
from components.expectations import require, run_expectations
from components.phrases import unseen_phrases
from components.batch_inference import Images, autocast, image_ids, text_scores
from components.schemas import validate, write_manifest
from components.significance import auroc

if TYPE_CHECKING:
    from components.bootstrap import Models

log = logging.getLogger(__name__)

REMOVED_COLUMNS = ("sample_id", "image_key", "source", "caption", "shard", "member", "itm_score",
                   "itc_score", "reason")
REMOVAL_REASONS = ("itm_below_threshold", "score_below_threshold", "itc_below_threshold",
                   "confidence_below_threshold", "empty_caption", "duplicate")
SCORE_COLUMNS = ("kind", "sample_id", "image_key", "caption", "shard", "member", "k", "itm_score", "itc_score",
                 "itm_prior", "caption_confidence", "filter_score", "reason")
_P_CLIP = 1e-6  # p(match) is clipped to [1e-6, 1 - 1e-6] before its log-odds are taken


@dataclass(frozen=True)
class BootstrapResult:
    """Where the outputs went and the headline numbers (also in metrics.json)."""

    manifest: Path
    removed: Path
    metrics: dict[str, Any]


def drop_stale_parts(parts_dir: Path) -> None:
    """Remove parts of other fingerprints (other checkpoints or caption settings)."""
    for other in parts_dir.parent.iterdir():
        if other.is_dir() and other.name != parts_dir.name:
            shutil.rmtree(other, ignore_errors=True)


def calibration_pairs(human: pd.DataFrame, cfg: BootstrapConfig) -> tuple[pd.DataFrame, str]:
    """Held-out human pairs: the `val` rows, else a seeded sample of training pairs."""
    val = human[human["split"] == "val"]
    if len(val):
        return val, "human val split"
    train = human[human["split"] == "train"]
    n = min(cfg.calibration_samples, len(train))
    if n == 0:
        raise CapfiltError(f"{cfg.human_manifest}: no human pairs to calibrate the threshold on")
    pick = np.sort(np.random.default_rng(cfg.seed).choice(len(train), size=n, replace=False))
    return train.iloc[pick], f"sample of {n} human training pairs"


def mismatched_pairs(pairs: pd.DataFrame, known: pd.DataFrame, seed: int) -> pd.DataFrame:
    """`pairs` with their captions shuffled among their images (a seeded permutation); a row whose
    new caption is one of its image's own in `known` (any manifest of pairs) is dropped."""
    order = np.random.default_rng(seed).permutation(len(pairs))
    moved = pairs.assign(caption=pairs["caption"].to_numpy()[order])
    return moved[~_image_texts(moved).isin(_image_texts(known))]


def _normalised(captions: pd.Series) -> pd.Series:
    """Captions as compared for sameness: stripped, lower-case."""
    return captions.str.strip().str.lower()


def _image_texts(rows: pd.DataFrame) -> pd.MultiIndex:
    return pd.MultiIndex.from_arrays([rows["image_key"], _normalised(rows["caption"])])


def filter_check(cfg: BootstrapConfig, human: pd.DataFrame, models: Models) -> dict[str, Any] | None:
    """How well the filter tells held-out human pairs (up to `filter_check_pairs` of the
    `calibration_pairs`) from the same texts on other images: the AUROC of its score (`signal`, no
    prior) over both sets. Raises when it is below `min_filter_auroc`, before any image is
    captioned; None when the check is off."""
    if cfg.min_filter_auroc is None:
        return None
    pairs, source = calibration_pairs(human, cfg)
    if len(pairs) > cfg.filter_check_pairs:
        pairs = pairs.sample(cfg.filter_check_pairs, random_state=cfg.seed).sort_index()
        source = f"{cfg.filter_check_pairs} of the {source}"
    other = mismatched_pairs(pairs, human, cfg.seed)
    plain = replace(models, bank=None)  # no prior: the check is about the filter's own score
    root = Path(cfg.human_manifest).parent
    # both sets in image order, so a batch encodes each of its images once for both
    both = pd.concat([pairs.assign(_match=True), other.assign(_match=False)], ignore_index=True)
    both = both.sort_values(["shard", "member"], kind="stable")
    itm, itc, _ = pair_scores(both, root, plain, cfg)
    scores = filter_scores(itm, itc, cfg.signal, filter_temperature(models))
    value = auroc(scores, both["_match"].to_numpy())
    n_match, n_other = len(pairs), len(other)
    info = {"auroc": value, "matched": n_match, "mismatched": n_other, "pairs": source,
            "min_auroc": cfg.min_filter_auroc}
    log.info("filter check: %s AUROC %.3f over %d human pairs and %d of their texts on other images (%s)",
             cfg.signal, value, n_match, n_other, source)
    if not value >= cfg.min_filter_auroc:  # NaN fails too
        spread = f"{scores.min():.4g}..{scores.max():.4g}"
        raise CapfiltError(
            f"bootstrap: the filter {cfg.filter} does not tell human pairs from the same texts on other images "
            f"(AUROC {value:.3f} over {n_match} + {n_other} pairs, scores {spread}; "
            f"bootstrap.min_filter_auroc is {cfg.min_filter_auroc}): it would keep and drop texts at random. "
            "Look at the pre-training and filter losses (loss.csv next to each model): an ITM loss that stays "
            "near 0.636 never left its 1:2 prior, an ITC loss that climbs back up collapsed. "
            "Set bootstrap.min_filter_auroc: null to bootstrap anyway")
    return info


def filter_temperature(models: Models) -> float:
    """The filter's learned ITC temperature (turns a cosine into the logit ITC trains)."""
    return float(models.filter.model.temp.detach().float().clamp(min=1e-3))


def filter_scores(itm: np.ndarray, itc: np.ndarray, signal: str, temp: float, prior: np.ndarray | None = None,
                  weight: float = 0.0, reference: float = 0.0) -> np.ndarray:
    """The score a text is kept by: p(match) (`itm`), or log-odds + cosine / temp (`itm_itc`).
    With a prior (mean ITM log-odds against other images; `BootstrapConfig.prior_images`) and a
    weight, the log-odds first lose weight × (prior − reference); a text without one (NaN) keeps its own."""
    itm = np.asarray(itm, dtype=np.float64)
    if signal not in ("itm", "itm_itc"):
        raise ValueError(f"unknown filter signal {signal!r} (itm | itm_itc)")
    corrected = prior is not None and weight > 0
    if signal == "itm" and not corrected:
        return itm
    p = np.clip(itm, _P_CLIP, 1.0 - _P_CLIP)
    logodds = np.log(p) - np.log1p(-p)
    if corrected:
        logodds = logodds - weight * np.nan_to_num(np.asarray(prior, dtype=np.float64) - reference, nan=0.0)
    if signal == "itm":
        return 1.0 / (1.0 + np.exp(-logodds))
    return logodds + np.asarray(itc, dtype=np.float64) / temp


def pair_scores(pairs: pd.DataFrame, root: Path, models: Models,
                cfg: BootstrapConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ITM p(match), ITC cosine and prior (NaN without the models' prior bank) of manifest rows
    against their own images, in batches of `batch_size` rows."""
    images = Images(root)
    itm_all: list[float] = []
    itc_all: list[float] = []
    prior_all: list[float] = []
    try:
        for start in range(0, len(pairs), cfg.batch_size):
            chunk = pairs.iloc[start : start + cfg.batch_size]
            keys = list(zip(chunk["shard"], chunk["member"]))
            unique = list(dict.fromkeys(keys))
            pil = images.load([s for s, _ in unique], [m for _, m in unique])
            where = {key: i for i, key in enumerate(unique)}
            index = torch.tensor([where[key] for key in keys], dtype=torch.long)
            ids = image_ids(root, chunk["image_key"])
            with torch.inference_mode(), autocast(models.device, models.precision):
                tensor = images.tensor(pil, models.filter.image_size, models.device)
                itm, itc, prior = text_scores(models.filter, tensor, chunk["caption"].tolist(), index, cfg.text,
                                              models.bank, ids)
            itm_all += itm
            itc_all += itc
            prior_all += prior
    finally:
        images.close()
    return np.asarray(itm_all), np.asarray(itc_all), np.asarray(prior_all, dtype=np.float64)


def _weight(cfg: BootstrapConfig) -> float:
    return cfg.prior_weight if cfg.prior_images > 0 else 0.0


def keep_threshold(scores: np.ndarray, keep: float) -> float:
    """The largest observed score t with at least `keep` of `scores` >= t."""
    ordered = np.sort(scores)
    index = min(len(ordered) - 1, int(np.floor((1.0 - keep) * len(ordered) + 1e-9)))
    return float(ordered[index])


def resolve_threshold(cfg: BootstrapConfig, human: pd.DataFrame,
                      models: Models) -> tuple[float, dict[str, Any]]:
    """The threshold on the filter score and how it was chosen; with `prior_images`, also the
    prior reference (`prior_reference`: the median prior of the held-out human pairs)."""
    if cfg.threshold == "fixed" and cfg.prior_images == 0:
        return cfg.itm_threshold, {"mode": "fixed"}
    pairs, source = calibration_pairs(human, cfg)
    itm, itc, prior = pair_scores(pairs, Path(cfg.human_manifest).parent, models, cfg)
    info: dict[str, Any] = {}
    reference = 0.0
    if cfg.prior_images > 0:
        finite = prior[np.isfinite(prior)]
        if not len(finite):
            raise CapfiltError("bootstrap.prior_images: the filter gave no finite prior on the human pairs; "
                               "load the models with bootstrap.load_models (it builds the reference images)")
        reference = float(np.median(finite))
        info = {"prior_reference": reference, "prior_pairs": source, "prior_images": cfg.prior_images,
                "prior_weight": cfg.prior_weight}
        log.info("text prior: median ITM log-odds %.3f of %d human pairs against %d other images each (%s)",
                 reference, len(finite), cfg.prior_images, source)
    if cfg.threshold == "fixed":
        return cfg.itm_threshold, {"mode": "fixed", **info}
    scores = filter_scores(itm, itc, cfg.signal, filter_temperature(models), prior, _weight(cfg), reference)
    threshold = keep_threshold(scores, cfg.calibration_keep)
    log.info("calibrated %s threshold %.4f keeps %.1f%% of %d human pairs (%s)", cfg.signal, threshold,
             100 * float((scores >= threshold).mean()), len(scores), source)
    return threshold, {"mode": "calibrated", "pairs": source, "n": int(len(scores)),
                       "keep": cfg.calibration_keep, "human_kept": float((scores >= threshold).mean()), **info}


def decide(parts: pd.DataFrame, threshold: float, itc_threshold: float | None, signal: str = "itm",
           temp: float = 1.0, weight: float = 0.0, reference: float = 0.0,
           synthetic_threshold: float | None = None, synthetic_confidence: float | None = None) -> pd.DataFrame:
    """`parts` plus `filter_score` (see `filter_scores`; prior-corrected with `weight` > 0 from the
    `itm_prior` column) and `reason`: empty when kept, else one of REMOVAL_REASONS. Synthetic
    captions face the stricter of `threshold` and `synthetic_threshold` when the latter is given,
    and, with `synthetic_confidence`, need a `caption_confidence` of at least that too."""
    out = parts.copy()
    for column in ("itm_prior", "caption_confidence"):  # parts scored without them
        if column not in out:
            out[column] = np.nan
    out["filter_score"] = filter_scores(out["itm_score"].to_numpy(), out["itc_score"].to_numpy(), signal, temp,
                                        out["itm_prior"].to_numpy(dtype=float), weight, reference)
    below = "itm_below_threshold" if signal == "itm" else "score_below_threshold"
    bar = np.full(len(out), threshold, dtype=np.float64)
    if synthetic_threshold is not None:
        bar[(out["kind"] == "synthetic").to_numpy()] = max(threshold, synthetic_threshold)
    reason = np.where(out["filter_score"].to_numpy() < bar, below, "")
    if itc_threshold is not None:
        reason = np.where((reason == "") & (out["itc_score"].to_numpy() < itc_threshold),
                          "itc_below_threshold", reason)
    synthetic = (out["kind"] == "synthetic").to_numpy()
    if synthetic_confidence is not None:
        if np.isnan(out.loc[synthetic, "caption_confidence"].to_numpy(dtype=float)).any():
            raise CapfiltError("bootstrap.synthetic_confidence is set but the scored parts hold no caption "
                               "confidence; delete the parts folder and run again")
        unsure = synthetic & (out["caption_confidence"].to_numpy(dtype=float) < synthetic_confidence)
        reason = np.where((reason == "") & unsure, "confidence_below_threshold", reason)
    blank = out["caption"].str.strip().str.len().to_numpy() == 0
    reason = np.where(synthetic & blank, "empty_caption", reason)
    out["reason"] = reason
    # a synthetic caption that repeats a kept text of its image adds nothing: web rows win
    kept = out[out["reason"] == ""]
    norm = _normalised(kept["caption"])
    order = kept.assign(_n=norm, _w=(kept["kind"] == "synthetic").astype(int)).sort_values("_w", kind="stable")
    dup = order.duplicated(subset=["image_key", "_n"]) & (order["kind"] == "synthetic")
    out.loc[dup[dup].index, "reason"] = "duplicate"
    return out


def _shard_target(source: str, shard: str) -> str:
    return f"shards/{source}/" + (shard[len("shards/"):] if shard.startswith("shards/") else shard)


def link_shards(out: Path, sources: dict[str, tuple[Path, list[str]]]) -> None:
    """Hard-link (or copy) every used shard under out/shards/<source>/, replacing the old folder."""
    tmp = out / f".shards.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for source, (root, shards) in sources.items():
            for shard in shards:
                dest = tmp / _shard_target(source, shard)[len("shards/"):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(root / shard, dest)
                except OSError:  # another file system, or links not allowed: copy
                    shutil.copy2(root / shard, dest)
        final = out / "shards"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_tables(web: pd.DataFrame, human: pd.DataFrame, decided: pd.DataFrame, provenance: dict[str, str],
                 decoding: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(bootstrapped manifest rows, removed rows) from the decided parts."""
    cap, filt = provenance["captioner"], provenance["filter"]
    scored_web = decided[decided["kind"] == "web"].set_index("sample_id")
    web_rows = web.set_index("sample_id").loc[scored_web.index].reset_index()
    web_rows = web_rows.assign(itm_score=scored_web["itm_score"].to_numpy(), captioner=cap, filter=filt,
                               decoding=None, _reason=scored_web["reason"].to_numpy())
    syn = decided[decided["kind"] == "synthetic"]
    image_info = web.drop_duplicates("image_key").set_index("image_key")
    info = image_info.loc[syn["image_key"], ["split", "width", "height", "sha256"]].reset_index(drop=True)
    syn_rows = pd.concat([syn[["sample_id", "image_key", "caption", "shard", "member", "itm_score"]]
                          .reset_index(drop=True), info], axis=1)
    syn_rows = syn_rows.assign(source="synthetic", ref="bootstrap:" + syn_rows["sample_id"], captioner=cap,
                               filter=filt, decoding=decoding, _reason=syn["reason"].to_numpy())
    human_rows = human[human["split"] == "train"].assign(
        itm_score=np.nan, captioner=None, filter=None, decoding=None, _reason="")
    human_rows["shard"] = human_rows["shard"].map(lambda s: _shard_target("human", s))
    for frame in (web_rows, syn_rows):
        frame["shard"] = frame["shard"].map(lambda s: _shard_target("web", s))
    every = pd.concat([human_rows, web_rows, syn_rows], ignore_index=True)
    manifest = every[every["_reason"] == ""].drop(columns="_reason").reset_index(drop=True)
    removed = _removed_table(every[every["_reason"] != ""], decided)
    return manifest, removed


def _removed_table(rows: pd.DataFrame, decided: pd.DataFrame) -> pd.DataFrame:
    itc = decided.set_index("sample_id")["itc_score"]
    table = rows.assign(itc_score=itc.loc[rows["sample_id"]].to_numpy(), reason=rows["_reason"])
    return table[list(REMOVED_COLUMNS)].reset_index(drop=True)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Pretty JSON, atomically."""
    atomic.write_json(path, payload)


def _metrics(decided: pd.DataFrame, manifest: pd.DataFrame, threshold: float, calibration: dict[str, Any],
             provenance: dict[str, str], decoding: str, images_per_s: float | None,
             signal: str = "itm", temp: float | None = None,
             synthetic_threshold: float | None = None, synthetic_confidence: float | None = None) -> dict[str, Any]:
    web = decided[decided["kind"] == "web"]
    syn = decided[decided["kind"] == "synthetic"]
    web_kept, syn_kept = int((web["reason"] == "").sum()), int((syn["reason"] == "").sum())
    removed = decided[decided["reason"] != ""]
    return {
        "web_texts": len(web), "web_kept": web_kept, "web_kept_fraction": web_kept / max(1, len(web)),
        "synthetic_generated": len(syn), "synthetic_kept": syn_kept,
        "synthetic_kept_fraction": syn_kept / max(1, len(syn)),
        "human_pairs": int((manifest["source"] == "human").sum()), "total_pairs": len(manifest),
        "synthetic_fraction": syn_kept / max(1, len(manifest)),
        "removed_by_reason": {str(k): int(v) for k, v in removed["reason"].value_counts().sort_index().items()},
        "signal": signal, "score_threshold": threshold, "itc_temperature": temp,
        "itm_threshold": threshold if signal == "itm" else None, "threshold": calibration,
        "synthetic_threshold": synthetic_threshold, "synthetic_confidence": synthetic_confidence,
        "images": int(web["image_key"].nunique()), "images_per_s": images_per_s,
        "decoding": decoding, **provenance,
    }


def _log_phrases(table: dict[str, Any]) -> None:
    top = table["top"][:5]
    if top:
        log.info("bootstrap: phrases no human caption uses, most removed (kept / texts; all web texts %.1f%%): %s",
                 100 * table["kept_fraction"], ", ".join(f"{r['phrase']!r} {r['kept']}/{r['texts']}" for r in top))


def merge(cfg: BootstrapConfig, validation: ValidationConfig, web: pd.DataFrame, parts: pd.DataFrame,
          models: Models, decoding: str, images_per_s: float | None, human: pd.DataFrame,
          check: dict[str, Any] | None = None) -> BootstrapResult:
    """Threshold the parts, write manifest.parquet, removed.parquet, shards/ and metrics.json
    (with `check`, the `filter_check` result, as its `filter_check`); `human`: the human manifest."""
    out = Path(cfg.out)
    scored = set(parts.loc[parts["kind"] == "web", "sample_id"])
    if scored != set(web["sample_id"]) or parts["sample_id"].duplicated().any():
        raise CapfiltError(f"{out / 'parts'}: the parts do not cover {cfg.web_manifest} exactly once; "
                           "delete the parts folder and run again")
    threshold, calibration = resolve_threshold(cfg, human, models)
    temp = filter_temperature(models)
    decided = decide(parts, threshold, cfg.itc_threshold, cfg.signal, temp, _weight(cfg),
                     calibration.get("prior_reference", 0.0), cfg.synthetic_threshold, cfg.synthetic_confidence)
    provenance = {"captioner": models.captioner.digest, "filter": models.filter.digest}
    manifest, removed = build_tables(web, human, decided, provenance, decoding)
    manifest = validate(manifest, "bootstrapped", where=str(out / "manifest.parquet"))
    report = run_expectations(manifest, "bootstrapped", validation, out / "expectations", "bootstrap")
    require(report, str(out / "manifest.parquet"))
    human_train = human[human["split"] == "train"]
    link_shards(out, {"human": (Path(cfg.human_manifest).parent, sorted(human_train["shard"].unique())),
                      "web": (Path(cfg.web_manifest).parent, sorted(web["shard"].unique()))})
    write_manifest(manifest, out / "manifest.parquet", "bootstrapped")
    atomic.write_with(out / "removed.parquet", lambda tmp: removed.to_parquet(tmp, index=False))
    scores = decided[list(SCORE_COLUMNS)].reset_index(drop=True)
    atomic.write_with(out / "scores.parquet", lambda tmp: scores.to_parquet(tmp, index=False))
    metrics = _metrics(decided, manifest, threshold, calibration, provenance, decoding, images_per_s,
                       cfg.signal, temp, cfg.synthetic_threshold, cfg.synthetic_confidence)
    metrics["filter_check"] = check
    if cfg.phrases.top > 0:
        web_rows = decided[decided["kind"] == "web"]
        metrics["unseen_phrases"] = unseen_phrases(web_rows["caption"].tolist(), (web_rows["reason"] == "").tolist(),
                                                   human_train["caption"], cfg.phrases, cfg.seed)
        _log_phrases(metrics["unseen_phrases"])
    write_json(out / "metrics.json", metrics)
    log.info("bootstrap: kept %d/%d web texts and %d/%d synthetic captions (%s threshold %.3f); %d pairs",
             metrics["web_kept"], metrics["web_texts"], metrics["synthetic_kept"],
             metrics["synthetic_generated"], cfg.signal, threshold, len(manifest))
    return BootstrapResult(out / "manifest.parquet", out / "removed.parquet", metrics)
