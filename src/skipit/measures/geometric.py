"""Geometric redundancy (framework measure 1): how far layer l turns each token's hidden state.

All three distances are functions of the cosine between X_{l-1} and X_l of one token (computed in float64):
- normalised cosine distance rho = (1 - cos) / 2, in [0, 1] (0 = same direction, 0.5 = orthogonal, 1 = antipodal);
- Gromov et al.'s angular distance arccos(cos) / pi, in [0, 1];
- ShortGPT's Block Influence 1 - cos, in [0, 2] (= 2 rho).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def _unit(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x scaled to unit length (float64) and a mask of the zero rows (left at 0)."""
    u = x.double()
    norm = u.norm(dim=-1, keepdim=True)
    return u.div_(norm.clamp_min(1e-300)), norm[..., 0] == 0


def _pair(u: tuple[torch.Tensor, torch.Tensor], v: tuple[torch.Tensor, torch.Tensor]):
    """(rho, angular) from two _unit results: rho = |u - v|^2 / 4 = (1 - cos) / 2 and Kahan's angle
    2 atan2(|u - v|, |u + v|), both accurate near 0 and near pi, where 1 - cos and arccos(cos) lose digits."""
    diff, summ = (u[0] - v[0]).norm(dim=-1), (u[0] + v[0]).norm(dim=-1)
    one_zero = u[1] ^ v[1]  # zero against non-zero: orthogonal by convention; two zeros: identical
    rho = torch.where(one_zero, 0.5, (diff**2 / 4).clamp(0.0, 1.0))
    ang = torch.where(one_zero, 0.5, 2 * torch.atan2(diff, summ) / math.pi)
    return rho, ang


def distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(rho, angular distance) of the rows of a and b ([..., D] each), float64, on a's device.

    Two zero vectors count as identical (0, 0); a zero against a non-zero vector as orthogonal (0.5, 0.5);
    a non-finite row gives NaN. Rows are processed in chunks so the float64 copies stay small.
    """
    shape = a.shape[:-1]
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    out = [torch.empty(a.shape[0], dtype=torch.float64, device=a.device) for _ in range(2)]
    for i in range(0, a.shape[0], chunk):
        for o, r in zip(out, _pair(_unit(a[i : i + chunk]), _unit(b[i : i + chunk])), strict=True):
            o[i : i + chunk] = r
    return out[0].reshape(shape), out[1].reshape(shape)


def layer_distances(hidden_states, rows_b: torch.Tensor, rows_t: torch.Tensor, chunk: int = 4096):
    """(rho, angular), each [L, n] float64 on CPU, between X_{l-1} and X_l for the tokens (rows_b, rows_t) of
    hidden_states = [X_0..X_L] ([B, T, D] each). Each X_l is normalised once, a chunk of tokens at a time."""
    n_layers, n = len(hidden_states) - 1, len(rows_b)
    rho = torch.empty(n_layers, n, dtype=torch.float64)
    ang = torch.empty_like(rho)
    for i in range(0, n, chunk):
        b, t = rows_b[i : i + chunk], rows_t[i : i + chunk]
        prev = _unit(hidden_states[0][b, t])
        for layer in range(1, n_layers + 1):
            cur = _unit(hidden_states[layer][b, t])
            r, a = _pair(prev, cur)
            rho[layer - 1, i : i + chunk], ang[layer - 1, i : i + chunk] = r.cpu(), a.cpu()
            prev = cur
    return rho, ang


def normalised_cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """rho = (1 - cos) / 2 in [0, 1], float64."""
    return distances(a, b)[0]


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 1.0 - 2.0 * distances(a, b)[0]


def angular_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """arccos(cos) / pi in [0, 1], float64."""
    return distances(a, b)[1]


def block_influence(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - cos in [0, 2], float64."""
    return 2.0 * distances(a, b)[0]


def bootstrap_mean(sums: np.ndarray, counts: np.ndarray, level: float = 0.95) -> dict[str, np.ndarray]:
    """Mean and percentile bootstrap CI of a ratio estimator sum / count.

    sums, counts: [..., R + 1]; column 0 holds the plain (weight 1) totals, columns 1..R the totals under
    R bootstrap replicates (per-example Poisson(1) weights, see skipit.stats). The mean is over tokens
    pooled across examples; the resampling unit is the example. Entries with no tokens are NaN.
    """
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(counts > 0, sums / counts, np.nan)
    mean = ratio[..., 0]
    reps = ratio[..., 1:]
    if reps.shape[-1] == 0:
        return {"mean": mean, "ci_low": np.full_like(mean, np.nan), "ci_high": np.full_like(mean, np.nan)}
    alpha = (1.0 - level) / 2.0
    has = ~np.isnan(reps).all(-1)
    filled = np.where(has[..., None], reps, 0.0)  # nanquantile warns on all-NaN rows: fill, then mask back
    lo = np.where(has, np.nanquantile(filled, alpha, axis=-1), np.nan)
    hi = np.where(has, np.nanquantile(filled, 1.0 - alpha, axis=-1), np.nan)
    return {"mean": mean, "ci_low": lo, "ci_high": hi}
