"""The training stages: pretrain, the captioner and filter fine-tunes (two rounds), retrain.

Each stage only wires: it reads its params section, loads the validated manifests and the
tokenizer, builds the model (a fresh `BlipPretrain`, or a `BlipCaptioner` / `BlipFilter` from an
exported pre-trained model), picks its objective from `OBJECTIVES`, and calls the one loop
(`components.train.run_training`). Rank 0 then exports `<out>/model/` (config.json +
model.safetensors + tokenizer.json) next to the loop's `metrics.json` and `loss.csv`. The
objectives differ only in which loss parts they return: pretrain ITC+ITM+LM, captioner LM,
filter ITC+ITM; the ITC distillation weight ramps up over `alpha_ramp_steps`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from components import checkpoints as ckpt
from components.config import (AugmentConfig, LossWeights, Params, PretrainConfig, ScheduleConfig,
                               TextAugmentConfig, TextInput)
from components.data import Batch, ManifestBatches, load_pairs
from components.distributed import Gathers, rank_info
from components.errors import CapfiltError
from components.tokenizer import TOKENIZER_FILE, load_tokenizer
from components.train import LogMetrics, Objective, TrainResult, run_training
from models.blip import BlipCaptioner, BlipFilter, BlipPretrain
from models.config import BlipConfig, from_dict, resolve_config, to_dict
from models.losses import alpha_ramp

log = logging.getLogger(__name__)

SPECIAL_IDS = {"pad_token_id": "[PAD]", "cls_token_id": "[CLS]", "sep_token_id": "[SEP]",
               "bos_token_id": "[DEC]", "enc_token_id": "[ENC]"}


def _parts(out: Any, names: tuple[str, ...]) -> dict[str, float]:
    return {name.removeprefix("loss_"): float(getattr(out, name).detach()) for name in names}


def _negatives(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The batch's word-swap ITM negatives as the models take them, or None."""
    if batch.negative_ids is None:
        return None
    return batch.negative_ids, batch.negative_mask, batch.has_negative


def pretrain_objective(alpha: float, ramp_steps: int, image_positives: bool = False,
                       weights: LossWeights = LossWeights()) -> Objective:
    """ITC + ITM + LM (BlipPretrain), summed with `weights`; captions of one image are never each
    other's ITM negatives (and, with `image_positives`, are each other's ITC positives); the
    batch's word-swap negatives join ITM when it has them."""
    def objective(model: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch.image, batch.input_ids, batch.attention_mask,
                    alpha=alpha_ramp(step, ramp_steps, alpha), image_ids=batch.image_ids,
                    negatives=_negatives(batch), image_positives=image_positives)
        loss = weights.itc * out.loss_itc + weights.itm * out.loss_itm + weights.lm * out.loss_lm
        return loss, _parts(out, ("loss_itc", "loss_itm", "loss_lm", "itm_accuracy"))
    return objective


def captioner_objective(alpha: float, ramp_steps: int) -> Objective:
    """LM on prompted captions; the prompt's tokens are not predicted."""
    def objective(model: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch.image, batch.input_ids, batch.attention_mask, prompt_length=batch.prompt_length)
        return out.loss, _parts(out, ("loss_lm",))
    return objective


def filter_objective(alpha: float, ramp_steps: int) -> Objective:
    """ITC + ITM with image-id positives (every caption of an image), plus the batch's word-swap
    ITM negatives when it has them."""
    def objective(model: nn.Module, batch: Batch, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        out = model(batch.image, batch.input_ids, batch.attention_mask, batch.image_ids,
                    alpha=alpha_ramp(step, ramp_steps, alpha), negatives=_negatives(batch))
        return out.loss, _parts(out, ("loss_itc", "loss_itm", "itm_accuracy"))
    return objective


# task -> (model class, objective); one literal table, next to its use in `_train`.
TASKS: dict[str, tuple[type[nn.Module], Callable[[float, int], Objective]]] = {
    "pretrain": (BlipPretrain, pretrain_objective),
    "captioner": (BlipCaptioner, captioner_objective),
    "filter": (BlipFilter, filter_objective),
}


@dataclass(frozen=True)
class StageInputs:
    """What one training stage needs besides the shared `train` section."""

    task: str  # a key of TASKS
    manifests: list[str]
    tokenizer_dir: Path
    out: Path
    resume_dir: Path
    schedule: ScheduleConfig
    text: TextInput
    augment: AugmentConfig
    alpha_ramp_steps: int = 0
    text_augment: TextAugmentConfig = TextAugmentConfig()
    prompt: str = ""
    init: Path | None = None  # an exported BlipPretrain directory; None = random init
    negative_manifests: tuple[str, ...] = ()  # corpus-negative texts; () = the stage's own captions
    itc_positives: Literal["diagonal", "image"] = "diagonal"  # pretrain only (PretrainConfig)
    loss_weights: LossWeights = LossWeights()  # pretrain only (PretrainConfig)


def model_config(params: Params, tokenizer: Any) -> BlipConfig:
    """The preset with overrides, its vocabulary and special ids taken from the tokenizer."""
    ids = {f"text.{k}": tokenizer.token_to_id(tok) for k, tok in SPECIAL_IDS.items()}
    missing = [tok for k, tok in SPECIAL_IDS.items() if ids[f"text.{k}"] is None]
    if missing:
        raise CapfiltError(f"tokenizer lacks the special tokens {', '.join(missing)}")
    overrides = {"text.vocab_size": tokenizer.get_vocab_size(), **ids, **params.model.overrides}
    try:
        return resolve_config(params.model.preset, overrides)
    except ValueError as exc:
        raise CapfiltError(f"model.overrides: {exc}") from None


def _file_digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for path in paths:
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def _inject(model: nn.Module, gathers: Gathers) -> nn.Module:
    if hasattr(model, "gather"):
        model.gather = gathers.no_grad
        model.gather_with_grad = gathers.with_grad
    return model


def _builder(task: str, config: BlipConfig, init: Path | None) -> Callable[[Gathers], nn.Module]:
    cls = TASKS[task][0]

    def build(gathers: Gathers) -> nn.Module:
        if init is None:
            return _inject(cls(config), gathers)
        state = ckpt.read_state_dict(init)
        try:
            return _inject(cls.from_pretrain_state_dict(config, state), gathers)
        except ValueError as exc:
            raise CapfiltError(f"{init}: cannot initialise a {cls.__name__}: {exc}") from None
    return build


def _check_batch(params: Params, config: BlipConfig, task: str) -> None:
    if task == "captioner":
        return
    world = max(params.train.processes, rank_info().world_size)
    global_batch = params.train.micro_batch * world
    if config.queue_size % global_batch:
        raise CapfiltError(f"model queue_size {config.queue_size} is not a multiple of the global "
                           f"batch {global_batch} (train.micro_batch × ranks); change one of them")


def train_stage(params: Params, inputs: StageInputs, log_metrics: LogMetrics | None = None) -> TrainResult:
    """Run one training stage end to end; rank 0 exports `<out>/model`."""
    tokenizer = load_tokenizer(inputs.tokenizer_dir)
    if inputs.init is not None:
        config = from_dict(ckpt.read_model_config(inputs.init))
    else:
        config = model_config(params, tokenizer)
    _check_batch(params, config, inputs.task)
    info = rank_info()
    pairs = load_pairs(inputs.manifests)
    pool = None
    if inputs.text_augment.corpus_negative > 0 and inputs.negative_manifests:
        pool = load_pairs(inputs.negative_manifests).caption
        log.info("%s: %d corpus texts for ITM negatives", inputs.task, len(pool))
    data = ManifestBatches(pairs, tokenizer, inputs.text, inputs.augment, config.vision.image_size,
                           params.train.micro_batch, info.rank, info.world_size, params.train.seed,
                           params.train.shuffle_buffer, params.train.num_workers, inputs.prompt,
                           inputs.text_augment, pool)
    log.info("%s: %d training pairs, %d images, %d batches per epoch per rank", inputs.task,
             len(pairs), int(pairs.image_id.max()) + 1, data.batches_per_epoch())
    sources = [Path(m) for m in inputs.manifests] + [inputs.tokenizer_dir / TOKENIZER_FILE]
    if pool is not None:
        sources += [Path(m) for m in inputs.negative_manifests]
    if inputs.init is not None:
        sources.append(inputs.init / "model.safetensors")
    what = {"task": inputs.task, "model": to_dict(config), "text": inputs.text.model_dump(),
            "augment": inputs.augment.model_dump(), "prompt": inputs.prompt,
            "text_augment": inputs.text_augment.model_dump(),
            "ramp": inputs.alpha_ramp_steps, "itc_positives": inputs.itc_positives,
            "data": _file_digest(sources)}
    if inputs.loss_weights != LossWeights():  # BLIP's weights keep earlier runs' fingerprints
        what["loss_weights"] = inputs.loss_weights.model_dump()
    extra = json.dumps(what, sort_keys=True)

    if inputs.task == "pretrain":
        objective = pretrain_objective(config.alpha, inputs.alpha_ramp_steps, inputs.itc_positives == "image",
                                       inputs.loss_weights)
    else:
        objective = TASKS[inputs.task][1](config.alpha, inputs.alpha_ramp_steps)
    result = run_training(params.train, inputs.schedule, _builder(inputs.task, config, inputs.init),
                          objective, data, inputs.out, log_metrics, resume_dir=inputs.resume_dir,
                          fingerprint=extra)
    if result.rank == 0:
        ckpt.save_model_dir(inputs.out / "model", result.module, to_dict(config), inputs.tokenizer_dir,
                            state_dict=result.state_dict)
        ckpt.clear_resume_dir(inputs.resume_dir)
        log.info("%s: exported %s (final loss %.4f)", inputs.task, inputs.out / "model", result.final_loss)
    return result


def _pretrain_inputs(cfg: PretrainConfig) -> StageInputs:
    return StageInputs(task="pretrain", manifests=list(cfg.manifests), tokenizer_dir=Path(cfg.tokenizer),
                       out=Path(cfg.out), resume_dir=Path(cfg.resume_dir), schedule=cfg.schedule,
                       text=cfg.text, augment=cfg.augment, alpha_ramp_steps=cfg.alpha_ramp_steps,
                       text_augment=cfg.text_augment, itc_positives=cfg.itc_positives,
                       loss_weights=cfg.loss_weights)


def run_pretrain(params: Params, log_metrics: LogMetrics | None = None) -> TrainResult:
    """`capfilt stage pretrain`: a fresh model on the human + web manifests."""
    return train_stage(params, _pretrain_inputs(params.pretrain), log_metrics)


def run_retrain(params: Params, log_metrics: LogMetrics | None = None) -> TrainResult:
    """`capfilt stage retrain`: a fresh model on the bootstrapped (or any ingested) manifest."""
    return train_stage(params, _pretrain_inputs(params.retrain), log_metrics)


def run_finetune(params: Params, task: str, round_: int,
                 log_metrics: LogMetrics | None = None) -> TrainResult:
    """`capfilt stage finetune[2]-{captioner,filter}`: a fine-tune of round 1 or 2."""
    cfg = params.finetune
    init = Path(cfg.round1_init if round_ == 1 else cfg.round2_init)
    out = Path(cfg.round1_out if round_ == 1 else cfg.round2_out) / task
    tune = cfg.captioner if task == "captioner" else cfg.filter
    if not (init / "config.json").is_file():
        raise CapfiltError(f"{init}: no exported model; run the "
                           f"{'pretrain' if round_ == 1 else 'retrain'} stage first")
    return train_stage(params, StageInputs(
        task=task, manifests=[cfg.manifest], tokenizer_dir=init, out=out,
        resume_dir=Path(cfg.resume_dir) / f"finetune{round_}-{task}", schedule=tune.schedule,
        text=tune.text, augment=tune.augment, init=init,
        alpha_ramp_steps=getattr(tune, "alpha_ramp_steps", 0), prompt=getattr(tune, "prompt", ""),
        text_augment=getattr(tune, "text_augment", TextAugmentConfig()),
        negative_manifests=tuple(getattr(tune, "negative_manifests", ()))),
        log_metrics)
