"""The ablation stage: BLIP's CapFilt ablation, which part of CapFilt the gain comes from.

Four pre-training corpora: `none` = human pairs + every web text (round 1's corpus, so round 1
is its row), `captioner` = human + every web text + every non-empty synthetic caption (nothing
filtered), `filter` = human + the web texts the filter kept (no synthetic captions), `both` =
the bootstrapped manifest (round 2). Only `captioner` and `filter` are trained here. Their
manifests come from the bootstrap outputs: the kept manifest plus `removed.parquet`, whose rows
get their image columns back from the web manifest and their provenance from the bootstrap's
metrics.json; shards are hard-linked next to each manifest as the bootstrap does, and the
manifest passes the bootstrapped schema and GX suite (the filter variant without the lower bound
on synthetic rows, which it has none of by design). Each then goes through round 2's chain
(retrain and both fine-tunes, components/chain.py) under `<ablation_out>/variants/<variant>/`
and is evaluated on the test set like the rounds. `evaluate.ablation: false` (the default) only
writes metrics.json, so the stage costs nothing in a normal run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from components import atomic, chain
from components.config import Params
from components.errors import CapfiltError
from components.expectations import require, run_expectations
from components.schemas import columns, read_manifest, validate, write_manifest

# components.bootstrap_merge and components.evaluate import torch (~5 s): imported where used, so
# the disabled stage (the default) starts in about a second.

log = logging.getLogger(__name__)

VARIANTS = ("captioner", "filter")  # the corpora this stage trains; none and both are rounds 1 and 2
SOURCE_ORDER = {"human": 0, "web": 1, "synthetic": 2}


def removed_rows(removed: pd.DataFrame, web: pd.DataFrame, provenance: dict[str, Any]) -> pd.DataFrame:
    """`removed.parquet` rows in the bootstrapped schema: image columns from the web manifest
    (by image_key), `ref` of web rows by sample_id, checkpoints and decoding from provenance."""
    images = web.drop_duplicates("image_key").set_index("image_key")
    missing = set(removed["image_key"]) - set(images.index)
    if missing:
        raise CapfiltError(f"{len(missing)} removed rows name images the web manifest lacks "
                           f"(e.g. {sorted(missing)[0]}); run the bootstrap stage again")
    info = images.loc[removed["image_key"], ["split", "width", "height", "sha256"]].reset_index(drop=True)
    rows = removed.reset_index(drop=True).drop(columns=["itc_score"])
    rows = rows.join(info)
    synthetic = rows["source"] == "synthetic"
    refs = web.set_index("sample_id")["ref"]
    rows["ref"] = ["bootstrap:" + sid if syn else refs[sid] for sid, syn in zip(rows["sample_id"], synthetic)]
    rows["captioner"], rows["filter"] = provenance["captioner"], provenance["filter"]
    rows["decoding"] = [provenance["decoding"] if syn else None for syn in synthetic]
    return rows[columns("bootstrapped")]


def variant_rows(kept: pd.DataFrame, removed: pd.DataFrame, variant: str) -> pd.DataFrame:
    """The `captioner` or `filter` corpus from the kept manifest and the (completed) removed rows."""
    if variant == "captioner":  # no filter: every web text and every synthetic caption with words
        rows = pd.concat([kept, removed[removed["reason"] != "empty_caption"].drop(columns="reason")],
                         ignore_index=True)
    elif variant == "filter":  # no captioner: the kept web texts only
        rows = kept[kept["source"] != "synthetic"]
    else:
        raise CapfiltError(f"unknown ablation variant {variant!r}; variants: {', '.join(VARIANTS)}")
    order = rows["source"].map(SOURCE_ORDER)
    return rows.assign(_o=order).sort_values(["_o", "sample_id"], kind="stable").drop(columns="_o") \
        .reset_index(drop=True)


def corpus_counts(table: pd.DataFrame) -> dict[str, int]:
    """Rows per source (human, web, synthetic), zeros included."""
    counts = table["source"].value_counts()
    return {s: int(counts.get(s, 0)) for s in SOURCE_ORDER}


def read_bootstrap(params: Params) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept manifest, removed rows in the bootstrapped schema + `reason`) of the bootstrap stage."""
    root = Path(params.bootstrap.out)
    kept = read_manifest(root / "manifest.parquet", "bootstrapped")
    try:
        removed = pd.read_parquet(root / "removed.parquet")
        provenance = json.loads((root / "metrics.json").read_text())
    except (OSError, ValueError) as exc:
        raise CapfiltError(f"{root}: bootstrap outputs unreadable ({exc}); run the bootstrap stage") from None
    web = read_manifest(Path(params.bootstrap.web_manifest), "ingested")
    full = removed_rows(removed, web, provenance).assign(reason=removed["reason"].to_numpy())
    return kept, full


def build_variant(params: Params, kept: pd.DataFrame, removed: pd.DataFrame, variant: str, out: Path) -> Path:
    """Write `out/manifest.parquet` (validated as bootstrapped) with its shards linked under `out/shards/`."""
    from components.bootstrap_merge import link_shards

    where = str(out / "manifest.parquet")
    table = validate(variant_rows(kept, removed, variant), "bootstrapped", where=where)
    validation = params.validation
    if variant == "filter":  # no synthetic rows by design
        validation = validation.model_copy(update={"min_synthetic_fraction": 0.0})
    require(run_expectations(table, "bootstrapped", validation, out / "expectations", f"ablation-{variant}"), where)
    cfg = params.bootstrap
    human = read_manifest(Path(cfg.human_manifest), "ingested")
    web = read_manifest(Path(cfg.web_manifest), "ingested")
    link_shards(out, {"human": (Path(cfg.human_manifest).parent,
                                sorted(human.loc[human["split"] == "train", "shard"].unique())),
                      "web": (Path(cfg.web_manifest).parent, sorted(web["shard"].unique()))})
    return write_manifest(table, out / "manifest.parquet", "bootstrapped")


def _train_variant(params: Params, variant: str, kept: pd.DataFrame, removed: pd.DataFrame) -> tuple[Path, Path]:
    root = Path(params.evaluate.ablation_out) / "variants" / variant
    boot = Path(params.bootstrap.out)
    inputs = [boot / "manifest.parquet", boot / "removed.parquet", Path(params.bootstrap.web_manifest),
              Path(params.bootstrap.human_manifest), Path(params.finetune.manifest), Path(params.retrain.tokenizer)]
    settings = {"variant": variant, **chain.sections(params, ("validation", *chain.TRAINING_SECTIONS))}
    work = chain.open_chain(params, root, Path(params.finetune.resume_dir) / "ablation" / variant, settings, inputs)
    manifest = work.root / "data" / "manifest.parquet"
    if not manifest.is_file():
        build_variant(params, kept, removed, variant, manifest.parent)
    return chain.train_chain(work, [manifest])


def run(params: Params) -> dict[str, Any]:
    """`capfilt stage ablation`: train and evaluate the captioner-only and filter-only corpora."""
    out = Path(params.evaluate.ablation_out)
    (out / "variants").mkdir(parents=True, exist_ok=True)  # the DVC output, even when empty
    if not params.evaluate.ablation:
        metrics: dict[str, Any] = {"enabled": False, "n_variants": 0}
        atomic.write_json(out / "metrics.json", metrics)
        return metrics
    from components import evaluate

    kept, removed = read_bootstrap(params)
    models = {v: _train_variant(params, v, kept, removed) for v in VARIANTS}
    web_rows = removed[removed["source"] == "web"]
    corpus = {"none": {**corpus_counts(kept[kept["source"] == "human"]),
                       "web": int((kept["source"] == "web").sum()) + len(web_rows)},
              **{v: corpus_counts(variant_rows(kept, removed, v)) for v in VARIANTS},
              "both": corpus_counts(kept)}
    metrics = {"enabled": True, "n_variants": len(VARIANTS),
               "variants": evaluate.evaluate_models(params.evaluate, models), "corpus": corpus}
    atomic.write_json(out / "metrics.json", metrics)
    return metrics
