"""How sure is a gain? Paired bootstrap intervals of round 2 minus round 1 on the test set.

Every test-set metric here is a ratio of per-image sums: attribute accuracy is objects' attributes
right over objects, strict accuracy and CIDEr are means over images, image→text R@k a mean over
images, text→image R@k texts found over texts. A `Tally` holds those per-image numerators and
denominators, so a resample of the test images (with replacement) re-computes a metric exactly
as the whole set does. Both rounds see the same resamples (paired): what varies between them is
only the models, so the interval of the gain is far narrower than the two rounds' own intervals.
The gallery of retrieval stays the whole test set (a resample draws queries, not candidates), and
CIDEr keeps the whole set's document frequencies. BLEU-4 is a corpus statistic (clipped n-gram
counts and a brevity penalty over the whole set), not a per-image mean: it gets no interval.

This measures test-set sampling only. Training the same round twice moves the scores too (README:
on the embedded corpus another training seed moves attribute accuracy by up to 0.06); an interval
that excludes 0 says the two models differ on this kind of image, not that every re-run of the
pipeline would. The draws stage measures re-training: `mean_interval` is the mean gain over
training seeds with a Student-t interval (each seed's pair of rounds taken as an independent draw).

`auroc`, the ranking statistic the bootstrap's filter check and the evaluation share, lives here too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from components.errors import CapfiltError


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney U with tied ranks averaged); NaN without both classes."""
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass
class Tally:
    """Per test image, for each metric: numerator and denominator (both (N,) arrays, one order)."""

    parts: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def add(self, name: str, numerator: np.ndarray, denominator: np.ndarray | None = None) -> None:
        num = np.asarray(numerator, dtype=np.float64)
        den = np.ones_like(num) if denominator is None else np.asarray(denominator, dtype=np.float64)
        if num.shape != den.shape or num.ndim != 1:
            raise ValueError(f"{name}: numerator {num.shape} and denominator {den.shape} must be equal 1-D")
        self.parts[name] = (num, den)

    def value(self, name: str) -> float:
        num, den = self.parts[name]
        return float(num.sum() / den.sum())


def _resampled(num: np.ndarray, den: np.ndarray, index: np.ndarray) -> np.ndarray:
    """(R,) metric values of the resamples index (R, N); an empty denominator gives NaN."""
    total = den[index].sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return num[index].sum(axis=1) / total


def paired_intervals(round1: Tally, round2: Tally, resamples: int, confidence: float,
                     seed: int = 0) -> dict[str, dict[str, float]]:
    """For each metric both tallies hold: the gain's percentile interval at `confidence` and the
    share of resamples in which round 2 scores higher ("above_zero"; ties count half)."""
    names = [n for n in round1.parts if n in round2.parts]
    if not names or resamples <= 0:
        return {}
    n = len(round1.parts[names[0]][0])
    for name in names:
        if len(round1.parts[name][0]) != n or len(round2.parts[name][0]) != n:
            raise CapfiltError(f"gain interval of {name}: the rounds were scored on different test sets")
    rng = np.random.default_rng(seed)
    index = rng.integers(0, n, size=(resamples, n))  # (R, N), shared by every metric and both rounds
    tail = (1.0 - confidence) / 2 * 100
    out = {}
    for name in names:
        gain = _resampled(*round2.parts[name], index) - _resampled(*round1.parts[name], index)  # (R,)
        gain = gain[np.isfinite(gain)]
        if not len(gain):
            continue
        low, high = np.percentile(gain, [tail, 100 - tail])
        above = float(((gain > 0).sum() + 0.5 * (gain == 0).sum()) / len(gain))
        out[name] = {"gain": round2.value(name) - round1.value(name), "low": float(low), "high": float(high),
                     "above_zero": above}
    return out


def mean_interval(values: Sequence[float], confidence: float) -> dict[str, float]:
    """Mean of independent draws (e.g. one gain per training seed) with its Student-t interval at
    `confidence`, the sample standard deviation, n and how many draws are above 0 ("up")."""
    from scipy import stats

    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) < 2 or not np.isfinite(x).all():
        raise CapfiltError(f"a mean's interval needs at least 2 finite values, got {list(values)}")
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, len(x) - 1)) * sd / math.sqrt(len(x))
    return {"mean": mean, "low": mean - half, "high": mean + half, "sd": sd, "n": len(x), "up": int((x > 0).sum())}
