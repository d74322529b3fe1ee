"""A toy model, objective and batch source for testing the training loop without BLIP.

Also runnable as a script (`python tests/components/toy_training.py OUT STEPS [SLEEP [MICRO [DROPOUT]]]`) so that
tests can kill a training process and restart it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from torch import nn

from components.config import ScheduleConfig, TrainConfig
from components.distributed import Gathers, rank_info


class Toy(nn.Module):
    """A two-layer regressor with a norm, a bias-only head and a temperature, plus dropout."""

    def __init__(self, gathers: Gathers | None = None, dropout: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(16, 1)
        self.temp = nn.Parameter(torch.tensor(0.07))
        self.register_buffer("queue", torch.randn(4))
        self.gathers = gathers

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 8) -> (B,)
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x))))).squeeze(-1)


def toy_objective(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], step: int):
    x, y = batch
    pred = model(x)
    mse = ((pred - y) ** 2).mean()
    return mse, {"mse": float(mse.detach())}


class ToyData:
    """A fixed regression set; epoch e is a seeded permutation, split into global batches, rank r
    taking its contiguous slice of each (so 2 ranks × B see what 1 rank × 2B sees)."""

    def __init__(self, n: int = 256, micro: int = 8, seed: int = 0, poison_at: int | None = None) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, generator=g) + 0.1 * torch.randn(n, generator=g)
        self.micro, self.seed, self.poison_at = micro, seed, poison_at

    def batches(self, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = rank_info()
        order = torch.randperm(len(self.x), generator=torch.Generator().manual_seed(self.seed + epoch))
        glob = self.micro * info.world_size
        for b in range(skip, len(order) // glob):
            idx = order[b * glob + info.rank * self.micro : b * glob + (info.rank + 1) * self.micro]
            y = self.y[idx].clone()
            if self.poison_at is not None and epoch == 0 and b == self.poison_at:
                y[0] = float("nan")
            yield self.x[idx], y


def toy_configs(steps: int = 20, **train: object) -> tuple[TrainConfig, ScheduleConfig]:
    base = {"micro_batch": 8, "checkpoint_every": 5, "log_every": 1, "threads": 1}
    cfg = TrainConfig(**{**base, **train})
    return cfg, ScheduleConfig(steps=steps, lr=0.01, warmup_steps=3, min_lr=0.0001)


class _Slow:
    def __init__(self, inner: ToyData, sleep: float) -> None:
        self.inner, self.sleep = inner, sleep

    def batches(self, epoch: int, skip: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in self.inner.batches(epoch, skip):
            time.sleep(self.sleep)
            yield b


def main(argv: list[str]) -> None:
    from components.train import run_training

    out, steps = Path(argv[0]), int(argv[1])
    sleep = float(argv[2]) if len(argv) > 2 else 0.0
    micro = int(argv[3]) if len(argv) > 3 else 8
    dropout = float(argv[4]) if len(argv) > 4 else 0.1
    cfg, schedule = toy_configs(steps, micro_batch=micro)
    data = _Slow(ToyData(micro=micro), sleep)
    result = run_training(cfg, schedule, partial(Toy, dropout=dropout), toy_objective, data, out)
    if result.rank == 0:
        torch.save(result.state_dict, out / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1:])
