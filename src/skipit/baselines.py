"""The methods users would pick instead of skipit, as plans, at a matched FLOPs budget.

Each baseline ranks units of work by its own criterion and removes them, cheapest first, until its plan removes at
least `budget` of the prefill FLOPs of the benchmark's prompts (so every method is compared at the same compute):

- VTW (Lin et al., 2024): vision tokens withdraw after layer K. At a budget, K is the latest exit that meets it;
  `vtw_own_k` also gives the K of VTW's own rule (the earliest exit whose output KL on a few calibration examples
  stays under a threshold).
- ShortV (Yuan et al., 2025): freeze vision tokens in the layers with the lowest Layer Contribution, the KL between
  the model's output with and without that layer's update of vision tokens (measured here with the skip engine).
- ShortGPT (Men et al., 2024): remove the layers with the lowest Block Influence, 1 - cos(X_j, X_{j+1}) over all
  tokens (read from the analysis).
- Gromov et al. (2024): remove the contiguous block of n layers whose input and output hidden states at the last
  token are closest in angular distance.
- FastV (Chen et al., 2024): after layer K = 2 (skipit's layer 1) keep only the vision tokens the last token attends
  to most. At a budget, the share kept is the largest that meets it (FastV's own setting keeps 50 %).
- random: remove random layers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch

from skipit.errors import SkipitError
from skipit.evaluation import speed
from skipit.plan import Plan
from skipit.prompts import record_inputs
from skipit.result import AnalysisResult, as_result
from skipit.skipping import apply_plan, remove_plan

METHODS = ("vtw", "shortv", "fastv", "shortgpt", "gromov", "random")
FASTV_LAYER = 1  # FastV's K = 2: layers 0 and 1 see every vision token


def saving(model, encoded: dict, plan: Plan) -> float:
    """Fraction of the prefill FLOPs of the batch `encoded` that `plan` removes."""
    plain, mine = (speed.prompt_costs(model, encoded, p, 1)["prefill"] for p in (None, plan))
    return 1 - mine / plain


def greedy(order: Sequence[int], make: Callable[[list[int]], Plan], model, encoded, budget: float) -> Plan:
    """Add units in `order` until the plan built from them removes >= budget of the FLOPs."""
    chosen: list[int] = []
    for unit in order:
        chosen.append(unit)
        try:
            plan = make(sorted(chosen))
        except SkipitError:  # e.g. every layer skipped
            break
        if saving(model, encoded, plan) >= budget:
            return plan
    raise SkipitError(f"this method cannot remove {budget:.0%} of the FLOPs")


@torch.inference_mode()
def last_logprobs(model, processor, records, plan: Plan | None = None, batch_size: int = 16) -> torch.Tensor:
    """Log-probabilities of the next token after each prompt (the answer position), under `plan`."""
    out = []
    if plan is not None:
        apply_plan(model, plan)
    try:
        for i in range(0, len(records), batch_size):
            inputs = record_inputs(processor, records[i:i + batch_size], device=model.device)
            logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()
            out.append(torch.log_softmax(logits, -1))
    finally:
        if plan is not None:
            remove_plan(model)
    return torch.cat(out)


def kl(p_log: torch.Tensor, q_log: torch.Tensor) -> float:
    """Mean KL(P || Q) over rows, in nats."""
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def layer_contribution(model, processor, records) -> list[float]:
    """ShortV's Layer Contribution of each layer for vision tokens: KL(full || vision tokens frozen at that layer)."""
    full = last_logprobs(model, processor, records)
    empty = Plan.for_model(model)
    return [kl(full, last_logprobs(model, processor, records, empty.with_decisions(frozen_vision_layers=[j])))
            for j in range(empty.num_layers)]  # fmt: skip


@torch.inference_mode()
def block_distances(model, processor, records, n: int) -> list[float]:
    """Gromov et al.: mean angular distance arccos(cos(X_l, X_{l+n})) / pi at the last token, for l = 0..L-1-n (the
    last layer is never in a block, as in the paper)."""
    L = Plan.for_model(model).num_layers
    sums = torch.zeros(L - n)
    count = 0
    for i in range(0, len(records), 16):
        rows = records[i:i + 16]
        inputs = record_inputs(processor, rows, device=model.device)
        hs = model(**inputs, output_hidden_states=True, logits_to_keep=1).hidden_states  # X_0..X_{L-1}, normed X_L
        last = torch.stack([h[:, -1].float() for h in hs[:L]])  # (L, batch, hidden)
        for start in range(L - n):  # blocks start..start+n-1 end at layer L-2 at the latest
            cos = torch.nn.functional.cosine_similarity(last[start], last[start + n], dim=-1).clamp(-1, 1)
            sums[start] += (torch.arccos(cos) / math.pi).sum().cpu()
        count += len(rows)
    return (sums / count).tolist()


def block_influence(analysis: AnalysisResult) -> list[float]:
    """ShortGPT's Block Influence over all tokens: the token-weighted mean of each modality's 1 - cos."""
    analysis = as_result(analysis, "shortgpt")
    mods = analysis.modalities
    weight = {m: analysis.n_tokens(m) for m in mods}
    influence = {m: analysis.measure("block_influence", m).mean for m in mods}
    return [sum(influence[m][j] * weight[m] for m in mods) / sum(weight.values())
            for j in range(analysis.num_layers)]  # fmt: skip


def baseline_plan(method: str, model, processor, calib, encoded: dict, budget: float,
                  analysis: AnalysisResult | None = None,
                  seed: int = 0, cache: dict | None = None) -> Plan:  # fmt: skip
    """`method`'s plan removing at least `budget` of the prefill FLOPs of `encoded`. `cache` (a dict) keeps the
    rankings between calls for several budgets."""
    cache = {} if cache is None else cache
    empty = Plan.for_model(model)
    L = empty.num_layers
    if method == "vtw":
        for m in range(L - 1, -1, -1):
            plan = empty.with_decisions(early_exit=m)
            if saving(model, encoded, plan) >= budget:
                return plan
        raise SkipitError(f"vtw cannot remove {budget:.0%} of the FLOPs")
    if method == "shortv":
        if "lc" not in cache:
            cache["lc"] = layer_contribution(model, processor, calib)
        order = sorted(range(L), key=lambda j: cache["lc"][j])
        return greedy(order, lambda js: empty.with_decisions(frozen_vision_layers=js), model, encoded, budget)
    if method == "fastv":
        def fastv(keep: float) -> Plan:
            return empty.with_decisions(prune_vision_after=FASTV_LAYER, prune_vision_keep=keep)

        lo, hi = 1e-3, 1 - 1e-3  # saving falls as the share kept grows: find the largest share that meets budget
        if saving(model, encoded, fastv(lo)) < budget:
            raise SkipitError(f"fastv cannot remove {budget:.0%} of the FLOPs")
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if saving(model, encoded, fastv(mid)) >= budget else (lo, mid)
        return fastv(lo)
    if method == "shortgpt":
        if analysis is None:
            raise SkipitError("shortgpt ranks layers by Block Influence: give it an analysis")
        bi = block_influence(analysis)
        order = sorted(range(L), key=lambda j: bi[j])
        return greedy(order, lambda js: empty.with_decisions(skip_layers=js), model, encoded, budget)
    if method == "gromov":
        for n in range(1, L - 1):
            if saving(model, encoded, empty.with_decisions(skip_layers=range(n))) >= budget:
                key = f"gromov{n}"
                if key not in cache:
                    cache[key] = block_distances(model, processor, calib, n)
                start = min(range(len(cache[key])), key=lambda s: cache[key][s])
                return empty.with_decisions(skip_layers=range(start, start + n))
        raise SkipitError(f"gromov cannot remove {budget:.0%} of the FLOPs")
    if method == "random":
        order = random.Random(f"random-layers/{seed}").sample(range(L), L)
        return greedy(order, lambda js: empty.with_decisions(skip_layers=js), model, encoded, budget)
    raise SkipitError(f"unknown baseline {method!r}; choose from {', '.join(METHODS)}")


def vtw_own_k(model, processor, calib, threshold: float = 0.05) -> tuple[int | None, list[float]]:
    """VTW's rule: the earliest exit layer K whose output KL to the full model on `calib` is below `threshold`
    (None if none is), and the KL of every K."""
    full = last_logprobs(model, processor, calib)
    empty = Plan.for_model(model)
    kls = [kl(full, last_logprobs(model, processor, calib, empty.with_decisions(early_exit=m))) for m in
           range(empty.num_layers)]  # fmt: skip
    return next((m for m, v in enumerate(kls) if v < threshold), None), kls
