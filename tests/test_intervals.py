"""Intervals and paired tests on scores whose answer is known."""

import math

import numpy as np
import pytest
from scipy import stats

from skipit.intervals import mcnemar_exact, mcnemar_sample_size, mean_interval, paired


def test_mean_interval_matches_the_normal_approximation_for_a_large_sample():
    rng = np.random.default_rng(1)
    scores = (rng.random(4000) < 0.7).astype(float)
    ci = mean_interval(scores)
    se = math.sqrt(ci.value * (1 - ci.value) / len(scores))
    assert ci.low < ci.value < ci.high
    assert ci.low == pytest.approx(ci.value - 1.96 * se, abs=0.004)
    assert ci.high == pytest.approx(ci.value + 1.96 * se, abs=0.004)
    assert mean_interval(scores) == ci  # seeded: the same scores give the same interval


def test_paired_interval_is_narrower_than_unpaired_when_runs_agree_mostly():
    rng = np.random.default_rng(2)
    ref = (rng.random(600) < 0.6).astype(float)
    run = ref.copy()
    flip = rng.choice(600, 12, replace=False)
    run[flip[:9]], run[flip[9:]] = 0.0, 1.0  # toggle 12 answers: at most 9 lost, at most 3 won
    result = paired(ref, run)
    width = result.difference.high - result.difference.low
    unpaired = mean_interval(ref)
    assert width < (unpaired.high - unpaired.low) / 3  # what both runs share cancels out
    assert result.difference.value == pytest.approx(run.mean() - ref.mean())
    assert result.kept.value == pytest.approx(run.mean() / ref.mean())
    assert result.better == int((run > ref).sum()) and result.worse == int((run < ref).sum())


def test_mcnemar_exact_equals_a_binomial_test_of_discordant_pairs():
    assert mcnemar_exact(2, 10) == pytest.approx(stats.binomtest(2, 12, 0.5).pvalue)
    assert mcnemar_exact(2, 10) == pytest.approx(0.03857, abs=1e-5)  # 2 * P(X <= 2), X ~ Bin(12, 1/2)
    assert mcnemar_exact(0, 0) == 1.0


def test_loses_more_than_needs_both_size_and_significance():
    ref = np.ones(100)
    small = ref.copy()
    small[:3] = 0  # 3 points lost, 3 discordant pairs: p = 0.25, noise
    assert not paired(ref, small).loses_more_than(0.02)
    big = ref.copy()
    big[:10] = 0  # 10 points lost, p = 0.002
    assert paired(ref, big).loses_more_than(0.02)
    assert not paired(ref, big).loses_more_than(0.12)  # significant, but not more than 12 points
    assert math.isnan(paired(ref * 0.5, big * 0.7).mcnemar_p)  # not right/wrong scores: no McNemar


def test_sample_size_for_a_two_point_loss():
    n = mcnemar_sample_size(0.02, 0.06)
    assert 1100 < n < 1250  # (1.96 sqrt(.06) + 0.84 sqrt(.0596))^2 / .02^2 = 1172
    # check by simulation: at that n, the exact test finds a 2-point loss 70-80 % of the time (the formula is for
    # the asymptotic test; the exact one is slightly conservative)
    rng = np.random.default_rng(3)
    hits = 0
    for _ in range(300):
        d = rng.random(n)
        worse, better = int((d < 0.04).sum()), int(((d >= 0.04) & (d < 0.06)).sum())  # 4 % lost, 2 % won
        hits += mcnemar_exact(better, worse) < 0.05
    assert 0.65 < hits / 300 < 0.9
