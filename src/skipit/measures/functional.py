"""Functional redundancy (framework measure 4), the parts that need no model: distances between two
next-token distributions given their logits, and the empirical Lipschitz bound of the theory.

The bound. The theory's predictor is h(x, y) = E[Z | X_l = x, X_{l-1} = y] (framework.md, measure 4).
Skipping layer l feeds X_{l-1} where X_l was expected, so the output moves from h(X_l, y) to
h(X_{l-1}, y). If h is Lipschitz with constant K along that move,
    E[d(Z_full, Z_skip)] <= K * E||X_l - X_{l-1}||,
and ||a - b||^2 = (|a| - |b|)^2 + 4 |a| |b| rho(a, b) ties the right side to geometric redundancy rho.
K is estimated empirically from pairs (output distance, hidden distance) measured along X_{l-1} - X_l
(each pair is one secant slope): K_hat = a quantile (default: max) of d_out / d_hidden. With the max the
bound holds in-sample by construction, so what it tells is how loose it is; a lower quantile gives a
robust constant whose bound can fail, which is the informative check. Use a metric for d_out: total
variation between the two next-token distributions (TV <= sqrt(KL / 2) by Pinsker).
"""

from __future__ import annotations

import numpy as np
import torch


def kl_from_logits(p_logits: torch.Tensor, q_logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """KL(P || Q) in nats between softmax(p_logits) and softmax(q_logits), in float64.

    log-softmax keeps it finite for any finite logits; -inf logits (masked tokens) are allowed where P is 0.
    """
    log_p = torch.log_softmax(p_logits.double(), dim=dim)
    log_q = torch.log_softmax(q_logits.double(), dim=dim)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim).clamp_min(0.0)


def tv_from_logits(p_logits: torch.Tensor, q_logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Total variation distance (in [0, 1]) between softmax(p_logits) and softmax(q_logits), in float64."""
    p = torch.softmax(p_logits.double(), dim=dim)
    q = torch.softmax(q_logits.double(), dim=dim)
    return 0.5 * (p - q).abs().sum(dim)


def hidden_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance ||a - b|| per row ([..., D]), in float64."""
    return (a.double() - b.double()).norm(dim=-1)


def hidden_distance_from_rho(norm_a, norm_b, rho):
    """||a - b|| from the norms and the normalised cosine distance: sqrt((|a| - |b|)^2 + 4 |a| |b| rho)."""
    return np.sqrt((np.asarray(norm_a) - norm_b) ** 2 + 4.0 * np.asarray(norm_a) * norm_b * rho)


def lipschitz_estimate(output_dist, hidden_dist, quantile: float = 1.0, min_hidden: float = 1e-12) -> float:
    """Quantile of the slopes d_out / d_hidden over pairs whose hidden distance exceeds min_hidden (NaN if none)."""
    d_out, d_hid = np.asarray(output_dist, dtype=np.float64), np.asarray(hidden_dist, dtype=np.float64)
    keep = d_hid > min_hidden
    return float(np.quantile(d_out[keep] / d_hid[keep], quantile)) if keep.any() else float("nan")


def lipschitz_bound(output_dist, hidden_dist, lipschitz: float | None = None, quantile: float = 1.0) -> dict:
    """The measured gap E[d_out] next to the bound K * E[d_hidden].

    Returns lipschitz (K, given or estimated at `quantile`), gap, bound, holds (gap <= bound),
    tightness (gap / bound, in [0, 1] when the bound holds) and n (pairs).
    """
    d_out, d_hid = np.asarray(output_dist, dtype=np.float64), np.asarray(hidden_dist, dtype=np.float64)
    k = lipschitz_estimate(d_out, d_hid, quantile) if lipschitz is None else float(lipschitz)
    gap, bound = float(d_out.mean()), float(k * d_hid.mean())
    tight = gap / bound if bound > 0 else float("nan")
    return {"lipschitz": k, "gap": gap, "bound": bound, "holds": bool(gap <= bound + 1e-12), "tightness": tight,
            "n": int(d_out.size)}
