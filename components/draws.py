"""The draws stage: how much of round 2's gain is the training draw.

A pipeline run trains each round once, from one seed (`train.seed`: the initial weights, the order
of the batches, the ITM negatives, the fine-tunes' sampling). Training the same round again from
another seed moves its test scores — on the embedded corpus by more than the test-image interval
`evaluate` prints — so one run's gain is partly its draw. With `evaluate.draws: N` > 0 this stage
trains both rounds again at seeds `train.seed + 1 .. train.seed + N`, on the run's corpora:

- round 1: `pretrain` on `pretrain.manifests` (human + web), then both round-1 fine-tunes;
- round 2: `retrain` on `retrain.manifests` (the run's bootstrapped corpus, which is not
  bootstrapped again), then both round-2 fine-tunes;

and evaluates each pair of models on the test set. Each (seed, round) is a chain of stage
subprocesses (components/chain.py) under `<draws_out>/chains/seed<s>/round<r>/`, with every other
parameter the run's; a chain resumes, and starts afresh when its inputs, params or code changed.
metrics.json holds each draw's test metrics; `evaluate` pairs the rounds of each draw, adds the
run's own draw and reports the mean gain over draws with its interval. `draws: 0` (the default)
only writes metrics.json, so the stage costs nothing in a normal run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from components import atomic, chain
from components.config import Params

# components.evaluate imports torch (~5 s): imported where used, so the disabled stage (the default)
# starts in about a second.

log = logging.getLogger(__name__)


def draw_seeds(params: Params) -> list[int]:
    """The seeds of the extra draws: train.seed + 1 .. train.seed + evaluate.draws."""
    return [params.train.seed + i for i in range(1, params.evaluate.draws + 1)]


def draw_chain(params: Params, seed: int, round_: int) -> chain.Chain:
    """The chain that trains `round_` (1 or 2) at `seed`, every other parameter as given."""
    seeded = params.model_copy(update={"train": params.train.model_copy(update={"seed": seed})})
    first = seeded.pretrain if round_ == 1 else seeded.retrain  # round 1 never reads `retrain`, nor 2 `pretrain`
    inputs = [*map(Path, first.manifests), Path(first.tokenizer)]
    names = ("pretrain" if round_ == 1 else "retrain", "model", "train", "finetune", "validation")
    settings = {"round": round_, **chain.sections(seeded, names)}
    name = Path(f"seed{seed}") / f"round{round_}"
    return chain.open_chain(seeded, Path(params.evaluate.draws_out) / "chains" / name,
                            Path(params.finetune.resume_dir) / "draws" / name, settings,
                            [*inputs, Path(seeded.finetune.manifest)])


def train_draw(params: Params, seed: int) -> dict[str, tuple[Path, Path]]:
    """Both rounds trained at `seed`: {"round1": (captioner, filter), "round2": (captioner, filter)}."""
    log.info("draw seed %d: round 1 (pretrain + fine-tunes), then round 2 (retrain + fine-tunes)", seed)
    round1 = chain.pretrain_chain(draw_chain(params, seed, 1))
    round2 = chain.train_chain(draw_chain(params, seed, 2), [Path(m) for m in params.retrain.manifests])
    return {"round1": round1, "round2": round2}


def run(params: Params) -> dict[str, Any]:
    """`capfilt stage draws`: both rounds re-trained and tested at each extra seed."""
    out = Path(params.evaluate.draws_out)
    (out / "chains").mkdir(parents=True, exist_ok=True)  # the DVC output, even when empty
    seeds = draw_seeds(params)
    if not seeds:
        metrics: dict[str, Any] = {"enabled": False, "n_draws": 0, "seeds": []}
        atomic.write_json(out / "metrics.json", metrics)
        return metrics
    from components import evaluate

    models = {f"seed{s}/{r}": dirs for s in seeds for r, dirs in train_draw(params, s).items()}
    tested = evaluate.evaluate_models(params.evaluate, models)
    metrics = {"enabled": True, "n_draws": len(seeds), "run_seed": params.train.seed, "seeds": seeds,
               "draws": {f"seed{s}": {r: tested[f"seed{s}/{r}"] for r in ("round1", "round2")} for s in seeds}}
    atomic.write_json(out / "metrics.json", metrics)
    return metrics
