"""Informational redundancy (framework measure 3): H(X_l | X_{l-1}), small when layer l adds little.

Hidden states are continuous, so the discretisation is explicit and reported:
1. project each layer's states on its own top-k principal directions (fit on the calibration sample);
2. quantise the k-dim scores into K codes (k-means, or equal-width bins per direction); the k-means is built to
   give the same codes when batching moves the states by float noise (kmeans_codes);
3. plug-in entropies with the Miller-Madow correction (H + (m - 1) / 2N, m = occupied cells;
   Miller 1955), H(C_l | C_{l-1}) = H(C_l, C_{l-1}) - H(C_{l-1});
4. score = H(C_l | C_{l-1}) / H(C_l), clipped to [0, 1] (0: X_l is a function of X_{l-1}; 1: independent);
5. bootstrap CI from per-example Poisson weights, with the projection and codebook held fixed. Resampling
   shrinks the number of distinct tokens, which biases plug-in entropies down, so the percentile interval is
   recentred on the estimate (its width comes from the bootstrap, its centre from the full sample) and the
   bootstrap bias is reported beside it.
A Gaussian (log-det) conditional entropy on the same k-dim scores is the continuous cross-check; being a
differential entropy it moves with the scale of the states, so compare layers with the Gaussian mutual
information I(X_l; X_{l-1}) = h(X_l) - h(X_l | X_{l-1}), which does not. Entropies are in nats.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch


def centered_gram(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix [N, N] (float64) of the rows of x [N, D] after removing their mean."""
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    return x @ x.T


def pca_scores(x: torch.Tensor, k: int, seed: int = 0, oversample: int = 10, n_iter: int = 4) -> np.ndarray:
    """Scores [N, k] (float64) of the rows of x [N, D] on their top-k principal directions (rows centered).

    Randomized range finder with power iterations (Halko, Martinsson & Tropp 2011) and a seeded generator:
    O(N D (k + oversample)) per iteration instead of a full decomposition; an exact SVD when k + oversample
    covers the smaller side of x. Each direction's sign makes its largest |score| positive: an SVD's signs are
    arbitrary, and float noise in x (a different batching) may flip them.
    """
    x = x.double()
    x = x - x.mean(0, keepdim=True)
    n, d = x.shape
    k = min(k, n, d)
    q = k + oversample
    if q >= min(n, d):
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        return _sign_fixed((u[:, :k] * s[:k]).numpy())
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(x @ torch.randn(d, q, generator=g, dtype=torch.float64)).Q
    for _ in range(n_iter):
        basis = torch.linalg.qr(x @ torch.linalg.qr(x.T @ basis).Q).Q
    u, s, _ = torch.linalg.svd(basis.T @ x, full_matrices=False)
    return _sign_fixed(((basis @ u[:, :k]) * s[:k]).numpy())


def _sign_fixed(z: np.ndarray) -> np.ndarray:
    """z [N, k] with each column negated where needed so that its largest |entry| is positive."""
    if not z.size:
        return z
    peak = z[np.abs(z).argmax(0), np.arange(z.shape[1])]
    return z * np.where(peak < 0, -1.0, 1.0)


# Points closer than this fraction of the sample's largest (centred) norm count as one point when seeding
# k-means. Batching moves a float32 model's hidden states by ~1e-6 of their norm (padding and batch shape change
# the matmul reduction order; measured on mini-llava: median 5e-7, max 6e-6 of the row norm), so tokens that are
# bitwise equal in one batching (a chat template's prefix, shared by every example) are merely close in another;
# without this, the second batching could spend codes splitting those copies.
SAME_POINT = 1e-4


def kmeans_codes(z: np.ndarray, n_codes: int, seed: int = 0) -> np.ndarray:
    """Code [N] (int64) of each row of z [N, k] from k-means with K <= n_codes, stable to float noise in z.

    Codes partition the rows and every entropy is built on them, so one changed pick (another local optimum)
    moves the score by up to ~0.1. This k-means is built so that noise at the level batching puts into hidden
    states (see SAME_POINT) leaves the partition as it is:
    - seeding is k-means++ (Arthur & Vassilvitskii 2007: each centre a row drawn with probability D^2_i / sum D^2)
      drawn as an exponential race, argmin_i E_i / D^2_i with E ~ Exp(1) from a generator seeded by `seed`
      over the row positions: noise eps changes that draw only when the two smallest ratios are within a factor
      1 + O(eps). scikit-learn's k-means++ looks u * sum D^2 up in the cumulative sum of D^2 (N boundaries, all
      moving with the noise), then keeps the best of 2 + ln K such candidates by potential, an argmin that noise
      flips between near-equal candidates. On mini-llava's 1024-token sketches, 1e-6 relative noise changed 6 of
      384 scikit-learn partitions (5 with tol=0: the seeding) and none of 384 with this seeding; the same 48 records
      at batch sizes 1, 4 and 16 moved 22 of 480 vision sensitivity entries by up to 0.09 before, none after. A
      greedy race (best of several raced candidates) still moved 0.4-1.3% of them: hence one candidate per centre;
    - D^2 below (SAME_POINT * largest norm)^2 counts as 0: copies are never seeded apart, and K stops at the
      number of distinct points (exact or float-noise copies alike);
    - Lloyd iterations (scikit-learn, one thread, so the arithmetic order is fixed) run to strict convergence
      (tol=0: labels unchanged) rather than stopping on a centre-shift threshold that noise can cross.
    What noise can still do is move a token lying on a boundary between two codes (about 1/N of a score).
    The result depends on row order, so callers pass rows in a canonical order (LayerStats: by sketch key).
    """
    try:
        from sklearn.cluster import KMeans
        from threadpoolctl import threadpool_limits
    except ImportError as e:
        raise ImportError("the k-means quantiser needs scikit-learn: pip install scikit-learn") from e
    z = np.asarray(z, dtype=np.float64)
    n = len(z)
    centred = z - z.mean(0) if n else z
    scale = float((centred**2).sum(1).max(initial=0.0))
    if n < 2 or n_codes < 2 or not scale > 0:
        return np.zeros(n, dtype=np.int64)
    tie = SAME_POINT**2 * scale
    race = np.random.default_rng(seed).standard_exponential((n_codes, n))
    chosen = [int(np.argmin(race[0]))]
    d2 = ((centred - centred[chosen[0]]) ** 2).sum(1)
    for r in range(1, n_codes):
        w = np.where(d2 > tie, d2, 0.0)
        if not w.any():
            break
        with np.errstate(divide="ignore"):
            i = int(np.argmin(race[r] / w))  # weight 0 -> inf: never drawn
        chosen.append(i)
        d2 = np.minimum(d2, ((centred - centred[i]) ** 2).sum(1))
    if len(chosen) == 1:
        return np.zeros(n, dtype=np.int64)
    with threadpool_limits(1):  # one thread: a fixed reduction order (and thread start-up costs more here)
        km = KMeans(len(chosen), init=centred[chosen], n_init=1, tol=0.0, algorithm="lloyd")
        return km.fit_predict(centred).astype(np.int64)


def quantize(z: np.ndarray, n_codes: int, method: str = "kmeans", seed: int = 0) -> np.ndarray:
    """Code [N] (int64) of each row of z [N, k].

    kmeans: kmeans_codes, K = n_codes (capped at the number of distinct rows), seeded by `seed`.
    uniform: b = floor(n_codes ** (1/k)) equal-width bins per direction (b >= 2), so at most n_codes
    codes when n_codes >= 2**k.
    """
    z = np.asarray(z, dtype=np.float64)
    if method == "kmeans":
        return kmeans_codes(z, n_codes, seed)
    if method == "uniform":
        b = max(2, math.floor(n_codes ** (1.0 / z.shape[1]) + 1e-9))
        lo, hi = z.min(0), z.max(0)
        width = np.where(hi > lo, (hi - lo) / b, 1.0)
        digits = np.clip(((z - lo) / width).astype(np.int64), 0, b - 1)
        return (digits * b ** np.arange(z.shape[1], dtype=np.int64)).sum(1)
    raise ValueError(f"unknown quantiser {method!r}: use 'kmeans' or 'uniform'")


def plugin_entropy(counts: np.ndarray, miller_madow: bool = True) -> np.ndarray:
    """Entropy (nats) of counts [..., cells]; weighted (non-integer) counts are allowed. NaN when empty."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = counts / n[..., None]
        h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(-1)
        if miller_madow:
            h = h + ((counts > 0).sum(-1) - 1) / (2.0 * n)
    return np.where(n > 0, h, np.nan)


def _counts(cells: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted counts [R, C] of cell ids [N] (0..C-1) under weights [R, N]."""
    n_cells = int(cells.max()) + 1 if len(cells) else 1
    r = np.repeat(np.arange(weights.shape[0]), len(cells))
    flat = np.bincount(r * n_cells + np.tile(cells, weights.shape[0]), weights.ravel(), weights.shape[0] * n_cells)
    return flat.reshape(weights.shape[0], n_cells)


def conditional_entropy(y: np.ndarray, x: np.ndarray, weights: np.ndarray | None = None, miller_madow: bool = True):
    """(H(Y|X), H(Y)) in nats from codes y, x [N], each Miller-Madow corrected.

    weights: None, [N] or [R, N] (bootstrap replicates); the results have the weights' leading shape.
    """
    y, x = np.asarray(y, dtype=np.int64), np.asarray(x, dtype=np.int64)
    w = np.ones((1, len(y))) if weights is None else np.atleast_2d(np.asarray(weights, dtype=np.float64))
    _, yc = np.unique(y, return_inverse=True)
    _, xc = np.unique(x, return_inverse=True)
    _, joint = np.unique(yc * (int(xc.max(initial=0)) + 1) + xc, return_inverse=True)
    h_joint, h_x, h_y = (plugin_entropy(_counts(c.ravel(), w), miller_madow) for c in (joint, xc, yc))
    h_cond = h_joint - h_x
    if weights is None or np.ndim(weights) == 1:
        return h_cond[0], h_y[0]
    return h_cond, h_y


def redundancy_score(h_cond: np.ndarray, h: np.ndarray) -> np.ndarray:
    """H(Y|X) / H(Y) clipped to [0, 1]; 0 where Y is constant (then it adds nothing)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(h > 0, np.clip(h_cond / np.where(h > 0, h, 1.0), 0.0, 1.0), 0.0)


def gaussian_entropy(x: np.ndarray, ridge: float = 1e-12) -> float:
    """Differential entropy (nats) of a Gaussian fitted to the rows of x [N, d]: 1/2 log det(2 pi e Sigma).

    A ridge of `ridge` times the mean variance keeps a rank-deficient sample finite.
    """
    x = np.asarray(x, dtype=np.float64)
    d = x.shape[1]
    cov = np.atleast_2d(np.cov(x, rowvar=False))
    cov = cov + ridge * max(np.trace(cov) / d, 1e-300) * np.eye(d)
    sign, logdet = np.linalg.slogdet(cov)
    return 0.5 * (d * math.log(2 * math.pi * math.e) + logdet) if sign > 0 else math.nan


def gaussian_conditional_entropy(y: np.ndarray, x: np.ndarray, ridge: float = 1e-12) -> float:
    """h(Y | X) = h(X, Y) - h(X) (nats) for jointly Gaussian rows y [N, dy], x [N, dx]."""
    return gaussian_entropy(np.hstack([x, y]), ridge) - gaussian_entropy(x, ridge)


def informational_by_layer(
    scores: Sequence[np.ndarray],
    weights: np.ndarray,
    n_codes: int = 16,
    n_components: int = 8,
    grid_codes: Sequence[int] = (4, 8, 16, 32),
    grid_components: Sequence[int] = (2, 4, 8, 16),
    quantizer: str = "kmeans",
    seed: int = 0,
    level: float = 0.95,
) -> dict:
    """Informational redundancy of decoder layers 0..L-1 (layer j: H(X_{j+1} | X_j)) from PCA scores of
    X_0..X_L on the same N tokens.

    scores: L + 1 arrays [N, k_max] (k_max >= every k used; fewer columns cap k); weights: [R, N] bootstrap
    weights of the tokens. Returns arrays over layers: h_cond, h, score (main K, k), ci_low, ci_high, bootstrap_bias,
    gaussian_h_cond, gaussian_mi, and the sensitivity tables score[K][k][layer], h_cond[K][k][layer].
    """
    n_layers = len(scores) - 1
    codes: dict[tuple[int, int, int], np.ndarray] = {}

    def code(n: int, k: int, layer: int) -> np.ndarray:
        if (n, k, layer) not in codes:
            codes[n, k, layer] = quantize(scores[layer][:, :k], n, quantizer, seed)
        return codes[n, k, layer]

    out = {key: np.full(n_layers, np.nan) for key in ("h_cond", "h", "score", "ci_low", "ci_high", "bootstrap_bias")}
    out |= {"gaussian_h_cond": np.full(n_layers, np.nan), "gaussian_mi": np.full(n_layers, np.nan)}
    table = {key: np.full((len(grid_codes), len(grid_components), n_layers), np.nan) for key in ("score", "h_cond")}
    if len(scores[0]) < 2:
        return out | {"sensitivity": {"n_codes": list(grid_codes), "n_components": list(grid_components), **table}}
    alpha = (1.0 - level) / 2.0
    for layer in range(1, n_layers + 1):
        y, x = code(n_codes, n_components, layer), code(n_codes, n_components, layer - 1)
        h_cond, h = conditional_entropy(y, x)
        reps = redundancy_score(*conditional_entropy(y, x, weights)) if len(weights) else np.array([np.nan])
        i = layer - 1
        out["h_cond"][i], out["h"][i], out["score"][i] = h_cond, h, redundancy_score(h_cond, h)
        shift = out["score"][i] - reps.mean()
        out["ci_low"][i] = np.clip(np.quantile(reps, alpha) + shift, 0.0, 1.0)
        out["ci_high"][i] = np.clip(np.quantile(reps, 1.0 - alpha) + shift, 0.0, 1.0)
        out["bootstrap_bias"][i] = -shift
        zy, zx = scores[layer][:, :n_components], scores[layer - 1][:, :n_components]
        out["gaussian_h_cond"][i] = gaussian_conditional_entropy(zy, zx)
        out["gaussian_mi"][i] = gaussian_entropy(zy) - out["gaussian_h_cond"][i]
        for a, n in enumerate(grid_codes):
            for b, k in enumerate(grid_components):
                hc, hy = conditional_entropy(code(n, k, layer), code(n, k, layer - 1))
                table["h_cond"][a, b, i], table["score"][a, b, i] = hc, redundancy_score(hc, hy)
        for key in [key for key in codes if key[2] == layer - 1]:  # codes of X_{l-1} are no longer needed
            del codes[key]
    return out | {"sensitivity": {"n_codes": list(grid_codes), "n_components": list(grid_components), **table}}
