"""Optimiser, learning-rate schedule and DeepSpeed config for the one training loop.

Everything here is a pure function of the typed params: the AdamW parameter groups (weight decay
on matrices only: biases, norms, other 1-d parameters, position/cls embeddings and the ITC
temperature are not decayed), the learning rate at a step (linear warm-up then cosine, or BLIP's
step decay), the precision the device supports, and the DeepSpeed config dict. Keeping them apart
from the loop lets unit tests check them on a toy module without starting DeepSpeed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from components.config import ScheduleConfig, TrainConfig
from components.errors import CapfiltError

# Parameter names (or name parts) that are never weight-decayed besides biases and 1-d params.
_NO_DECAY_PARTS = ("norm", "pos_embed", "position_embedding", "cls_token", "temp")


def _decays(name: str, param: nn.Parameter) -> bool:
    if param.ndim < 2 or name.endswith(".bias") or name == "bias":
        return False
    return not any(part in name.lower() for part in _NO_DECAY_PARTS)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters: decayed matrices, and everything else.

    Tied parameters appear once (`named_parameters` de-duplicates them).
    """
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue  # momentum copies and frozen parts
        (decay if _decays(name, param) else no_decay).append(param)
    if not decay and not no_decay:
        raise CapfiltError("the model has no trainable parameters")
    groups = [{"params": decay, "weight_decay": weight_decay}]
    return groups + [{"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, schedule: ScheduleConfig) -> torch.optim.AdamW:
    """torch AdamW over `param_groups` (passing our own optimiser keeps DeepSpeed from JIT-building
    FusedAdam). torch's fused kernel (CPU and GPU) updates every tensor in one pass: 1.7 ms instead
    of 6.1 ms a step for the tiny preset, the same update up to rounding."""
    groups = [g for g in param_groups(model, cfg.weight_decay) if g["params"]]
    return torch.optim.AdamW(groups, lr=schedule.lr, betas=(0.9, 0.999), eps=1e-8, fused=True)


def lr_at(step: int, schedule: ScheduleConfig) -> float:
    """The learning rate for optimizer step `step` (0-based).

    Warm-up rises linearly from lr/warmup to lr over `warmup_steps`. Then `cosine` falls to
    `min_lr` at `steps`, and `step` multiplies by `decay_rate` every `decay_every` steps
    (BLIP's per-epoch decay), never below `min_lr`.
    """
    peak, warm = schedule.lr, schedule.warmup_steps
    if step < warm:
        return peak * (step + 1) / warm
    if schedule.kind == "step":
        return max(schedule.min_lr, peak * schedule.decay_rate ** (step // schedule.decay_every))
    span = max(1, schedule.steps - warm)
    progress = min(1.0, (step - warm) / span)
    return schedule.min_lr + (peak - schedule.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: ScheduleConfig
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_at` (its state goes into DeepSpeed's checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_at(step, schedule) / schedule.lr
    )


def resolve_precision(requested: str) -> str:
    """`auto` → bf16 on a GPU that supports it, fp16 on an older GPU, fp32 elsewhere."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if requested == "fp16" and not cuda:
        raise CapfiltError("train.precision: fp16 needs a GPU; use auto, fp32 or bf16 on CPU")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise CapfiltError("train.precision: this GPU has no bf16; use auto, fp16 or fp32")
    return requested


def loop_clips(cfg: TrainConfig, precision: str) -> bool:
    """True when the loop, not DeepSpeed, clips gradients: fp32 without ZeRO, where DeepSpeed
    0.19's own clipping fails on 0-dim parameters (BLIP's temperature). Elsewhere DeepSpeed clips
    inside its (flattening) optimiser wrappers."""
    return cfg.grad_clip > 0 and cfg.zero_stage == 0 and precision == "fp32"


def deepspeed_config(cfg: TrainConfig, precision: str) -> dict[str, Any]:
    """The DeepSpeed config for these params (the optimiser and scheduler are passed as objects)."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "zero_optimization": {"stage": cfg.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW under ZeRO 1-3
        "steps_per_print": 10**9,  # our loop logs; DeepSpeed's own step lines are noise
        "wall_clock_breakdown": False,
    }
    # DeepSpeed's default is 1.0, so "off" (or "the loop clips") must be said explicitly.
    config["gradient_clipping"] = 0.0 if loop_clips(cfg, precision) else cfg.grad_clip
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config
