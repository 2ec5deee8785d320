"""Streaming, mergeable accumulators for the functional measures (framework measure 4).

Per example (one answer position each) the capture code measures
- logit lens: for every decoder layer j, the next-token distributions that the final norm + LM head read from X_j
  and from X_{j+1} at the answer position; KL(P_{j+1} || P_j) and their total variation (TV);
- ablation (optional, one extra forward per layer and modality): the model's final next-token distribution with
  and without layer j's update for the tokens of modality m; KL(P_full || P_ablated), their TV, and the size of
  the removed update ||X_{j+1} - X_j|| (Frobenius norm over the modality's tokens of the example).
Each ablation gives one secant pair (TV, ||update||) of the theory's predictor h (skipit.measures.functional): the
slope TV / ||update|| estimates its Lipschitz constant K along that move, and K * E||update|| bounds the measured
gap E[TV]. Sums are float64 with Poisson bootstrap replicates keyed on example ids (as in skipit.stats); slopes go
into a log-spaced integer histogram (quantiles to 0.01 decade) and an exact running maximum, so all of it merges
exactly (sums up to float rounding).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict

import numpy as np
import torch

from skipit.errors import SkipitError
from skipit.measures.geometric import bootstrap_mean
from skipit.stats import StatsConfig, bootstrap_weight_matrix, decode_meta, encode_meta, example_hash, jsonable

SLOPE_LOG10_RANGE = (-12.0, 4.0)  # slopes outside land in the end bins (the maximum stays exact)
SLOPE_BINS = 1600  # 0.01 decade per bin


def slope_bin(slope: torch.Tensor, n_bins: int = SLOPE_BINS) -> torch.Tensor:
    lo, hi = SLOPE_LOG10_RANGE
    pos = (torch.log10(slope.double().clamp_min(1e-300)) - lo) / (hi - lo) * n_bins
    return pos.floor().long().clamp(0, n_bins - 1)


def slope_quantile(hist: np.ndarray, q: float) -> np.ndarray:
    """Upper edge of the bin where the cumulative count first reaches q of the total (NaN where empty): an upper
    bound on the q-quantile, within one bin (2.3 %)."""
    hist = np.asarray(hist, dtype=np.float64)
    lo, hi = SLOPE_LOG10_RANGE
    total = hist.sum(-1)
    first = (np.cumsum(hist, -1) >= q * total[..., None] - 1e-9).argmax(-1)
    edge = 10.0 ** (lo + (first + 1) * (hi - lo) / hist.shape[-1])
    return np.where(total > 0, edge, np.nan)


class FunctionalStats:
    """Logit-lens KL per layer, and (with ablation=True) ablation KL / TV / Lipschitz per layer and modality."""

    def __init__(
        self,
        num_layers: int,
        modalities: Sequence[str] = ("vision", "text"),
        config: StatsConfig | None = None,
        ablation: bool = False,
    ):
        self.num_layers, self.modalities, self.ablation = num_layers, tuple(modalities), ablation
        self.config = config or StatsConfig()
        r1, n_mod = self.config.n_bootstrap + 1, len(self.modalities)
        self.lens = torch.zeros(num_layers, 2, r1, dtype=torch.float64)  # [kl, tv] sums
        self.lens_n = torch.zeros(r1, dtype=torch.float64)
        shape = (num_layers, n_mod) if ablation else (0, n_mod)
        self.abl = torch.zeros(*shape, 3, r1, dtype=torch.float64)  # [kl, tv, ||update||] sums
        self.abl_n = torch.zeros(*shape, r1, dtype=torch.float64)
        self.slope_max = torch.zeros(*shape, dtype=torch.float64)  # slopes are >= 0; meaningful where abl_n > 0
        self.slope_hist = torch.zeros(*shape, SLOPE_BINS, dtype=torch.int64)

    def update(self, example_ids: Sequence, kl: torch.Tensor, tv: torch.Tensor, *, layer: int | None = None,
               modality: str | None = None, update_norm: torch.Tensor | None = None,
               present: torch.Tensor | None = None) -> None:  # fmt: skip
        """The `skipit.stats.Stats` update: a batch's logit lens, or with `layer` and `modality` one ablation."""
        if layer is None:
            self.update_lens(example_ids, kl, tv)
        else:
            self.update_ablation(example_ids, layer, modality, kl, tv, update_norm, present)

    def update_lens(self, example_ids: Sequence, kl: torch.Tensor, tv: torch.Tensor) -> None:
        """kl, tv: [B, L] for the batch's examples."""
        if kl.shape != (len(example_ids), self.num_layers) or tv.shape != kl.shape:
            raise SkipitError(f"logit-lens values must be [B, {self.num_layers}], got {tuple(kl.shape)}")
        w = bootstrap_weight_matrix(example_hash(example_ids), self.config)  # [B, R + 1]
        self.lens += torch.stack([kl.double().T, tv.double().T], 1).cpu() @ w
        self.lens_n += w.sum(0)

    def update_ablation(
        self,
        example_ids: Sequence,
        layer: int,
        modality: str,
        kl: torch.Tensor,
        tv: torch.Tensor,
        update_norm: torch.Tensor,
        present: torch.Tensor,
    ) -> None:
        """[B] values of one ablation (layer, modality); rows where `present` is False (no token of the modality)
        are left out."""
        if not self.ablation:
            raise SkipitError("these statistics were made without ablation")
        m = self.modalities.index(modality)
        keep = present.bool().cpu()
        ids = [i for i, k in zip(example_ids, keep.tolist(), strict=True) if k]
        if not ids:
            return
        kl, tv, norm = (v.double().cpu()[keep] for v in (kl, tv, update_norm))
        w = bootstrap_weight_matrix(example_hash(ids), self.config)
        self.abl[layer, m] += torch.stack([kl, tv, norm]) @ w
        self.abl_n[layer, m] += w.sum(0)
        moved = norm > 0  # an update of size 0 changes nothing: no slope to take
        if moved.any():
            slope = tv[moved] / norm[moved]
            self.slope_max[layer, m] = max(float(self.slope_max[layer, m]), float(slope.max()))
            self.slope_hist[layer, m] += torch.bincount(slope_bin(slope), minlength=SLOPE_BINS)

    def merge(self, other: FunctionalStats) -> FunctionalStats:
        if self._meta() != other._meta():
            raise SkipitError(f"cannot merge functional statistics of different setups: {self._meta()} vs "
                              f"{other._meta()}")
        self.lens += other.lens
        self.lens_n += other.lens_n
        self.abl += other.abl
        self.abl_n += other.abl_n
        self.slope_max = torch.maximum(self.slope_max, other.slope_max)
        self.slope_hist += other.slope_hist
        return self

    # -- serialisation

    _TENSORS = ("lens", "lens_n", "abl", "abl_n", "slope_max", "slope_hist")

    def _meta(self) -> dict:
        return {"kind": "FunctionalStats", "version": 1, "num_layers": self.num_layers,
                "modalities": list(self.modalities), "ablation": self.ablation, "config": asdict(self.config)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"meta": encode_meta(self._meta())} | {k: getattr(self, k).clone() for k in self._TENSORS}

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        meta = decode_meta(sd["meta"])
        if meta != self._meta():
            raise SkipitError(f"functional statistics were saved for another setup: {meta} vs {self._meta()}")
        for k in self._TENSORS:
            setattr(self, k, sd[k].clone())

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> FunctionalStats:
        meta = decode_meta(sd["meta"])
        if meta.get("kind") != "FunctionalStats":
            raise SkipitError(f"not FunctionalStats statistics: {meta.get('kind')!r}")
        stats = cls(meta["num_layers"], meta["modalities"], StatsConfig(**meta["config"]), meta["ablation"])
        stats.load_state_dict(sd)
        return stats

    # -- measures

    def finalize(self, ci_level: float = 0.95, quantiles: Sequence[float] = (0.5, 0.9, 1.0)) -> dict:
        """JSON-ready measures; lists run over decoder layers 0..L-1 (NaN -> None)."""
        n = self.lens_n.numpy()[None].repeat(self.num_layers, 0)
        out: dict = {"layers": list(range(self.num_layers)), "units": "nats (KL); TV in [0, 1]",
                     "logit_lens": {"kl": bootstrap_mean(self.lens[:, 0].numpy(), n, ci_level),
                                    "tv": bootstrap_mean(self.lens[:, 1].numpy(), n, ci_level),
                                    "n_examples": int(self.lens_n[0])}}
        if self.ablation:
            out["ablation"] = {m: self._ablation_measures(i, ci_level, quantiles)
                               for i, m in enumerate(self.modalities)}
        return jsonable(out)

    def _ablation_measures(self, m: int, ci_level: float, quantiles: Sequence[float]) -> dict:
        sums, n = self.abl[:, m].numpy(), self.abl_n[:, m].numpy()
        kl, tv, norm = (bootstrap_mean(sums[:, i], n, ci_level) for i in range(3))
        lipschitz = {}
        for q in quantiles:
            k = self.slope_max[:, m].numpy() if q >= 1.0 else slope_quantile(self.slope_hist[:, m].numpy(), q)
            k = np.where(n[:, 0] > 0, k, np.nan)
            bound = k * norm["mean"]
            with np.errstate(invalid="ignore", divide="ignore"):
                tight = np.where(bound > 0, tv["mean"] / bound, np.nan)
            lipschitz["max" if q >= 1.0 else f"q{q:g}"] = {
                "lipschitz": k, "bound": bound, "holds": np.where(np.isnan(bound), None, tv["mean"] <= bound + 1e-12),
                "tightness": tight,
            }
        return {"kl": kl, "tv": tv, "update_norm": norm, "gap": tv["mean"], "lipschitz": lipschitz,
                "n_examples": n[:, 0].astype(np.int64)}
