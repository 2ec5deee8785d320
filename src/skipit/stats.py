"""Streaming, mergeable, serialisable accumulators: per-layer hidden states (and attention) in, statistics out.

Conventions
- hidden_states: L + 1 tensors [B, T, D]; index l holds X_l (X_0 = the input embeddings). Decoder layers are
  numbered 0..L-1 as everywhere in skipit: layer j maps X_j to X_{j+1} and is measured on that pair (the
  framework's "layer l" is j = l - 1); every per-layer array is indexed by j.
- modality_masks: {modality: bool [B, T]}; valid_mask: bool [B, T], False on padding. Padding never enters
  a statistic (its values may be anything, NaN included). A configured modality missing from the dict has
  no tokens in that batch; an unknown one is an error.
- example_ids: one unique id per batch row. All randomness is a hash of ids, so results do not depend on
  batching, sharding or merge order:
  * bootstrap: example e gets weight Poisson(1) in replicate r, drawn from hash(e, r);
  * token sketch: per modality, the K tokens with the smallest hash(e, token index) among all seen, with
    their states at every layer (bottom-k sampling); merging keeps the K smallest of the union, which is
    exactly the sketch of one pass. The token index defaults to the token's rank among the example's
    valid tokens (so left or right padding does not matter); pass token_index when an example's tokens
    arrive over several calls (decoding).
- Sums are float64; counts and histograms are integers (or integer-valued float64), so they merge exactly.

Memory per layer x modality (R bootstrap replicates, n_bins histogram bins, K sketch tokens, hidden size D,
s bytes per sketch value): 24 (R + 1) + 8 n_bins + s K D bytes, plus s K D + 16 K per modality for X_0
and the sketch keys. Nothing grows with the number of examples.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from skipit.errors import SkipitError
from skipit.measures.cka import cka_from_grams, decision_stability
from skipit.measures.geometric import bootstrap_mean, layer_distances
from skipit.measures.informational import centered_gram, informational_by_layer, pca_scores
from skipit.measures.proximal import bin_index, tail_probability
from skipit.measures.var import var_from_sums, vision_attention_terms


@runtime_checkable
class Stats(Protocol):
    """What every accumulator (LayerStats, AttentionStats, skipit.functional_stats.FunctionalStats) implements:
    `update` with a batch, `merge` another accumulator of the same setup (exactly: the result equals one pass over
    both), `state_dict` / `load_state_dict` / `from_state_dict` to save and resume, and `finalize` into JSON-able
    measures. The analysis saves, merges and finalizes its accumulators through these names only."""

    def update(self, *args: Any, **kwargs: Any) -> None: ...

    def merge(self, other: Any) -> Any: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None: ...

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> Any: ...

    def finalize(self, *args: Any, **kwargs: Any) -> dict: ...


# ---------------------------------------------------------------- hashing: reproducible randomness from ids

_BOOT_SALT, _SKETCH_SALT = np.uint64(0xB0075742), np.uint64(0x5CE7C4)
_POISSON1_CDF = np.cumsum([math.exp(-1.0) / math.factorial(k) for k in range(40)])


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-mixed uint64 -> uint64 map (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def example_hash(example_ids: Sequence) -> np.ndarray:
    """uint64 [B]: a stable hash of str(id) (Python's hash() is salted per process, so not usable here)."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little") for i in example_ids],
        dtype=np.uint64,
    )


def poisson_weights(ex_hash: np.ndarray, n_replicates: int, seed: int = 0) -> np.ndarray:
    """float64 [N, n_replicates]: the Poisson(1) bootstrap weight of each example in each replicate."""
    salt = _mix64(np.arange(n_replicates, dtype=np.uint64) ^ _mix64(np.array([seed], dtype=np.uint64) ^ _BOOT_SALT))
    bits = _mix64(np.asarray(ex_hash, dtype=np.uint64)[:, None] ^ salt[None, :]) >> np.uint64(11)
    return np.searchsorted(_POISSON1_CDF, bits.astype(np.float64) * 2.0**-53, side="right").astype(np.float64)


def token_keys(ex_hash: np.ndarray, token_index: np.ndarray, seed: int = 0) -> np.ndarray:
    """int64 [B, T] sketch keys in [0, 2**63): a hash of (example, token index)."""
    salt = _mix64(np.array([seed], dtype=np.uint64) ^ _SKETCH_SALT)
    idx = _mix64(np.clip(token_index, 0, None).astype(np.uint64) ^ salt)
    return (_mix64(np.asarray(ex_hash, dtype=np.uint64)[:, None] ^ idx) >> np.uint64(1)).astype(np.int64)


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class StatsConfig:
    """What the accumulated state depends on; statistics merge only under equal configs."""

    n_bins: int = 10_000  # rho histogram on [0, 1]: bin width 1e-4
    n_bootstrap: int = 200  # Poisson(1) replicates over examples
    sketch_size: int = 1024  # tokens kept per modality
    sketch_dtype: str = "float32"  # float32, float16 or bfloat16
    seed: int = 0


@dataclass(frozen=True)
class MeasureConfig:
    """How finalize() turns statistics into measures; free to change after accumulation."""

    ci_level: float = 0.95
    tail_deltas: tuple[float, ...] = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    n_codes: int = 16  # K, k-means codes per layer
    n_components: int = 8  # k, principal directions
    grid_codes: tuple[int, ...] = (4, 8, 16, 32)
    grid_components: tuple[int, ...] = (2, 4, 8, 16)
    quantizer: str = "kmeans"
    informational: bool = True
    cka: bool = True
    cka_debiased: bool = True
    stability_top_k: int | None = None  # layers picked per measure in the stability check; None: L // 4


def jsonable(x):
    """Arrays and tensors to lists, NaN to None, recursively."""
    if isinstance(x, torch.Tensor):
        x = x.numpy()
    if isinstance(x, np.ndarray):
        return jsonable(x.tolist())
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def encode_meta(meta: dict) -> torch.Tensor:
    return torch.tensor(list(json.dumps(meta, sort_keys=True).encode()), dtype=torch.uint8)


def decode_meta(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.tolist()).decode())


def _check_batch(example_ids, modality_masks, valid_mask, modalities, shape) -> tuple[list, torch.Tensor]:
    b, t = shape
    ids = list(example_ids)
    if len(ids) != b:
        raise SkipitError(f"{len(ids)} example ids for a batch of {b}")
    if len(set(map(str, ids))) != b:
        raise SkipitError("example ids must be unique within a batch (and across the calibration set)")
    unknown = set(modality_masks) - set(modalities)
    if unknown:
        raise SkipitError(f"unknown modalities {sorted(unknown)}; these statistics track {list(modalities)}")
    for name, mask in modality_masks.items():
        if tuple(mask.shape) != (b, t):
            raise SkipitError(f"mask of modality {name!r} has shape {tuple(mask.shape)}, expected {(b, t)}")
    valid = torch.ones(b, t, dtype=torch.bool) if valid_mask is None else valid_mask.bool().cpu()
    if tuple(valid.shape) != (b, t):
        raise SkipitError(f"valid_mask has shape {tuple(valid.shape)}, expected {(b, t)}")
    return ids, valid


def bootstrap_weight_matrix(ex_hash: np.ndarray, config: StatsConfig) -> torch.Tensor:
    """float64 [B, R + 1]: column 0 the plain weight 1, then the bootstrap weights."""
    w = poisson_weights(ex_hash, config.n_bootstrap, config.seed)
    return torch.from_numpy(np.hstack([np.ones((len(ex_hash), 1)), w]))


# ---------------------------------------------------------------- the token sketch


class TokenSketch:
    """Bottom-k sample of tokens by hash key, with their states at every layer.

    Rows are stored in arrival order and a full sketch overwrites the rows it evicts in place, so a batch costs
    what it admits, not a copy of the whole sketch; `keys`, `example_hash` and `states` read them sorted by key,
    the canonical order that the measures and saved files use.
    """

    def __init__(self, size: int, num_states: int, hidden_size: int, dtype: torch.dtype):
        self.size, self.dtype = size, dtype
        self._keys = torch.empty(0, dtype=torch.int64)
        self._hash = torch.empty(0, dtype=torch.int64)  # uint64 bits, for bootstrap weights
        self._states = torch.empty(0, num_states, hidden_size, dtype=dtype)
        self._order = None  # argsort of _keys, cached until the next change

    def _sorted(self, t: torch.Tensor) -> torch.Tensor:
        if self._order is None:
            self._order = torch.argsort(self._keys, stable=True)
        return t[self._order]

    def _set(self, name: str, value: torch.Tensor) -> None:
        setattr(self, name, value)
        self._order = None

    keys = property(lambda self: self._sorted(self._keys), lambda self, v: self._set("_keys", v))
    example_hash = property(lambda self: self._sorted(self._hash), lambda self, v: self._set("_hash", v))
    states = property(lambda self: self._sorted(self._states), lambda self, v: self._set("_states", v))

    def _keep(self, keys: torch.Tensor, ex_hash: torch.Tensor, fetch: Callable[[torch.Tensor], torch.Tensor]):
        """Keep the `size` smallest keys of self + candidates; fetch(i) gives the states of candidates i."""
        if len(self._keys) == self.size and len(keys):  # a full sketch only admits keys below its largest
            idx = (keys < self._keys.max()).nonzero().squeeze(1)
            keys, ex_hash = keys[idx], ex_hash[idx]
        else:
            idx = torch.arange(len(keys))
        if not len(keys):
            return
        n_old = len(self._keys)
        order = torch.argsort(torch.cat([self._keys, keys]), stable=True)[: self.size]
        new = order[order >= n_old] - n_old
        evicted = torch.ones(n_old, dtype=torch.bool)
        evicted[order[order < n_old]] = False
        slots = evicted.nonzero().squeeze(1)  # never more than the admitted candidates
        states = fetch(idx[new]).to("cpu", self.dtype)
        n = len(slots)
        self._keys[slots], self._hash[slots], self._states[slots] = keys[new[:n]], ex_hash[new[:n]], states[:n]
        if len(new) > n:  # still filling up
            self._keys = torch.cat([self._keys, keys[new[n:]]])
            self._hash = torch.cat([self._hash, ex_hash[new[n:]]])
            self._states = torch.cat([self._states, states[n:]])
        self._order = None

    def offer(self, keys: torch.Tensor, ex_hash: torch.Tensor, mask: torch.Tensor, hidden_states: Sequence):
        """Offer the tokens where mask [B, T] is True (keys [B, T], ex_hash [B])."""
        b, t = mask.nonzero(as_tuple=True)

        def fetch(i: torch.Tensor) -> torch.Tensor:
            bi, ti = b[i].to(hidden_states[0].device), t[i].to(hidden_states[0].device)
            return torch.stack([h[bi, ti] for h in hidden_states], 1)

        self._keep(keys[b, t], ex_hash[b], fetch)

    def merge(self, other: TokenSketch):
        self._keep(other.keys, other.example_hash, lambda i: other.states[i])


# ---------------------------------------------------------------- per-layer hidden-state statistics


class LayerStats:
    """Geometric, proximal, informational and CKA statistics of L layers for each modality."""

    def __init__(
        self,
        num_layers: int,
        hidden_size: int,
        modalities: Sequence[str] = ("vision", "text"),
        config: StatsConfig | None = None,
    ):
        self.num_layers, self.hidden_size, self.modalities = num_layers, hidden_size, tuple(modalities)
        self.config = config or StatsConfig()
        n_layers, n_mod, r1 = num_layers, len(self.modalities), self.config.n_bootstrap + 1
        self.sums = torch.zeros(n_layers, n_mod, 2, r1, dtype=torch.float64)  # [rho, angular] per replicate
        self.counts = torch.zeros(n_layers, n_mod, r1, dtype=torch.float64)  # tokens per replicate
        self.hist = torch.zeros(n_layers, n_mod, self.config.n_bins, dtype=torch.int64)
        dtype = getattr(torch, self.config.sketch_dtype)
        self.sketches = {m: TokenSketch(self.config.sketch_size, n_layers + 1, hidden_size, dtype) for m in modalities}

    # -- accumulation

    def update(
        self,
        example_ids: Sequence,
        hidden_states: Sequence[torch.Tensor],
        modality_masks: Mapping[str, torch.Tensor],
        valid_mask: torch.Tensor | None = None,
        token_index: torch.Tensor | None = None,
    ) -> None:
        """Add a batch: hidden_states = [X_0, ..., X_L], each [B, T, D]; masks bool [B, T]."""
        hs = list(hidden_states)
        if len(hs) != self.num_layers + 1:
            raise SkipitError(f"expected {self.num_layers + 1} hidden states (X_0..X_L), got {len(hs)}")
        shape = tuple(hs[0].shape)
        for i, h in enumerate(hs):
            if tuple(h.shape) != shape or shape[-1] != self.hidden_size:
                raise SkipitError(f"hidden state X_{i} has shape {tuple(h.shape)}, expected (B, T, {self.hidden_size})")
        ids, valid = _check_batch(example_ids, modality_masks, valid_mask, self.modalities, shape[:2])
        zeros = torch.zeros_like(valid)
        masks = torch.stack([valid & modality_masks[m].bool().cpu() if m in modality_masks else zeros
                             for m in self.modalities])  # [M, B, T]
        ex_hash = example_hash(ids)
        w = bootstrap_weight_matrix(ex_hash, self.config)
        self.counts += (masks.sum(-1).double() @ w)[None]  # the same tokens at every layer

        b, t = valid.nonzero(as_tuple=True)
        sel = masks[:, b, t].double()  # [M, n]: modality of each valid token
        dev = hs[0].device
        rho, ang = layer_distances(hs, b.to(dev), t.to(dev))  # [L, n]; NaN where a state is not finite
        if not torch.isfinite(rho).all():
            self._raise_non_finite(hs, rho, b, t, ids)
        for j, value in enumerate((rho, ang)):
            per_example = torch.zeros(self.num_layers, len(self.modalities), len(ids), dtype=torch.float64)
            per_example.index_add_(2, b, sel[None] * value[:, None])
            self.sums[:, :, j] += per_example @ w
        bins = bin_index(rho, self.config.n_bins) + torch.arange(self.num_layers)[:, None] * self.config.n_bins
        for m in range(len(self.modalities)):
            counts = torch.bincount(bins[:, sel[m] > 0].reshape(-1), minlength=self.num_layers * self.config.n_bins)
            self.hist[:, m] += counts.view(self.num_layers, self.config.n_bins)

        if token_index is None:
            token_index = valid.long().cumsum(1) - 1
        keys = torch.from_numpy(token_keys(ex_hash, token_index.cpu().numpy(), self.config.seed))
        ex = torch.from_numpy(ex_hash.view(np.int64))
        for m, mask in zip(self.modalities, masks, strict=True):
            self.sketches[m].offer(keys, ex, mask, hs)

    @staticmethod
    def _raise_non_finite(hs, rho, b, t, ids):
        """Name the first layer and example whose valid hidden state has NaN or inf values."""
        layer = int((~torch.isfinite(rho)).any(1).nonzero()[0, 0])  # X_layer or X_{layer+1} is bad
        for index in (layer, layer + 1):
            bad = ~torch.isfinite(hs[index][b.to(hs[index].device), t.to(hs[index].device)]).all(-1).cpu()
            if bad.any():
                example = ids[int(b[bad.nonzero()[0, 0]])]
                where = "the input embeddings" if index == 0 else f"the output of decoder layer {index - 1}"
                raise SkipitError(f"hidden state X_{index} ({where}) has NaN or inf values for example {example!r}")
        raise SkipitError(f"hidden states around decoder layer {layer} overflow (norms are not finite)")

    def merge(self, other: LayerStats) -> LayerStats:
        """Add another shard's statistics into these (in place); returns self."""
        if self._meta() != other._meta():
            raise SkipitError(f"cannot merge statistics of different setups: {self._meta()} vs {other._meta()}")
        self.sums += other.sums
        self.counts += other.counts
        self.hist += other.hist
        for m in self.modalities:
            self.sketches[m].merge(other.sketches[m])
        return self

    # -- serialisation

    def _meta(self) -> dict:
        return {"kind": "LayerStats", "version": 1, "num_layers": self.num_layers, "hidden_size": self.hidden_size,
                "modalities": list(self.modalities), "config": asdict(self.config)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (the setup is JSON in a uint8 tensor 'meta'), so safetensors can save it as is."""
        sd = {"meta": encode_meta(self._meta()), "sums": self.sums, "counts": self.counts, "hist": self.hist}
        for m, sk in self.sketches.items():
            sd |= {f"sketch.{m}.keys": sk.keys, f"sketch.{m}.example_hash": sk.example_hash,
                   f"sketch.{m}.states": sk.states}
        return {k: v.contiguous() for k, v in sd.items()}

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        meta = decode_meta(sd["meta"])
        if meta != self._meta():
            raise SkipitError(f"statistics were saved for another setup: {meta} vs {self._meta()}")
        self.sums, self.counts, self.hist = sd["sums"].clone(), sd["counts"].clone(), sd["hist"].clone()
        for m, sk in self.sketches.items():
            sk.keys, sk.example_hash = sd[f"sketch.{m}.keys"].clone(), sd[f"sketch.{m}.example_hash"].clone()
            sk.states = sd[f"sketch.{m}.states"].clone()

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> LayerStats:
        meta = decode_meta(sd["meta"])
        if meta.get("kind") != "LayerStats":
            raise SkipitError(f"not LayerStats statistics: {meta.get('kind')!r}")
        cfg = StatsConfig(**meta["config"])
        stats = cls(meta["num_layers"], meta["hidden_size"], meta["modalities"], cfg)
        stats.load_state_dict(sd)
        return stats

    def save(self, path) -> None:
        from safetensors.torch import save_file

        save_file(self.state_dict(), str(path))

    @classmethod
    def load(cls, path) -> LayerStats:
        from safetensors.torch import load_file

        return cls.from_state_dict(load_file(str(path)))

    # -- measures

    def tail_probability(self, delta: float) -> np.ndarray:
        """P(rho > delta) [L, M] (see skipit.measures.proximal for the bin convention)."""
        return tail_probability(self.hist.numpy(), delta)

    def finalize(self, measure_config: MeasureConfig | None = None) -> dict:
        """Measures per modality and decoder layer, JSON-ready (NaN -> None); lists run over layers 0..L-1."""
        mc = measure_config or MeasureConfig()
        counts = self.counts.numpy()
        out: dict = {"layers": list(range(self.num_layers)), "config": asdict(self.config),
                     "measure_config": asdict(mc), "modalities": {}}
        for i, m in enumerate(self.modalities):
            rho = bootstrap_mean(self.sums[:, i, 0].numpy(), counts[:, i], mc.ci_level)
            ang = bootstrap_mean(self.sums[:, i, 1].numpy(), counts[:, i], mc.ci_level)
            entry = {
                "n_tokens": counts[:, i, 0].astype(np.int64),
                "geometric": {"rho": rho, "angular": ang, "block_influence": {k: 2.0 * v for k, v in rho.items()}},
                "proximal": {"n_bins": self.config.n_bins,
                             "tail": {str(d): tail_probability(self.hist[:, i].numpy(), d) for d in mc.tail_deltas}},
            }
            entry |= self._sketch_measures(m, mc)
            if "cka" in entry:
                top_k = mc.stability_top_k or max(1, self.num_layers // 4)
                dist = {"cosine": rho["mean"], "angular": ang["mean"], "cka": 1.0 - np.asarray(entry["cka"]["value"])}
                entry["decision_stability"] = decision_stability(dist, "cosine", top_k=top_k)
            out["modalities"][m] = entry
        return jsonable(out)

    def _sketch_measures(self, modality: str, mc: MeasureConfig) -> dict:
        sk = self.sketches[modality]
        n = len(sk.keys)
        k_max = min(max(mc.n_components, *mc.grid_components), max(n, 1), self.hidden_size)
        scores = [np.zeros((0, k_max))] * (self.num_layers + 1)
        cka = np.full(self.num_layers, np.nan)
        enough = n >= 4  # below that every sample-based measure stays NaN (debiased CKA needs 4 rows)
        prev = None
        states = sk.states if enough else None  # one sorted copy, not one per layer
        for layer in range(self.num_layers + 1 if enough else 0):
            x = states[:, layer]
            if mc.informational:
                scores[layer] = pca_scores(x, k_max, self.config.seed)
            if mc.cka:
                gram = centered_gram(x)
                if layer > 0:
                    cka[layer - 1] = cka_from_grams(prev, gram, mc.cka_debiased)
                prev = gram
        out = {}
        if mc.cka:
            out["cka"] = {"value": cka, "debiased": mc.cka_debiased, "n_samples": n}
        if mc.informational:
            ex = sk.example_hash.numpy().view(np.uint64)
            weights = poisson_weights(ex, self.config.n_bootstrap, self.config.seed).T
            info = informational_by_layer(scores, weights, mc.n_codes, mc.n_components, mc.grid_codes,
                                          mc.grid_components, mc.quantizer, self.config.seed, mc.ci_level)
            out["informational"] = info | {"n_codes": mc.n_codes, "n_components": mc.n_components,
                                           "quantizer": mc.quantizer, "n_samples": n, "units": "nats"}
        return out


# ---------------------------------------------------------------- cross-modal attention (VAR)


class AttentionStats:
    """Streaming VAR per layer: mass that query-modality tokens put on key-modality tokens (skipit.measures.var)."""

    def __init__(
        self,
        num_layers: int,
        query_modalities: Sequence[str] = ("text", "generated"),
        key_modality: str = "vision",
        config: StatsConfig | None = None,
    ):
        self.num_layers, self.query_modalities, self.key_modality = num_layers, tuple(query_modalities), key_modality
        self.config = config or StatsConfig()
        r1 = self.config.n_bootstrap + 1
        self.mass, self.share, self.n = (torch.zeros(num_layers, r1, dtype=torch.float64) for _ in range(3))

    def update(
        self,
        example_ids: Sequence,
        layer: int,
        attn: torch.Tensor,
        modality_masks: Mapping[str, torch.Tensor],
        valid_mask: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> None:
        """Add the attention weights [B, H, Q, K] of decoder layer `layer` (0..L-1); masks are over keys [B, K]."""
        if not 0 <= layer < self.num_layers:
            raise SkipitError(f"layer {layer} is outside 0..{self.num_layers - 1}")
        if attn.dim() != 4:
            raise SkipitError(f"attention weights must be [B, H, Q, K], got shape {tuple(attn.shape)}")
        b, _, _, k = attn.shape
        ids, valid = _check_batch(example_ids, modality_masks, valid_mask,
                                  (*self.query_modalities, self.key_modality), (b, k))
        zeros = torch.zeros_like(valid)
        query = zeros.clone()
        for m in self.query_modalities:
            query |= modality_masks[m].bool().cpu() if m in modality_masks else zeros
        vision = modality_masks[self.key_modality].bool().cpu() if self.key_modality in modality_masks else zeros
        mass, share, counted = vision_attention_terms(attn, query, vision, valid, visible)
        bad = counted & ~torch.isfinite(mass)
        if bad.any():
            example = ids[int(bad.nonzero()[0, 0])]
            raise SkipitError(f"attention weights of layer {layer} have NaN or inf values for example {example!r}")
        w = bootstrap_weight_matrix(example_hash(ids), self.config)
        self.mass[layer] += mass.sum(1) @ w
        self.share[layer] += share.sum(1) @ w
        self.n[layer] += counted.sum(1).double() @ w

    def merge(self, other: AttentionStats) -> AttentionStats:
        if self._meta() != other._meta():
            raise SkipitError(f"cannot merge attention statistics of different setups: {self._meta()} vs "
                              f"{other._meta()}")
        self.mass += other.mass
        self.share += other.share
        self.n += other.n
        return self

    def _meta(self) -> dict:
        return {"kind": "AttentionStats", "version": 1, "num_layers": self.num_layers,
                "query_modalities": list(self.query_modalities), "key_modality": self.key_modality,
                "config": asdict(self.config)}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"meta": encode_meta(self._meta()), "mass": self.mass.clone(), "share": self.share.clone(),
                "n": self.n.clone()}

    def load_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        meta = decode_meta(sd["meta"])
        if meta != self._meta():
            raise SkipitError(f"attention statistics were saved for another setup: {meta} vs {self._meta()}")
        self.mass, self.share, self.n = sd["mass"].clone(), sd["share"].clone(), sd["n"].clone()

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor]) -> AttentionStats:
        meta = decode_meta(sd["meta"])
        if meta.get("kind") != "AttentionStats":
            raise SkipitError(f"not AttentionStats statistics: {meta.get('kind')!r}")
        stats = cls(meta["num_layers"], meta["query_modalities"], meta["key_modality"], StatsConfig(**meta["config"]))
        stats.load_state_dict(sd)
        return stats

    def finalize(self, ci_level: float = 0.95) -> dict:
        """var and var_normalised (mean, ci_low, ci_high), expected_share, n_queries; lists over layers 0..L-1."""
        res = var_from_sums(self.mass.numpy(), self.share.numpy(), self.n.numpy(), ci_level)
        res["n_queries"] = res["n_queries"].astype(np.int64)
        return jsonable({"layers": list(range(self.num_layers)), **res})
