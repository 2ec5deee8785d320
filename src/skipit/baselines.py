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
- DART (Wen et al., 2025): after layer K = 2 (skipit's layer 1) keep the vision tokens least duplicated, by cosine
  similarity, w.r.t. a few pivot tokens of largest key norm. At a budget, the largest share kept that meets it.
- DivPrune (Alvar et al., 2025): before the language model, keep a max-min diverse subset of the vision tokens'
  input embeddings. At a budget, the largest share kept that meets it.
- random: remove random layers.

Every method is registered under its name (`BASELINES`, `get_baseline`): a function that takes one
`BaselineContext` (the model, processor, calibration records, the speed batch `encoded`, the budget, the analysis, a
seed and a cache shared across budgets) and returns its plan. A new method is one decorated function:

    @register("mymethod", "Someone et al. (2025): what it removes, ranked how")
    def _mymethod(ctx: BaselineContext) -> Plan:
        order = ...  # units of work, cheapest first
        return ctx.greedy(order, lambda js: ctx.empty.with_decisions(skip_layers=js))
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import torch

from skipit.errors import SkipitError
from skipit.flops import largest_keep_share, prefill_saving
from skipit.plan import Plan
from skipit.prompts import record_inputs
from skipit.result import AnalysisResult, as_result
from skipit.skipping import apply_plan, remove_plan

FASTV_LAYER = 1  # FastV's K = 2: layers 0 and 1 see every vision token
SHORTV_EXAMPLES = 20  # calibration records ShortV's Layer Contribution is measured on (docs/planning.md)
DART_LAYER = 1  # DART's K = 2 as well
DIVPRUNE_LAYER = -1  # DivPrune chooses before layer 0

saving = prefill_saving  # the fraction of the prefill FLOPs of a batch that a plan removes


@dataclass
class BaselineContext:
    """What a baseline may use to build its plan. `cache` keeps rankings between calls for several budgets."""

    model: torch.nn.Module
    processor: object
    calib: Sequence  # calibration records (for methods that measure the model)
    encoded: dict  # the speed batch whose prefill FLOPs the budget is a fraction of
    budget: float
    analysis: AnalysisResult | None = None
    seed: int = 0
    cache: dict = field(default_factory=dict)

    @cached_property
    def empty(self) -> Plan:
        return Plan.for_model(self.model)

    @property
    def num_layers(self) -> int:
        return self.empty.num_layers

    def saving(self, plan: Plan) -> float:
        return prefill_saving(self.model, self.encoded, plan)

    def meets(self, plan: Plan) -> bool:
        return self.saving(plan) >= self.budget

    def greedy(self, order: Sequence[int], make: Callable[[list[int]], Plan]) -> Plan:
        return greedy(order, make, self.model, self.encoded, self.budget)

    def cached(self, key: str, compute: Callable[[], object]):
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]

    def cannot(self, name: str) -> SkipitError:
        return SkipitError(f"{name} cannot remove {self.budget:.0%} of the FLOPs")


@dataclass(frozen=True)
class Baseline:
    name: str
    make_plan: Callable[[BaselineContext], Plan]
    reference: str = ""


BASELINES: dict[str, Baseline] = {}


def register(name: str, reference: str = "") -> Callable:
    """Decorator: register `fn(ctx: BaselineContext) -> Plan` as the baseline `name`."""

    def add(fn: Callable[[BaselineContext], Plan]) -> Callable[[BaselineContext], Plan]:
        if name in BASELINES:
            raise ValueError(f"baseline {name!r} is registered already")
        BASELINES[name] = Baseline(name, fn, reference)
        return fn

    return add


def available() -> tuple[str, ...]:
    return tuple(BASELINES)


def get_baseline(name: str) -> Baseline:
    try:
        return BASELINES[name]
    except KeyError:
        raise SkipitError(f"unknown baseline {name!r}; available: {', '.join(BASELINES)}") from None


def greedy(order: Sequence[int], make: Callable[[list[int]], Plan], model, encoded, budget: float) -> Plan:
    """Add units in `order` until the plan built from them removes >= budget of the FLOPs."""
    chosen: list[int] = []
    for unit in order:
        chosen.append(unit)
        try:
            plan = make(sorted(chosen))
        except SkipitError:  # e.g. every layer skipped
            break
        if prefill_saving(model, encoded, plan) >= budget:
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


def layer_contribution(model, processor, records, batch_size: int = 16) -> list[float]:
    """ShortV's Layer Contribution of each layer for vision tokens: KL(full || vision tokens frozen at that layer),
    mean over `records`. Measured as the composed planner measures (`skipit.composer.ModelMeasurer`): the vision
    encoder runs once, and freezing at layer j reruns only layers j..L-1."""
    measurer, empty = kl_measurer(model, processor, records, batch_size), Plan.for_model(model)
    return [measurer.mean_kl(empty.with_decisions(frozen_vision_layers=[j]), "score")
            for j in range(empty.num_layers)]  # fmt: skip


def kl_measurer(model, processor, records, batch_size: int = 16):
    """Mean KL(full || plan) at the answer position over `records`, as `measurer.mean_kl(plan, "score")`: the
    composed planner's `ModelMeasurer` (vision encoded once, the layers before a plan's first change replayed)."""
    from skipit.composer import ModelMeasurer, encode

    batches = [encode(model, record_inputs(processor, records[i:i + batch_size], device=model.device))
               for i in range(0, len(records), batch_size)]  # fmt: skip
    return ModelMeasurer(model, processor, (), (), batches={"score": batches})


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


def shortgpt_layer_influence(analysis: AnalysisResult) -> list[float]:
    """ShortGPT's Block Influence of each layer over all tokens: the token-weighted mean of each modality's mean
    1 - cos (the per-token measure is `skipit.measures.block_influence`)."""
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
    ctx = BaselineContext(model, processor, calib, encoded, budget, analysis, seed, {} if cache is None else cache)
    return get_baseline(method).make_plan(ctx)


@register("vtw", "Lin et al. (2024): vision tokens withdraw after the latest layer that meets the budget")
def _vtw(ctx: BaselineContext) -> Plan:
    for m in range(ctx.num_layers - 1, -1, -1):
        plan = ctx.empty.with_decisions(early_exit=m)
        if ctx.meets(plan):
            return plan
    raise ctx.cannot("vtw")


@register("shortv", "Yuan et al. (2025): freeze vision tokens where Layer Contribution is lowest")
def _shortv(ctx: BaselineContext) -> Plan:
    lc = ctx.cached("lc", lambda: layer_contribution(ctx.model, ctx.processor, ctx.calib[:SHORTV_EXAMPLES]))
    order = sorted(range(ctx.num_layers), key=lambda j: lc[j])
    return ctx.greedy(order, lambda js: ctx.empty.with_decisions(frozen_vision_layers=js))


def largest_share(ctx: BaselineContext, name: str, after: int, rank: str = "attention") -> Plan:
    """Pruning after layer `after` with ranking `rank`, keeping the largest share of vision tokens that still meets
    the budget."""
    def make(keep: float) -> Plan:
        return ctx.empty.with_decisions(prune_vision_after=after, prune_vision_keep=keep, prune_vision_rank=rank)

    keep = largest_keep_share(lambda share: ctx.meets(make(share)))
    if keep is None:
        raise ctx.cannot(name)
    return make(keep)


@register("fastv", "Chen et al. (2024): after layer 2 keep the vision tokens the last token attends to most")
def _fastv(ctx: BaselineContext) -> Plan:
    return largest_share(ctx, "fastv", FASTV_LAYER)


@register("dart", "Wen et al. (2025), 'Stop Looking for Important Tokens in Multimodal Language Models: Duplication "
                  "Matters More', arXiv:2502.11494, github.com/ZichenWen1/DART: after layer 2 keep the vision tokens "
                  "least duplicated (lowest cosine similarity) w.r.t. 8 pivot tokens of largest key L1 norm")
def _dart(ctx: BaselineContext) -> Plan:
    return largest_share(ctx, "dart", DART_LAYER, "dart")


@register("divprune", "Alvar et al. (CVPR 2025), 'DivPrune: Diversity-based Visual Token Pruning for Large "
                      "Multimodal Models', arXiv:2503.02175, github.com/vbdi/divprune: before the language model keep "
                      "a max-min diverse subset of the vision tokens (greedy, cosine distance of their embeddings)")
def _divprune(ctx: BaselineContext) -> Plan:
    return largest_share(ctx, "divprune", DIVPRUNE_LAYER, "divprune")


@register("shortgpt", "Men et al. (2024): remove the layers with the lowest Block Influence")
def _shortgpt(ctx: BaselineContext) -> Plan:
    if ctx.analysis is None:
        raise SkipitError("shortgpt ranks layers by Block Influence: give it an analysis")
    bi = shortgpt_layer_influence(ctx.analysis)
    order = sorted(range(ctx.num_layers), key=lambda j: bi[j])
    return ctx.greedy(order, lambda js: ctx.empty.with_decisions(skip_layers=js))


@register("gromov", "Gromov et al. (2024): remove the contiguous block closest in angular distance")
def _gromov(ctx: BaselineContext) -> Plan:
    L = ctx.num_layers
    for n in range(1, L - 1):
        if ctx.meets(ctx.empty.with_decisions(skip_layers=range(n))):
            distances = ctx.cached(f"gromov{n}", lambda n=n: block_distances(ctx.model, ctx.processor, ctx.calib, n))
            start = min(range(len(distances)), key=lambda s: distances[s])
            return ctx.empty.with_decisions(skip_layers=range(start, start + n))
    raise ctx.cannot("gromov")


@register("random", "remove random layers")
def _random(ctx: BaselineContext) -> Plan:
    L = ctx.num_layers
    order = random.Random(f"random-layers/{ctx.seed}").sample(range(L), L)
    return ctx.greedy(order, lambda js: ctx.empty.with_decisions(skip_layers=js))


METHODS = available()  # the built-in methods, in registration order


def vtw_own_k(model, processor, calib, threshold: float = 0.05) -> tuple[int | None, list[float]]:
    """VTW's rule: the earliest exit layer K whose output KL to the full model on `calib` is below `threshold`
    (None if none is), and the KL of every K."""
    measurer, empty = kl_measurer(model, processor, calib), Plan.for_model(model)
    kls = [measurer.mean_kl(empty.with_decisions(early_exit=m), "score") for m in range(empty.num_layers)]
    return next((m for m, v in enumerate(kls) if v < threshold), None), kls
