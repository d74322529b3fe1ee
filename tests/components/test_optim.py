"""Optimiser groups, learning-rate schedules and the DeepSpeed config built from params."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from components.config import ScheduleConfig, TrainConfig
from components.errors import CapfiltError
from components.optim import deepspeed_config, lr_at, param_groups, resolve_precision


class _Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.position_embeddings = nn.Embedding(5, 4)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.tied = nn.Linear(4, 4, bias=False)
        self.tied.weight = self.proj.weight


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_only_trainable_matrices_are_decayed():
    model = _Named()
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert _names(model, decay) == {"proj.weight"}  # tied copy appears once, frozen not at all
    assert _names(model, no_decay) == {"proj.bias", "LayerNorm.weight", "LayerNorm.bias", "pos_embed",
                                       "cls_token", "position_embeddings.weight", "temp"}


def test_cosine_schedule_warms_up_then_falls_to_min_lr():
    s = ScheduleConfig(steps=110, lr=1.0, warmup_steps=10, min_lr=0.1)
    assert lr_at(0, s) == pytest.approx(0.1) and lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(10, s) == pytest.approx(1.0)
    assert lr_at(60, s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, s) == pytest.approx(0.1) and lr_at(500, s) == pytest.approx(0.1)
    lrs = [lr_at(i, s) for i in range(10, 110)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_step_schedule_is_blips_epoch_decay():
    s = ScheduleConfig(steps=1000, lr=3e-4, kind="step", warmup_steps=0, min_lr=1e-6,
                       decay_rate=0.9, decay_every=100)
    assert lr_at(99, s) == pytest.approx(3e-4) and lr_at(100, s) == pytest.approx(2.7e-4)
    assert lr_at(950, s) == pytest.approx(3e-4 * 0.9**9)
    tiny = s.model_copy(update={"min_lr": 2e-4})
    assert lr_at(999, tiny) == pytest.approx(2e-4)


def test_deepspeed_config_follows_params():
    cfg = TrainConfig(micro_batch=16, grad_accum=4, zero_stage=2, grad_clip=0.5)
    ds = deepspeed_config(cfg, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["zero_optimization"] == {"stage": 2} and ds["bf16"] == {"enabled": True}
    assert ds["gradient_clipping"] == 0.5
    # fp32 without ZeRO: the loop clips (DeepSpeed's own clip fails on 0-dim params), DS must not.
    assert deepspeed_config(TrainConfig(grad_clip=0.5), "fp32")["gradient_clipping"] == 0.0
    assert deepspeed_config(TrainConfig(grad_clip=0.0, zero_stage=1), "fp32")["gradient_clipping"] == 0.0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choices")
def test_precision_is_detected_not_hard_coded():
    assert resolve_precision("auto") == "fp32"
    assert resolve_precision("bf16") == "bf16"
    with pytest.raises(CapfiltError, match="fp16 needs a GPU"):
        resolve_precision("fp16")
