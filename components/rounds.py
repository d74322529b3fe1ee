"""The rounds stage: more rounds of bootstrapping (`bootstrap.rounds` > 1), as BLIP suggests.

Round 1 is the pre-trained model's fine-tunes and round 2 the fine-tunes of the model re-trained
on the bootstrapped corpus (the pipeline's stages). For R = `bootstrap.rounds` > 1 this stage
runs rounds k = 3 .. R + 1: bootstrap the web corpus again with round k-1's fine-tuned captioner
and filter (round 2's are the finetune2 outputs), re-train a fresh model on it and fine-tune both,
through the same stage chain as the ablation (components/chain.py). Each round keeps its
artefacts under `<rounds_out>/extra/round<k>/{bootstrap, retrain, finetune/{captioner,filter}}`
and is evaluated on the test set like rounds 1 and 2; metrics.json holds each extra round's test
metrics, its bootstrap's kept fractions and, when the web ground truth is known, its filter's
quality. With R = 1 the stage only writes metrics.json = {"rounds": 1}.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from components import atomic, chain
from components.config import Params

# components.evaluate imports torch (~5 s): imported where used, so R = 1 starts in about a second.

log = logging.getLogger(__name__)

BOOTSTRAP_SUMMARY = ("web_kept_fraction", "synthetic_kept_fraction", "synthetic_fraction", "total_pairs",
                     "signal", "score_threshold")


def round_chain(params: Params, k: int, captioner: Path, filter_dir: Path) -> chain.Chain:
    """The chain of round k, bootstrapping with (captioner, filter_dir) of round k-1."""
    cfg = params.bootstrap
    settings = chain.sections(params, ("bootstrap", "validation", *chain.TRAINING_SECTIONS),
                              drop={"bootstrap": ("rounds", "rounds_out")})
    inputs = [captioner, filter_dir, Path(cfg.web_manifest), Path(cfg.human_manifest),
              Path(params.finetune.manifest), Path(params.retrain.tokenizer)]
    return chain.open_chain(params, Path(cfg.rounds_out) / "extra" / f"round{k}",
                            Path(params.finetune.resume_dir) / "rounds" / f"round{k}", settings, inputs)


def run(params: Params) -> dict[str, Any]:
    """`capfilt stage rounds`: rounds 3 .. bootstrap.rounds + 1, each trained and evaluated."""
    out = Path(params.bootstrap.rounds_out)
    (out / "extra").mkdir(parents=True, exist_ok=True)  # the DVC output, even when empty
    rounds = params.bootstrap.rounds
    if rounds == 1:
        metrics: dict[str, Any] = {"rounds": 1}
        atomic.write_json(out / "metrics.json", metrics)
        return metrics
    from components import evaluate

    captioner = Path(params.finetune.round2_out) / "captioner" / "model"
    filter_dir = Path(params.finetune.round2_out) / "filter" / "model"
    models, boot, quality = {}, {}, {}
    for k in range(3, rounds + 2):
        steps = round_chain(params, k, captioner, filter_dir)
        log.info("round %d: bootstrap with %s + %s, then retrain and fine-tune", k, captioner, filter_dir)
        manifest = chain.bootstrap_step(steps, captioner, filter_dir)
        captioner, filter_dir = chain.train_chain(steps, [manifest])
        name = f"round{k}"
        models[name] = (captioner, filter_dir)
        summary = json.loads((steps.bootstrap / "metrics.json").read_text())
        boot[name] = {key: summary.get(key) for key in BOOTSTRAP_SUMMARY}
        quality[name] = evaluate.bootstrap_quality(params.evaluate, steps.bootstrap)
    metrics = {"rounds": rounds, "test": evaluate.evaluate_models(params.evaluate, models), "bootstrap": boot}
    if all(q is not None for q in quality.values()):
        metrics["filter"] = quality
    atomic.write_json(out / "metrics.json", metrics)
    return metrics
