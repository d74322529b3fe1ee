"""Paired bootstrap intervals of round 2 - round 1: exact on hand-made tallies, honest in coverage."""

from __future__ import annotations

import numpy as np
import pytest

from components.errors import CapfiltError
from components.significance import Tally, _resampled, paired_intervals


def _tally(**parts: np.ndarray | tuple[np.ndarray, np.ndarray]) -> Tally:
    t = Tally()
    for name, part in parts.items():
        t.add(name, *part) if isinstance(part, tuple) else t.add(name, part)
    return t


def test_a_resample_is_the_ratio_of_its_sums():
    num, den = np.array([1.0, 2.0, 0.0, 3.0]), np.array([1.0, 2.0, 3.0, 3.0])
    index = np.array([[0, 0, 3, 2], [1, 1, 1, 1]])
    got = _resampled(num, den, index)
    assert got == pytest.approx([(1 + 1 + 3 + 0) / (1 + 1 + 3 + 3), 1.0])
    assert _tally(a=(num, den)).value("a") == pytest.approx(6 / 9)


def test_the_same_models_tie_in_every_resample():
    x = np.random.default_rng(0).random(50)
    iv = paired_intervals(_tally(m=x), _tally(m=x.copy()), resamples=200, confidence=0.95)["m"]
    assert iv == {"gain": 0.0, "low": 0.0, "high": 0.0, "above_zero": 0.5}


def test_a_gain_on_every_image_is_certain_and_an_interval_brackets_its_gain():
    r1, r2 = np.zeros(40), np.ones(40)
    iv = paired_intervals(_tally(m=r1), _tally(m=r2), resamples=100, confidence=0.9)["m"]
    assert iv["low"] == iv["high"] == iv["gain"] == 1.0 and iv["above_zero"] == 1.0
    rng = np.random.default_rng(3)
    a, b = rng.random(60), rng.random(60) + 0.1
    iv = paired_intervals(_tally(m=a), _tally(m=b), resamples=500, confidence=0.95)["m"]
    assert iv["low"] < iv["gain"] < iv["high"] and iv["gain"] == pytest.approx(b.mean() - a.mean())


def test_only_metrics_both_rounds_have_and_none_without_resamples():
    x = np.ones(5)
    assert set(paired_intervals(_tally(a=x, b=x), _tally(a=x), 10, 0.95)) == {"a"}
    assert paired_intervals(_tally(a=x), _tally(a=x), 0, 0.95) == {}
    with pytest.raises(CapfiltError, match="different test sets"):
        paired_intervals(_tally(a=x), _tally(a=np.ones(6)), 10, 0.95)
    with pytest.raises(ValueError, match="must be equal"):
        Tally().add("a", np.ones(3), np.ones(4))


def test_pairing_narrows_the_interval_when_the_rounds_agree_on_hard_images():
    rng = np.random.default_rng(5)
    hard = rng.random(300) < 0.3  # images both rounds miss
    r1 = (~hard).astype(float)
    r2 = r1.copy()
    r2[np.flatnonzero(hard)[:6]] = 1.0  # round 2 gets 6 more right: +0.02
    iv = paired_intervals(_tally(m=r1), _tally(m=r2), 1000, 0.95)["m"]
    assert iv["gain"] == pytest.approx(0.02) and iv["low"] > 0.0  # unpaired, ±0.07 would swallow it


def test_intervals_cover_a_null_gain_about_as_often_as_they_claim():
    rng = np.random.default_rng(11)
    covered = 0
    trials = 200
    for _ in range(trials):  # two models equally good (p = 0.7), errors on different images
        r1, r2 = (rng.random(150) < 0.7).astype(float), (rng.random(150) < 0.7).astype(float)
        iv = paired_intervals(_tally(m=r1), _tally(m=r2), 400, 0.9, seed=int(rng.integers(1 << 30)))["m"]
        covered += iv["low"] <= 0.0 <= iv["high"]
    assert 0.84 <= covered / trials <= 0.96  # 90% claimed
