"""Proximal redundancy (framework measure 2): the tail probability P(rho > delta) of the normalised
cosine distance, read from a fixed-bin histogram so any delta can be evaluated after the fact.

Bin convention (right-closed, so that a ">" tail is exact on bin edges): with n bins of width 1/n,
bin 0 holds [0, 1/n] and bin j >= 1 holds (j/n, (j+1)/n]. Hence for delta = j/n,
P(rho > delta) = (counts in bins j..n-1) / total, exactly. For delta strictly inside bin j the counts of
that bin are split linearly (values assumed uniform within the bin), so the error is at most that bin's mass.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def bin_index(rho: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Bin of each value of rho (in [0, 1]) under the right-closed convention above."""
    idx = torch.ceil(rho.double() * n_bins).long() - 1
    return idx.clamp(0, n_bins - 1)


def histogram(rho: torch.Tensor, n_bins: int) -> torch.Tensor:
    """int64 counts [n_bins] of the values of rho."""
    return torch.bincount(bin_index(rho.reshape(-1), n_bins), minlength=n_bins)


def tail_probability(hist: np.ndarray, delta: float) -> np.ndarray:
    """P(rho > delta) from histograms [..., n_bins]; NaN where a histogram is empty."""
    hist = np.asarray(hist, dtype=np.float64)
    n = hist.shape[-1]
    total = hist.sum(-1)
    pos = delta * n
    if abs(pos - round(pos)) < 1e-9:  # delta on a bin edge up to float error: use the exact edge
        pos = float(round(pos))
    if pos < 0:
        above = total
    elif pos >= n:
        above = np.zeros_like(total)
    else:
        j = math.floor(pos)
        above = hist[..., j + 1 :].sum(-1) + hist[..., j] * (1.0 - (pos - j))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, above / total, np.nan)
