"""The training loop's small helpers: seeding, RNG capture for resume, timing and its output files.

RNG states are captured as plain tensors, numbers and lists so that a rank's state file loads
with `torch.load(weights_only=True)`. `RunClock` measures steps/s and samples/s over the steps a
process actually ran and peak memory; `write_metrics` and `write_loss_csv` write the DVC metrics
file and the loss plot atomically.
"""

from __future__ import annotations

import csv
import io
import json
import random
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from components import atomic


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as weights-only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Put back what `capture_rng` took."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


class RunClock:
    """Wall time of the steps this process ran; throughput leaves out the first step (allocator
    and data-loader warm-up) once there are more."""

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch
        self.start = time.perf_counter()
        self.first: float | None = None  # when the first step ended
        self.steps = 0

    def tick(self) -> None:
        self.steps += 1
        if self.first is None:
            self.first = time.perf_counter()

    def elapsed(self) -> float:
        return max(time.perf_counter() - self.start, 1e-9)

    def steps_per_s(self) -> float:
        if self.steps >= 2 and self.first is not None:
            return (self.steps - 1) / max(time.perf_counter() - self.first, 1e-9)
        return self.steps / self.elapsed()

    def samples_per_s(self) -> float:
        return self.steps_per_s() * self.global_batch

    def summary(self, last: dict[str, float], step: int, start_step: int) -> dict[str, float]:
        """The metrics.json content: final losses, speed and memory."""
        wall = self.elapsed()
        gpu = torch.cuda.max_memory_allocated() / 1024**2 if torch.cuda.is_available() else 0.0
        metrics = {f"final_{k}": float(v) for k, v in last.items()}
        metrics.update({
            "steps": float(step), "resumed_from_step": float(start_step), "wall_s": wall,
            "steps_per_s": self.steps_per_s(), "samples_per_s": self.samples_per_s(),
            "peak_rss_mb": peak_rss_mb(), "peak_gpu_mb": gpu,
        })
        return metrics


def write_metrics(path: Path, metrics: dict[str, float]) -> None:
    atomic.write_text(path, json.dumps({k: round(v, 6) for k, v in metrics.items()}, indent=2) + "\n")


def write_loss_csv(path: Path, rows: list[dict[str, float]]) -> None:
    """step, loss, the objective's parts (sorted), lr — one row per logged step."""
    parts = sorted({k for r in rows for k in r} - {"step", "loss", "lr"})
    header = ["step", "loss", *parts, "lr"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for r in rows:
        writer.writerow([int(r["step"])] + [f"{r.get(k, float('nan')):.6g}" for k in header[1:]])
    atomic.write_text(path, buf.getvalue())
