"""The evaluate stage: round 1 vs round 2 on the test set, and the filter against the web ground truth.

Each round is a (captioner, filter) pair. Captioning: beam search as BLIP's COCO evaluation (3
beams, "a picture of " prompt stripped, repetition penalty 1.0), scored with pycocoevalcap's
BLEU-4 and CIDEr on a simple tokenisation (lower case, punctuation to spaces: no Java PTB
tokenizer), plus, for the embedded corpus, the exact attribute accuracy (mean of shape, colour,
size and position accuracy) and strict accuracy from the scene scorer. Retrieval follows BLIP's
`evaluation`: ITC cosine ranks every pair, the top `k_test` per query are re-scored with
`itm logit(match) + cosine` (not softmaxed), everything else stays at -100; image→text counts the
best rank among an image's captions, text→image the rank of its image. All numbers are fractions
in [0, 1] (CIDEr is unbounded). Filter quality reads the bootstrap outputs and `truth.csv`: the
AUROC of web-text ITM scores for clean (`correct`) vs noisy texts, precision and recall of
removal (noise = positive), kept fractions per noise kind, and the share of kept synthetic
captions that are not exactly right. Outputs: metrics.json, plots, report.html (components/report.py).
With `ablation: true` metrics.json also gets `ablation` (none = round 1, captioner, filter, both =
round 2; components/ablation.py), `rounds` holds rounds 3.. when the rounds stage ran them, and
with `draws: N` `draws` holds the gain of each training draw (the run's and the draws stage's N;
components/draws.py) and its mean over draws with a t-interval.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from components import report
from components.batch_inference import (Images, Loaded, autocast, caption, device,
                                        generation_config, load_captioner, load_filter, tokenize)
from components.bootstrap_merge import filter_scores, write_json
from components.config import EvaluateConfig
from components.errors import CapfiltError
from components.schemas import read_manifest
from components.significance import Tally, auroc, mean_interval, paired_intervals
from components.synth_score import (ATTRIBUTES, PLACEMENT_ERRORS, PLACEMENT_KEYS, CaptionHits, caption_hits,
                                     scene_of, score_captions, shape_colour_pairs, split_pairs)

log = logging.getLogger(__name__)

HEADLINE = ("attribute_accuracy", "strict_accuracy", "cider", "bleu4", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")
_PUNCT = re.compile(r"[^a-z0-9 ]+")


def simple_tokens(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces (stands in for the PTB tokenizer)."""
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def caption_scores(captions: dict[str, str], refs: dict[str, list[str]],
                   tally: Tally | None = None) -> dict[str, float]:
    """BLEU-4 and CIDEr (pycocoevalcap) of one caption per image against its references; `tally`
    gets each image's CIDEr (in the order of `captions`)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    res = {k: [simple_tokens(c) or "empty"] for k, c in captions.items()}
    gts = {k: [simple_tokens(r) for r in refs[k]] for k in captions}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per_image = Cider().compute_score(gts, res)  # per_image in the order of gts
    if tally is not None:
        tally.add("cider", per_image)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


def attribute_scores(captions: dict[str, str], scenes: dict[str, Any],
                     tally: Tally | None = None, known_pairs: set[tuple[str, str]] | None = None) -> dict[str, float]:
    """Attribute accuracy (mean over shape, colour, size, position) and strict accuracy, as
    `score_captions` counts them, and how the misplaced objects were misplaced (PLACEMENT_KEYS);
    `tally` gets each image's attribute hits over its objects and its exactness (in the order of
    `captions`). With `known_pairs` (the shape-colour pairs the human captions show) also the share
    of objects named with both shape and colour right, split into known and novel pairs (NoCaps'
    in-domain / out-of-domain, for pairs); the novel share is None when every pair is known."""
    truths = [scene_of(scenes, k) for k in captions]
    hits = [caption_hits(t, c) for t, c in zip(truths, captions.values(), strict=True)]
    if not hits:
        raise CapfiltError("no captions to score")
    objects = np.array([h.objects for h in hits])
    table = np.array([h.hits for h in hits], dtype=np.float64)  # (N, 4) right per attribute
    misplaced = np.array([h.misplaced for h in hits], dtype=np.float64)  # (N, 3) misplaced per PLACEMENT_ERRORS
    exact = np.array([h.exact for h in hits], dtype=np.float64)
    per = dict(zip(ATTRIBUTES, table.sum(axis=0) / objects.sum(), strict=True))
    placement = {PLACEMENT_KEYS[e]: float(misplaced[:, k].sum() / objects.sum())
                 for k, e in enumerate(PLACEMENT_ERRORS)}
    if tally is not None:
        tally.add("attribute_accuracy", table.mean(axis=1), objects)  # mean of 4 ratios, one denominator
        tally.add("strict_accuracy", exact)
        for k, a in enumerate(ATTRIBUTES):
            tally.add(f"{a}_accuracy", table[:, k], objects)
        for k, e in enumerate(PLACEMENT_ERRORS):
            tally.add(PLACEMENT_KEYS[e], misplaced[:, k], objects)
    out = {"attribute_accuracy": float(np.mean(list(per.values()))), "strict_accuracy": float(exact.mean()),
           **{f"{a}_accuracy": float(v) for a, v in per.items()}, **placement}
    if known_pairs is not None:
        pairs = np.array([split_pairs(t, h, known_pairs) for t, h in zip(truths, hits, strict=True)],
                         dtype=np.float64)  # (N, 4): known objects, right; novel objects, right
        for name, n_col in (("known_pair_accuracy", 0), ("novel_pair_accuracy", 2)):
            total = pairs[:, n_col].sum()
            out[name] = float(pairs[:, n_col + 1].sum() / total) if total else None
            if tally is not None and total:
                tally.add(name, pairs[:, n_col + 1], pairs[:, n_col])
    return out


def recall_at_k(score_i2t: np.ndarray, score_t2i: np.ndarray, text_image: np.ndarray,
                ks: tuple[int, ...] = (1, 5, 10), tally: Tally | None = None) -> dict[str, float]:
    """BLIP's `itm_eval`: score_i2t (N_img, N_txt), score_t2i (N_txt, N_img), text_image (N_txt,)
    the image of each text. Ties count against the query (strictly greater scores rank first).
    `tally` gets per image whether it found a caption, and how many of its captions found it."""
    n_img = score_i2t.shape[0]
    i2t_rank = np.full(n_img, np.iinfo(np.int64).max)
    for j, img in enumerate(text_image):  # best rank among an image's captions
        rank = int((score_i2t[img] > score_i2t[img, j]).sum())
        i2t_rank[img] = min(i2t_rank[img], rank)
    t2i_rank = np.array([(score_t2i[j] > score_t2i[j, img]).sum() for j, img in enumerate(text_image)])
    out = {}
    texts = np.bincount(text_image, minlength=n_img)  # (N_img,) captions per image
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t_rank < k).mean())
        out[f"t2i_r{k}"] = float((t2i_rank < k).mean())
        if tally is not None:
            tally.add(f"i2t_r{k}", i2t_rank < k)
            tally.add(f"t2i_r{k}", np.bincount(text_image, weights=t2i_rank < k, minlength=n_img), texts)
    return out


def _topk_itm(filt: Loaded, image_embeds: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
              pairs_img: torch.Tensor, pairs_txt: torch.Tensor, chunk: int) -> torch.Tensor:
    """ITM match logits of (image, text) index pairs, in chunks; each chunk's images encoded once.

    A pair asked for twice (in the top k of both directions) is scored once; pairs are scored in
    image order, so a chunk holds few images, and each chunk is cut to its longest text.
    """
    n_text = ids.shape[0]
    keys, inverse = (pairs_img * n_text + pairs_txt).unique(return_inverse=True)  # sorted: image-major
    img_all, txt_all = keys // n_text, keys % n_text
    out = []
    for s in range(0, len(keys), chunk):
        img, txt = img_all[s : s + chunk], txt_all[s : s + chunk]
        uniq, index = img.unique(return_inverse=True)
        length = int(mask[txt].sum(1).max())
        logits = filt.model.itm_logits(image_embeds[uniq], ids[txt, :length], mask[txt, :length], index)
        out.append(logits[:, 1].float())
    return torch.cat(out)[inverse]


def retrieval(filt: Loaded, image: torch.Tensor, texts: list[str], text_image: np.ndarray,
              cfg: EvaluateConfig, tally: Tally | None = None) -> dict[str, float]:
    """ITC ranking + ITM re-ranking of the top `k_test` in both directions (BLIP)."""
    dev, model = image.device, filt.model
    embeds = torch.cat([model.encode_image(image[s : s + cfg.batch_size])
                        for s in range(0, len(image), cfg.batch_size)])  # (N, 1+P, Dv)
    ids, mask = tokenize(filt.tokenizer, texts, cfg.text, dev)  # (M, T)
    text_feat = torch.cat([model.text_features(ids[s : s + 256], mask[s : s + 256])
                           for s in range(0, len(texts), 256)])
    sims = (model.image_features(embeds) @ text_feat.t()).float()  # (N, M) cosine, no temperature
    chunk = max(1, cfg.batch_size) * 16
    k_t, k_i = min(cfg.k_test, sims.shape[1]), min(cfg.k_test, sims.shape[0])
    top_t = sims.topk(k_t, dim=1).indices.reshape(-1)  # (N*k,) texts of each image's top k
    rows = torch.arange(sims.shape[0], device=dev).repeat_interleave(k_t)
    top_i = sims.t().topk(k_i, dim=1).indices.reshape(-1)  # (M*k,) images of each text's top k
    cols = torch.arange(sims.shape[1], device=dev).repeat_interleave(k_i)
    itm = _topk_itm(filt, embeds, ids, mask, torch.cat([rows, top_i]), torch.cat([top_t, cols]), chunk)
    score_i2t = torch.full_like(sims, -100.0)
    score_i2t[rows, top_t] = itm[: len(rows)] + sims[rows, top_t]
    score_t2i = torch.full_like(sims.t(), -100.0)
    score_t2i[cols, top_i] = itm[len(rows) :] + sims[top_i, cols]
    return recall_at_k(score_i2t.cpu().numpy(), score_t2i.cpu().numpy(), text_image, tally=tally)


def evaluate_round(cfg: EvaluateConfig, test: pd.DataFrame, scenes: dict[str, Any] | None,
                   captioner_dir: str, filter_dir: str,
                   dev: torch.device) -> tuple[dict[str, float], dict[str, str], Tally]:
    """One round's metrics, its caption per test image, and the per-image tally of its metrics."""
    captioner, filt = load_captioner(captioner_dir, dev), load_filter(filter_dir, dev)
    gen = generation_config(captioner, "beam", 1, num_beams=cfg.num_beams, top_p=0.9,
                            repetition_penalty=cfg.repetition_penalty,
                            max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens)
    firsts = test.drop_duplicates("image_key")
    keys = firsts["image_key"].tolist()
    images, tally = Images(Path(cfg.test_manifest).parent), Tally()
    try:
        pil = images.load(firsts["shard"].tolist(), firsts["member"].tolist())
        with torch.inference_mode(), autocast(dev):
            captions: list[str] = []
            for s in range(0, len(pil), cfg.batch_size):
                tensor = images.tensor(pil[s : s + cfg.batch_size], captioner.image_size, dev)
                captions += caption(captioner, tensor, gen, cfg.prompt)
            image = images.tensor(pil, filt.image_size, dev)
            index = {k: i for i, k in enumerate(keys)}
            text_image = test["image_key"].map(index).to_numpy()
            metrics = retrieval(filt, image, test["caption"].tolist(), text_image, cfg, tally)
    finally:
        images.close()
    by_key = dict(zip(keys, captions, strict=True))
    refs = test.groupby("image_key", sort=False)["caption"].apply(list).to_dict()
    metrics.update(caption_scores(by_key, refs, tally))
    if scenes is not None:
        metrics.update(attribute_scores(by_key, scenes, tally, known_pairs(cfg)))
    else:  # real data: no ground truth to check attributes against
        metrics.update(attribute_accuracy=None, strict_accuracy=None)
    return metrics, by_key, tally


def _truth(cfg: EvaluateConfig) -> pd.DataFrame | None:
    if cfg.web_truth is None or not (Path(cfg.web_truth) / "truth.csv").is_file():
        return None
    path = Path(cfg.web_truth) / "truth.csv"
    with path.open(encoding="utf-8", newline="") as f:
        rows = [(r["image_id"], r["noise"], _wrong_attribute(r), _presence(r)) for r in csv.DictReader(f)]
    return pd.DataFrame(rows, columns=["image_id", "noise", "attribute", "presence"]).set_index("image_id")


def _wrong_attribute(row: dict[str, str]) -> str:
    """The attribute a wrong_attribute text got wrong (`detail` "shape:cross->ring" -> "shape");
    "" for every other row."""
    if row["noise"] != "wrong_attribute":
        return ""
    return (row.get("detail") or "").split(":")[0]


def _presence(row: dict[str, str]) -> str:
    """Whether the wrong value a wrong_attribute text names is on another object of its image
    ("shape:cross->ring" and a ring elsewhere: "elsewhere") or on none ("absent"): the first is
    caught only by tying the value to its object, the second by seeing the value at all. "" for
    other rows and for rows whose detail or scene cannot be read."""
    attr, _, change = (row.get("detail") or "").partition(":")
    new = change.partition("->")[2]
    if row["noise"] != "wrong_attribute" or not new:
        return ""
    try:
        objects = json.loads(row.get("scene") or "")["objects"]
        values = {str(o.get(attr)) for o in objects}
    except (ValueError, KeyError, TypeError, AttributeError):
        return ""
    return "elsewhere" if new in values else "absent"


def web_decisions(cfg: EvaluateConfig) -> pd.DataFrame:
    """Every web text and synthetic caption with its scores and whether the filter kept it.

    `score` is the filter score the decision used (`scores.parquet`); a bootstrap output without
    that file (older runs) falls back to the ITM p(match), with no ITC column to offer."""
    root = Path(cfg.bootstrap)
    cols = ["sample_id", "image_key", "source", "caption", "shard", "member", "itm_score"]
    if (root / "scores.parquet").is_file():
        try:
            scores = pd.read_parquet(root / "scores.parquet")
        except (OSError, ValueError) as exc:
            raise CapfiltError(f"{root / 'scores.parquet'}: unreadable; run the bootstrap stage ({exc})") from None
        if "caption_confidence" not in scores:  # scored before the captioner's confidence existed
            scores = scores.assign(caption_confidence=np.nan)
        return scores.rename(columns={"kind": "source", "filter_score": "score"}).assign(
            kept=scores["reason"] == "")[cols + ["itc_score", "score", "caption_confidence", "kept"]]
    manifest = read_manifest(root / "manifest.parquet", "bootstrapped")
    try:
        removed = pd.read_parquet(root / "removed.parquet")
    except (OSError, ValueError) as exc:
        raise CapfiltError(f"{root / 'removed.parquet'}: unreadable; run the bootstrap stage ({exc})") from None
    kept = manifest.loc[manifest["source"] != "human", cols].assign(kept=True)
    every = pd.concat([kept, removed[cols].assign(kept=False)], ignore_index=True)
    return every.assign(itc_score=np.nan, score=every["itm_score"], caption_confidence=np.nan)[
        cols + ["itc_score", "score", "caption_confidence", "kept"]]


def filter_quality(decisions: pd.DataFrame, truth: pd.DataFrame, web_scenes: dict[str, Any] | None,
                   temp: float | None = None) -> dict[str, Any]:
    """AUROC (of the filter score, per noise kind and per wrong attribute against the correct
    texts; also of ITM, ITC and, given the filter's ITC temperature, their sum as `signal: itm_itc`
    scores), removal precision/recall, kept fractions per noise kind, wrong kept synthetic captions."""
    web = decisions[decisions["source"] == "web"].copy()
    # truth.csv's rows in web order (ids are the image keys' stems); columns it lacks come out empty
    info = truth.reindex(index=[Path(k).stem for k in web["image_key"]],
                         columns=["noise", "attribute", "presence"]).astype(object)
    web["noise"] = info["noise"].fillna("unknown").to_numpy()
    noisy, removed = (web["noise"] != "correct").to_numpy(), ~web["kept"].to_numpy()
    hits = int((noisy & removed).sum())
    itm = web["itm_score"].to_numpy(dtype=float)
    itc = web["itc_score"].to_numpy(dtype=float) if "itc_score" in web else np.full(len(web), np.nan)
    score = web["score" if "score" in web else "itm_score"].to_numpy(dtype=float)
    has_itc = bool(np.isfinite(itc).all())
    noise = web["noise"].to_numpy()
    kinds = {k: ~noisy | (noise == k) for k in sorted(set(noise) - {"correct"})}  # correct + one kind
    wrong = info["attribute"].fillna("").to_numpy()  # the attribute a text got wrong
    attributes = {a: ~noisy | (wrong == a) for a in sorted(set(wrong) - {""})}  # correct + those texts
    where = info["presence"].fillna("").to_numpy()  # the wrong value on another object, or on none
    presence: dict[str, dict[str, np.ndarray]] = {}  # attribute -> absent / elsewhere -> rows
    for a, p in sorted(set(zip(wrong, where, strict=True))):
        if a and p:
            presence.setdefault(a, {})[p] = ~noisy | ((wrong == a) & (where == p))
    out: dict[str, Any] = {
        "auroc": auroc(score, ~noisy),
        "auroc_itm": auroc(itm, ~noisy),
        "auroc_itc": auroc(itc, ~noisy) if has_itc else None,
        "auroc_itm_itc": auroc(filter_scores(itm, itc, "itm_itc", temp), ~noisy)
        if has_itc and temp is not None and temp > 0 else None,
        "auroc_by_kind": {k: auroc(score[rows], ~noisy[rows]) for k, rows in kinds.items()},
        # wrong_attribute split by the attribute made wrong (shape, colour, ...): which the filter misses
        "auroc_by_attribute": {a: auroc(score[rows], ~noisy[rows]) for a, rows in attributes.items()},
        # ...and by whether the wrong value is elsewhere in the image ("a red ring" beside a blue
        # ring: binding) or nowhere ("a red ring" with no ring at all: seeing the shape)
        "auroc_by_presence": {a: {p: auroc(score[rows], ~noisy[rows]) for p, rows in split.items()}
                              for a, split in presence.items()},
        "precision": hits / removed.sum() if removed.sum() else float("nan"),
        "recall": hits / noisy.sum() if noisy.sum() else float("nan"),
        "kept_fraction": float(web["kept"].mean()),
        "kept_fraction_by_kind": {k: float(g["kept"].mean()) for k, g in web.groupby("noise")},
    }
    syn = decisions[decisions["source"] == "synthetic"]
    kept = syn["kept"].to_numpy(dtype=bool)
    out["synthetic_kept"] = int(kept.sum())
    if web_scenes is not None:
        hits = [caption_hits(scene_of(web_scenes, k), c)  # each synthetic caption scored once
                for k, c in zip(syn["image_key"], syn["caption"], strict=True)]
        exact = np.array([h.exact for h in hits], dtype=bool)
        if kept.any():
            out["synthetic_kept_wrong_fraction"] = float(1.0 - exact[kept].mean())
        out["synthetic_auroc_exact"] = _synthetic_ranking(syn, exact)
        out["synthetic_other_object"] = _misbound(hits, kept)
    return out


def _misbound(hits: list[CaptionHits], kept: np.ndarray) -> dict[str, float | None]:
    """Of the objects of the kept and of the removed synthetic captions of scenes with two or more
    objects (a lone object has no other object's cell to be put in), the fraction put in another
    object's cell (None where there are none): whether the filter keeps the captions that bind
    objects to the wrong cells."""
    k = PLACEMENT_ERRORS.index("other_object")
    out: dict[str, float | None] = {}
    for name, rows in (("kept", kept), ("removed", ~kept)):
        chosen = [h for h, r in zip(hits, rows, strict=True) if r and h.objects > 1]
        objects = sum(h.objects for h in chosen)
        out[name] = sum(h.misplaced[k] for h in chosen) / objects if objects else None
    return out


def _synthetic_ranking(syn: pd.DataFrame, exact: np.ndarray) -> dict[str, float | None]:
    """AUROC of the filter score and of the captioner's confidence for telling the synthetic
    captions that describe their scene exactly (`exact`) from the others (None where not scored)."""
    out: dict[str, float | None] = {}
    for name, column in (("filter", "score"), ("confidence", "caption_confidence")):
        values = syn[column].to_numpy(dtype=float) if column in syn else np.full(len(syn), np.nan)
        out[name] = auroc(values, exact) if len(values) and np.isfinite(values).all() else None
    return out


def _wrong_fraction(web_scenes: dict[str, Any], rows: pd.DataFrame) -> float | None:
    """Fraction of `rows` (image_key, caption) whose caption is not exactly right; None if empty."""
    if not len(rows):
        return None
    return 1.0 - score_captions(web_scenes, zip(rows["image_key"], rows["caption"])).strict


def decoding_row(decisions: pd.DataFrame, web_scenes: dict[str, Any] | None) -> dict[str, Any]:
    """BLIP's noise ratio of one bootstrap's synthetic captions (the fraction the filter removed,
    empty ones included) and, with scenes, how many of all / of the kept ones are not exactly right."""
    syn = decisions[decisions["source"] == "synthetic"]
    row: dict[str, Any] = {"synthetic": len(syn), "noise_ratio": float((~syn["kept"]).mean()) if len(syn) else None}
    if web_scenes is not None and len(syn):
        row["wrong_fraction"] = _wrong_fraction(web_scenes, syn)
        row["kept_wrong_fraction"] = _wrong_fraction(web_scenes, syn[syn["kept"]])
    return row


def decoding_comparison(cfg: EvaluateConfig, web_scenes: dict[str, Any] | None,
                        decisions: pd.DataFrame | None = None) -> dict[str, Any] | None:
    """`decoding_row` of `bootstrap` and of each of `decoding_runs`, keyed by their decoding label;
    `decisions`, when given, are `bootstrap`'s (already read)."""
    if not cfg.decoding_runs:
        return None
    out: dict[str, Any] = {}
    for root in [cfg.bootstrap, *cfg.decoding_runs]:
        if not (Path(root) / "metrics.json").is_file():
            raise CapfiltError(f"{root}: no bootstrap output (metrics.json missing); run the bootstrap stage "
                               "with `--set bootstrap.out=...` first (evaluate.decoding_runs)")
        label = json.loads((Path(root) / "metrics.json").read_text()).get("decoding") or Path(root).name
        key = label if label not in out else f"{label} [{root}]"
        rows = decisions if decisions is not None and root == cfg.bootstrap else \
            web_decisions(cfg.model_copy(update={"bootstrap": str(root)}))
        out[key] = {"bootstrap": str(root), **decoding_row(rows, web_scenes)}
    return out


def filter_settings(root: Path) -> dict[str, Any]:
    """A bootstrap's filter signal and thresholds (`itm_threshold` None when the signal is not ITM)."""
    try:
        summary = json.loads((root / "metrics.json").read_text())
    except (OSError, ValueError):
        return {"signal": None, "score_threshold": None, "itm_threshold": None, "itc_temperature": None,
                "prior_images": 0}
    signal = summary.get("signal", "itm")
    itm = summary.get("itm_threshold")
    score = summary.get("score_threshold", itm)
    temp = summary.get("itc_temperature")
    prior = (summary.get("threshold") or {}).get("prior_images") or 0
    return {"signal": signal, "score_threshold": None if score is None else float(score),
            "itm_threshold": None if itm is None else float(itm),
            "itc_temperature": None if temp is None else float(temp), "prior_images": int(prior)}


def filter_metrics(decisions: pd.DataFrame, truth: pd.DataFrame, web_scenes: dict[str, Any] | None,
                   bootstrap_dir: Path) -> dict[str, Any]:
    """`filter_quality` of one bootstrap output with its filter settings (signal, thresholds, ITC
    temperature, which `auroc_itm_itc` needs) beside it."""
    settings = filter_settings(bootstrap_dir)
    return {**filter_quality(decisions, truth, web_scenes, settings["itc_temperature"]), **settings}


def _finite(value: Any) -> Any:
    """NaN/inf -> None, so metrics.json stays strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def test_set(cfg: EvaluateConfig) -> tuple[pd.DataFrame, dict[str, Any] | None]:
    """The test manifest and, on the embedded corpus, its ground-truth scenes (else None)."""
    from components.synth_score import load_scenes

    test = read_manifest(Path(cfg.test_manifest), "ingested")
    if cfg.test_scenes is not None and (Path(cfg.test_scenes) / "scenes.jsonl").is_file():
        return test, load_scenes(Path(cfg.test_scenes))
    return test, None


def known_pairs(cfg: EvaluateConfig) -> set[tuple[str, str]] | None:
    """The shape-colour pairs the human split's scenes show (None without its ground truth)."""
    from components.synth_score import load_scenes

    if cfg.human_scenes is None or not (Path(cfg.human_scenes) / "scenes.jsonl").is_file():
        return None
    return shape_colour_pairs(load_scenes(Path(cfg.human_scenes)).values())


def test_overlap(test: pd.DataFrame, train: dict[str, pd.DataFrame]) -> dict[str, Any]:
    """How many test images are byte-identical (sha256) to an image of each training manifest."""
    digests = test.drop_duplicates("image_key")["sha256"]
    train_digests = {name: set(df["sha256"]) for name, df in train.items()}
    by_manifest = {name: int(digests.isin(d).sum()) for name, d in train_digests.items()}
    seen = digests.isin(set().union(*train_digests.values()))
    return {"images": len(digests), "distinct_images": int(digests.nunique()),
            "seen_in_training": int(seen.sum()), "by_manifest": by_manifest}


def check_test_set(cfg: EvaluateConfig, test: pd.DataFrame) -> dict[str, Any]:
    """`test_overlap` against `cfg.train_manifests`, with a warning when any test image leaked."""
    train = {path: read_manifest(Path(path), "ingested") for path in cfg.train_manifests}
    overlap = test_overlap(test, train)
    if overlap["seen_in_training"]:
        log.warning("%d of %d test images are byte-identical to training images (%s): their scores "
                    "flatter both rounds", overlap["seen_in_training"], overlap["images"],
                    ", ".join(f"{n}: {k}" for n, k in overlap["by_manifest"].items()))
    return overlap


def evaluate_models(cfg: EvaluateConfig, models: dict[str, tuple[Path, Path]]) -> dict[str, dict[str, float]]:
    """`evaluate_round` for each name -> (captioner dir, filter dir) (the ablation and rounds stages)."""
    torch.set_num_threads(cfg.threads or (os.cpu_count() or 1))
    dev = device()
    test, scenes = test_set(cfg)
    out = {}
    for name, (cap_dir, filt_dir) in models.items():
        out[name], _, _ = evaluate_round(cfg, test, scenes, str(cap_dir), str(filt_dir), dev)
        log.info("%s: %s", name, ", ".join(f"{k} {out[name][k]:.3f}" for k in HEADLINE if out[name].get(k) is not None))
    return _finite(out)


def bootstrap_quality(cfg: EvaluateConfig, bootstrap_dir: Path) -> dict[str, Any] | None:
    """The filter quality (as metrics["filter"]) of another bootstrap output; None without truth."""
    from components.synth_score import load_scenes

    truth = _truth(cfg)
    if truth is None:
        return None
    decisions = web_decisions(cfg.model_copy(update={"bootstrap": str(bootstrap_dir)}))
    return _finite(filter_metrics(decisions, truth, load_scenes(Path(cfg.web_truth)), Path(bootstrap_dir)))


def _stage_metrics(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise CapfiltError(f"{path}: not valid JSON ({exc}); run its stage again") from None


def ablation_rows(cfg: EvaluateConfig, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The ablation table (none = round 1, captioner, filter, both = round 2) when it was run."""
    if not cfg.ablation:
        return None
    path = Path(cfg.ablation_out) / "metrics.json"
    ablation = _stage_metrics(path)
    if ablation is None or not ablation.get("enabled"):
        raise CapfiltError(f"{path}: no ablation results; run the ablation stage with evaluate.ablation: true")
    runs = {"none": metrics["round1"], **ablation["variants"], "both": metrics["round2"]}
    corpus = ablation.get("corpus", {})
    return {name: {**{k: m.get(k) for k in HEADLINE}, "pairs": corpus.get(name, {})} for name, m in runs.items()}


def extra_rounds(cfg: EvaluateConfig) -> dict[str, Any] | None:
    """Round 3, 4, ... test metrics from the rounds stage, when it ran more than one round."""
    rounds = _stage_metrics(Path(cfg.rounds_out) / "metrics.json")
    if rounds is None or rounds.get("rounds", 1) <= 1:
        return None
    return rounds["test"]


def draw_gains(cfg: EvaluateConfig, metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The gain over training draws when the draws stage ran: each draw's rounds and gain (the
    run's own draw first), and per metric the mean gain with its t-interval (`summary`)."""
    if cfg.draws == 0:
        return None
    path = Path(cfg.draws_out) / "metrics.json"
    stage = _stage_metrics(path)
    if stage is None or not stage.get("enabled") or len(stage.get("seeds", [])) != cfg.draws:
        raise CapfiltError(f"{path}: no results for {cfg.draws} draws; run the draws stage with "
                           f"evaluate.draws: {cfg.draws}")
    runs = {f"seed{stage['run_seed']}": {"round1": metrics["round1"], "round2": metrics["round2"]},
            **stage["draws"]}
    keys = [k for k, v in metrics["round1"].items() if isinstance(v, float)]
    draws, gains = {}, {}
    for name, pair in runs.items():
        gain = {k: pair["round2"][k] - pair["round1"][k] for k in keys
                if pair["round1"].get(k) is not None and pair["round2"].get(k) is not None}
        draws[name] = {**pair, "gain": gain}
        for k, v in gain.items():
            gains.setdefault(k, []).append(v)
    summary = {k: mean_interval(v, cfg.confidence) for k, v in gains.items() if len(v) >= 2}
    for k in HEADLINE:
        if k in summary:
            s = summary[k]
            log.info("draws: %s gain %+.3f [%+.3f, %+.3f] over %d draws, up in %d", k, s["mean"], s["low"],
                     s["high"], s["n"], s["up"])
    return {"run": f"seed{stage['run_seed']}", "confidence": cfg.confidence, "draws": draws, "summary": summary}


def run(cfg: EvaluateConfig) -> dict[str, Any]:
    """`capfilt stage evaluate`: metrics.json, plots and report.html under `cfg.out`."""
    from components.synth_score import load_scenes

    torch.set_num_threads(cfg.threads or (os.cpu_count() or 1))
    dev = device()
    test, scenes = test_set(cfg)
    metrics: dict[str, Any] = {"test_set": check_test_set(cfg, test)}
    captions, tallies = {}, {}
    for name, cap_dir, filt_dir in (("round1", cfg.round1_captioner, cfg.round1_filter),
                                    ("round2", cfg.round2_captioner, cfg.round2_filter)):
        metrics[name], captions[name], tallies[name] = evaluate_round(cfg, test, scenes, cap_dir, filt_dir, dev)
        log.info("%s: %s", name, ", ".join(f"{k} {metrics[name][k]:.3f}" for k in HEADLINE if metrics[name].get(k) is not None))
    metrics["gain"] = {k: None if v is None or metrics["round2"].get(k) is None else metrics["round2"][k] - v
                       for k, v in metrics["round1"].items()}
    intervals = paired_intervals(tallies["round1"], tallies["round2"], cfg.resamples, cfg.confidence, cfg.resample_seed)
    if intervals:
        metrics["gain_interval"] = {"confidence": cfg.confidence, "resamples": cfg.resamples, "metrics": intervals}
        log.info("round 2 - round 1 (%.0f%% interval over resampled test images): %s", 100 * cfg.confidence,
                 ", ".join(f"{k} {v['gain']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"
                           for k, v in intervals.items() if k in HEADLINE))
    decisions, truth = None, _truth(cfg)
    web_scenes = load_scenes(Path(cfg.web_truth)) if truth is not None else None
    if (Path(cfg.bootstrap) / "manifest.parquet").is_file():
        decisions = web_decisions(cfg)
        phrases = (_stage_metrics(Path(cfg.bootstrap) / "metrics.json") or {}).get("unseen_phrases")
        if phrases is not None:
            metrics["unseen_phrases"] = phrases
        if truth is not None:
            metrics["filter"] = filter_metrics(decisions, truth, web_scenes, Path(cfg.bootstrap))
    for key, extra in (("ablation", ablation_rows(cfg, metrics)), ("rounds", extra_rounds(cfg)),
                       ("draws", draw_gains(cfg, metrics)),
                       ("decoding", decoding_comparison(cfg, web_scenes, decisions))):
        if extra is not None:
            metrics[key] = extra
    out = Path(cfg.out)
    write_json(out / "metrics.json", _finite(metrics))
    report.write_outputs(out, metrics, decisions, truth, Path(cfg.bootstrap), cfg.grid_images, captions)
    return metrics
