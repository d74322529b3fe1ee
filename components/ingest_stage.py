"""The `ingest` pipeline stage: each source of `params.ingest.sources` → `outputs/ingest/<name>/`.

Each source is ingested by components/ingest.py into its own folder (manifest, rejects, shards,
summary); before a folder is published its manifest passes the Great Expectations suite
(`expectations.json` and `data_docs/` land next to it), and a failed expectation stops the stage
with the readable summary and publishes nothing for that source. Then a WordPiece tokenizer is
trained on the captions of every `split: train` source (`tokenizer/tokenizer.json`), and
`metrics.json` (small, for `dvc metrics`) sums up the counts. This is what `capfilt stage ingest`
and the DVC stage of the same name run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd

from components import expectations, ingest, schemas
from components import atomic
from components.config import IngestConfig, IngestSource, ValidationConfig
from components.formats import SourceSpec
from components.tokenizer import save_tokenizer, train_tokenizer

log = logging.getLogger(__name__)

METRICS = "metrics.json"
TOKENIZER_DIR = "tokenizer"


def source_spec(src: IngestSource) -> SourceSpec:
    """The reader's view of a params source."""
    return SourceSpec(
        path=src.path,
        format=src.format,
        image_root=src.image_root,
        image_column=src.image_column,
        caption_column=src.caption_column,
    )


def _gx_check(name: str, validation: ValidationConfig) -> ingest.Check:
    def check(manifest: pd.DataFrame, rejects: pd.DataFrame, build: Path) -> None:
        report = expectations.run_expectations(
            manifest, "ingested", validation, build, f"ingest_{name}"
        )
        expectations.require(report, f"ingest {name}")

    return check


def training_captions(root: Path, cfg: IngestConfig) -> list[str]:
    """The captions of every `split: train` source, read back through the schema."""
    captions: list[str] = []
    for name, src in cfg.sources.items():
        if src.split == "train":
            df = schemas.read_manifest(root / name / ingest.MANIFEST, "ingested")
            captions.extend(df["caption"].tolist())
    return captions


def run(cfg: IngestConfig, validation: ValidationConfig) -> dict[str, Any]:
    """Run the stage; return the metrics it writes to `<out>/metrics.json`."""
    root = Path(cfg.out)
    root.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {}
    for name, src in cfg.sources.items():
        log.info("ingest %s: %s (%s)", name, src.path, src.format)
        summary = ingest.run([source_spec(src)], root / name, cfg, src.kind, src.split,
                             check=_gx_check(name, validation))  # fmt: skip
        metrics[name] = {
            "read": summary.read,
            "accepted": summary.accepted,
            "rejected": sum(summary.rejected.values()),
            "images": summary.images_stored,
            "seconds": summary.seconds,
        }
    captions = training_captions(root, cfg)
    tok = train_tokenizer(captions, cfg.tokenizer)
    path = save_tokenizer(tok, root / TOKENIZER_DIR)
    metrics["tokenizer"] = {"vocab_size": tok.get_vocab_size(), "captions": len(captions)}
    log.info("tokenizer: %d tokens from %d captions -> %s", tok.get_vocab_size(), len(captions),
             path)  # fmt: skip
    atomic.write_json(root / METRICS, metrics, sort_keys=True)
    return metrics
