"""Intervals and tests for per-question scores: every accuracy, CIDEr-D and "kept" figure skipit prints.

Two runs scored on the same questions (a plan and no plan, or two methods at matched FLOPs) are compared *paired*:
the bootstrap resamples questions, not runs, so the question-to-question spread that both runs share cancels out.
A loss is called significant by McNemar's exact test on the questions one run gets right and the other wrong.
All resampling is seeded: the same scores give the same interval.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

N_BOOTSTRAP = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    value: float  # the point estimate, on all questions
    low: float
    high: float
    level: float = LEVEL

    def to_dict(self) -> dict:
        return asdict(self)

    def __format__(self, spec: str) -> str:
        spec = spec or ".3f"
        return f"{self.value:{spec}} [{self.low:{spec}}, {self.high:{spec}}]"


def _resample_means(scores: np.ndarray, n_bootstrap: int, seed: int) -> np.ndarray:
    """Means of each row of `scores` [k, n] over the same bootstrap resamples of the n questions: [k, n_bootstrap]."""
    n = scores.shape[1]
    rng = np.random.default_rng(seed)
    means = np.empty((scores.shape[0], n_bootstrap))
    for start in range(0, n_bootstrap, 250):  # bounded memory: 250 resamples of n indices at a time
        idx = rng.integers(0, n, size=(min(250, n_bootstrap - start), n))
        means[:, start:start + idx.shape[0]] = scores[:, idx].mean(-1)
    return means


def _interval(value: float, samples: np.ndarray, level: float) -> Interval:
    samples = samples[np.isfinite(samples)]
    if not len(samples):
        return Interval(value, math.nan, math.nan, level)
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(value), float(low), float(high), level)


def _scores(*runs: Sequence[float]) -> np.ndarray:
    arr = np.asarray(runs, dtype=float)
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError("scores must be non-empty and of equal length (one per question)")
    return arr


def mean_interval(scores: Sequence[float], n_bootstrap: int = N_BOOTSTRAP, level: float = LEVEL,
                  seed: int = 0) -> Interval:  # fmt: skip
    """Mean score (accuracy, CIDEr-D) with a percentile bootstrap interval over questions."""
    arr = _scores(scores)
    return _interval(arr[0].mean(), _resample_means(arr, n_bootstrap, seed)[0], level)


@dataclass(frozen=True)
class Paired:
    """`run` against `reference` on the same questions."""

    reference: Interval
    run: Interval
    difference: Interval  # run - reference (accuracy points as a fraction: -0.02 is a 2-point loss)
    kept: Interval  # run / reference
    better: int  # questions run scores higher on
    worse: int  # questions run scores lower on
    mcnemar_p: float  # exact two-sided McNemar test of "no difference" (binary scores only; NaN otherwise)

    def loses_more_than(self, points: float, alpha: float = 0.05) -> bool:
        """A loss of more than `points` (a fraction: 0.02) that is significant (McNemar at `alpha`), not noise."""
        return -self.difference.value > points and self.mcnemar_p < alpha

    def to_dict(self) -> dict:
        return {**{k: getattr(self, k).to_dict() for k in ("reference", "run", "difference", "kept")},
                "better": self.better, "worse": self.worse, "mcnemar_p": self.mcnemar_p}  # fmt: skip


def paired(reference: Sequence[float], run: Sequence[float], n_bootstrap: int = N_BOOTSTRAP, level: float = LEVEL,
           seed: int = 0) -> Paired:  # fmt: skip
    """Paired bootstrap intervals (same resampled questions for both runs) and McNemar's exact test."""
    arr = _scores(reference, run)
    means = _resample_means(arr, n_bootstrap, seed)
    ref, out = arr.mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        kept_samples = means[1] / means[0]
    better, worse = int((arr[1] > arr[0]).sum()), int((arr[1] < arr[0]).sum())
    binary = bool(np.isin(arr, (0.0, 1.0)).all())
    return Paired(
        reference=_interval(ref, means[0], level),
        run=_interval(out, means[1], level),
        difference=_interval(out - ref, means[1] - means[0], level),
        kept=_interval(out / ref if ref else math.nan, kept_samples, level),
        better=better,
        worse=worse,
        mcnemar_p=mcnemar_exact(better, worse) if binary else math.nan,
    )


def mcnemar_exact(better: int, worse: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (a binomial test of better vs worse at 1/2)."""
    n = better + worse
    return 1.0 if n == 0 else float(stats.binomtest(better, n, 0.5).pvalue)


def mcnemar_sample_size(loss: float, discordant: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Questions needed for McNemar's test to detect a paired accuracy loss `loss` (0.02: 2 points) with `power`,
    when a share `discordant` of questions changes answer correctness between the runs (Connor, 1987)."""
    if not 0 < loss < discordant <= 1:
        raise ValueError("need 0 < loss < discordant share <= 1")
    za, zb = stats.norm.ppf(1 - alpha / 2), stats.norm.ppf(power)
    return math.ceil((za * math.sqrt(discordant) + zb * math.sqrt(discordant - loss**2)) ** 2 / loss**2)
