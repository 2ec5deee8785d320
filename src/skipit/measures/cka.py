"""Similarity cross-checks (framework measure 6): linear CKA between X_{l-1} and X_l, and whether the
set of redundant layers changes when CKA or angular distance replaces the normalised cosine distance.

CKA is computed exactly on a sample of tokens (the stats' bottom-k sketch), not by minibatch averaging:
the sketch is the same whatever the batching or sharding, so the value merges exactly, and CKA on a
uniform token sample is a consistent estimate of the population CKA. The debiased HSIC estimator
(Song et al. 2012, as used by Nguyen et al. 2021) removes most of the finite-sample bias; the biased
(Kornblith et al. 2019) form is available too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch


def _hsic(k: torch.Tensor, g: torch.Tensor, debiased: bool) -> torch.Tensor:
    n = k.shape[0]
    if not debiased:  # Grams are centered by the caller: tr(KHLH) up to a factor that cancels in CKA
        return (k * g).sum()
    # Song et al.'s estimator uses the Grams with a zero diagonal: subtract the diagonal's share of each term
    dk, dg = k.diagonal(), g.diagonal()
    ck, cg = k.sum(0) - dk, g.sum(0) - dg
    trace = (k * g).sum() - (dk * dg).sum()
    term = trace + ck.sum() * cg.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (ck * cg).sum()
    return term / (n * (n - 3))


def cka_from_grams(k: torch.Tensor, g: torch.Tensor, debiased: bool = True) -> float:
    """Linear CKA from the centered Gram matrices [N, N] of two representations of the same N rows."""
    if debiased and k.shape[0] < 4:
        raise ValueError("debiased CKA needs at least 4 rows")
    k, g = k.double(), g.double()
    denom = torch.sqrt(_hsic(k, k, debiased) * _hsic(g, g, debiased))
    return float(_hsic(k, g, debiased) / denom) if denom > 0 else float("nan")


def linear_cka(x: torch.Tensor, y: torch.Tensor, debiased: bool = True) -> float:
    """Linear CKA between x [N, Dx] and y [N, Dy] (rows paired): 1 for equal representations, invariant to
    orthogonal transforms and isotropic scaling of either."""
    from skipit.measures.informational import centered_gram

    return cka_from_grams(centered_gram(x), centered_gram(y), debiased)


def _ranks(x: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - counts + (counts - 1) / 2.0)[inverse]


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation over the entries finite in both (ties get average ranks)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        return float("nan")
    ra, rb = _ranks(a[keep]), _ranks(b[keep])
    sa, sb = ra.std(), rb.std()
    return float(((ra - ra.mean()) * (rb - rb.mean())).mean() / (sa * sb)) if sa > 0 and sb > 0 else float("nan")


def select_redundant(distance: Sequence[float], threshold: float | None = None, top_k: int | None = None) -> list[int]:
    """Layers (indices into distance, 0-based) with distance < threshold, or the top_k lowest (ties: lower
    layer first); NaN never."""
    d = np.asarray(distance, dtype=np.float64)
    finite = np.flatnonzero(np.isfinite(d))
    if top_k is not None:
        chosen = finite[np.argsort(d[finite], kind="stable")[:top_k]]
    elif threshold is not None:
        chosen = finite[d[finite] < threshold]
    else:
        raise ValueError("give threshold or top_k")
    return sorted(int(i) for i in chosen)


def decision_stability(
    distances: Mapping[str, Sequence[float]],
    reference: str = "cosine",
    threshold: float | None = None,
    top_k: int | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> dict:
    """Does the set of redundant layers change when another distance replaces the reference?

    distances: per measure, one distance per layer (lower = more redundant; pass 1 - CKA for CKA).
    Ranking mode (top_k): every measure picks its top_k lowest layers. Threshold mode: the reference picks
    distance < threshold; another measure uses thresholds[name] when given, otherwise it picks as many layers
    as the reference did (thresholds on different scales are not comparable, rankings are).
    Returns reference, selected {name: layers}, and per other measure: jaccard, changed, added, removed, spearman.
    """
    ref = select_redundant(distances[reference], threshold=threshold, top_k=top_k)
    out: dict = {"reference": reference, "selected": {reference: ref}, "jaccard": {}, "changed": {}, "added": {},
                 "removed": {}, "spearman": {}}
    for name, dist in distances.items():
        if name == reference:
            continue
        if top_k is None and thresholds is not None and name in thresholds:
            chosen = select_redundant(dist, threshold=thresholds[name])
        else:
            chosen = select_redundant(dist, top_k=top_k if top_k is not None else len(ref))
        union = set(ref) | set(chosen)
        out["selected"][name] = chosen
        out["jaccard"][name] = len(set(ref) & set(chosen)) / len(union) if union else 1.0
        out["changed"][name] = set(chosen) != set(ref)
        out["added"][name] = sorted(set(chosen) - set(ref))
        out["removed"][name] = sorted(set(ref) - set(chosen))
        out["spearman"][name] = spearman(distances[reference], dist)
    return out
