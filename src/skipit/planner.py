"""From measured redundancy to a skip plan, without labels (`skipit plan`).

Every decision a plan can make removes some work from some layers; each has its own condition, read from the
analysis of `skipit.analyze` (layer j maps X_j to X_{j+1}; `rho` is the normalised cosine distance, `P` its tail
probability P(rho > delta), `VAR` the share of the text queries' attention on vision keys):

| decision at layer j | what is lost | condition (all must hold) |
|---|---|---|
| skip (all tokens) | layer j's update of every token | rho < epsilon, P < eta for vision and text |
| freeze vision (frozen late entry or layer) | layer j's update of vision tokens | vision rho < epsilon, P < eta |
| vision absent before k (late entry) | that update, and the vision keys text reads | as freeze, and VAR < tau |
| vision exits after m (j > m) | the vision keys text reads at j | VAR < tau |

Early exit needs only the attention condition: after the exit no later layer reads a vision token, so how much
layers m+1.. would have changed vision tokens cannot matter (the last layer's vision update, for one, is never read
by anything). Late entry k is the widest prefix of layers that all meet their condition, early exit m the widest
suffix, and skipped layers are every layer that meets its own. The thresholds are normalised so that a layer's
*cost* for a decision is max(rho / epsilon, P / eta, VAR / tau) over the conditions it needs: the decision is
allowed when the cost is below 1.

Label-free defaults, from what the numbers mean rather than from any score. An update u of a residual state x with
||u|| = r ||x||, orthogonal to x, gives rho = (1 - 1/sqrt(1 + r^2)) / 2, about r^2 / 4. epsilon = 0.015: on average
the layer changes the tokens by less than a quarter of their norm (r < 0.25). delta = 0.05 and eta = 0.1: fewer than
10 % of the tokens get an update of more than about 45 % of their norm. tau = 0.1: text puts under 10 % of its
attention on the image (the level LLaVA-1.5 falls to after its first layers). With `budget`, the thresholds are
scaled together by the smallest factor whose plan removes at least that fraction of prefill FLOPs, so layers join
in order of cost.

With `composed=True` the plan comes from measurements of the model instead (`skipit.composer`): decisions are
chosen by the KL they are measured to cost per FLOP they remove, and the composed plan's KL is measured on held-out
calibration examples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from skipit.errors import SkipitError
from skipit.flops import ideal_speedup, prompt_layout
from skipit.plan import MODES, Plan
from skipit.result import NO_SHAPE, AnalysisResult, as_result


@dataclass(frozen=True)
class Thresholds:
    epsilon: float = 0.015  # geometric: E[rho] below this
    delta: float = 0.05  # proximal: tokens with rho above this ...
    eta: float = 0.1  # ... are less than this fraction
    tau: float = 0.1  # attention: share of text attention on vision keys below this
    kappa: float = 0.02  # functional freezing: summed ablation KL (nats) of the frozen vision layers below this

    def scaled(self, s: float) -> Thresholds:
        return replace(self, epsilon=self.epsilon * s, eta=self.eta * s, tau=self.tau * s)


REASONS = {
    "epsilon": "rho < 0.015: on average the layer's update is under a quarter of the tokens' norm (rho ~ r^2 / 4)",
    "delta_eta": "P(rho > 0.05) < 0.1: fewer than 10 % of the tokens get an update over ~45 % of their norm",
    "tau": "text queries put under 10 % of their attention on vision keys (LLaVA-1.5's level after its first layers)",
}
KAPPA_REASON = ("summed ablation KL < 0.02 nats: by Pinsker's inequality the answer distribution moves by less than "
                "0.1 in total variation, if the frozen layers' effects add up")


@dataclass
class Costs:
    """Per layer, the normalised cost of each decision (allowed when < 1) and what it is made of."""

    skip: list[float]
    freeze: list[float]  # vision tokens not updated, still keys/values
    absent: list[float]  # vision tokens not there at all, before the late entry
    exit: list[float]  # vision tokens gone, after the early exit


def ablation_kl(analysis: AnalysisResult) -> dict[str, list[float]]:
    """Per modality, the ablation KL of each layer; empty unless the analysis was made with `analyze --ablation`."""
    return as_result(analysis).ablation_kl


def _tail(analysis: AnalysisResult, modality: str, delta: float) -> list[float]:
    tail = analysis.tail(modality, delta)
    if tail is None:
        measured = ", ".join(f"{d:g}" for d in analysis.tail_deltas)
        raise SkipitError(f"delta {delta} was not measured; the analysis has tail probabilities at {measured}")
    return tail


def _mean(analysis: AnalysisResult, name: str, modality: str) -> list[float]:
    series = analysis.measure(name, modality)
    if series is None:
        raise SkipitError(f"the analysis has no {name} for {modality} tokens: run skipit analyze again")
    return series.mean


def layer_costs(analysis: AnalysisResult, t: Thresholds) -> Costs:
    analysis = as_result(analysis)
    mods = analysis.modalities
    L = analysis.num_layers
    geo = {m: [r / t.epsilon for r in _mean(analysis, "rho", m)] for m in mods}
    prox = {m: [p / t.eta for p in _tail(analysis, m, t.delta)] for m in mods}
    per_mod = {m: [max(geo[m][j], prox[m][j]) for j in range(L)] for m in mods}
    skip = [max(per_mod[m][j] for m in mods) for j in range(L)]
    inf = [float("inf")] * L
    var = analysis.var
    if "vision" not in mods or var is None:  # text-only model: there are no vision decisions
        return Costs(skip, inf, inf, inf)
    attn = [v / t.tau for v in var.share.mean]
    freeze = per_mod["vision"]
    return Costs(skip, freeze, [max(f, a) for f, a in zip(freeze, attn, strict=True)], attn)


def mean_prompt(analysis: AnalysisResult) -> tuple[int, int]:
    """Average vision and text tokens per calibration prompt."""
    analysis = as_result(analysis)
    n = analysis.data.n_records
    count = {m: round(analysis.n_tokens(m) / n) for m in analysis.modalities}
    return count.get("vision", 0), count.get("text", 0)


def predicted(analysis: AnalysisResult, plan: Plan) -> dict:
    """Ideal speed-ups and FLOPs removed (prefill; the decode step's under its own name) by `plan` on the average
    calibration prompt (vision tokens first)."""
    analysis = as_result(analysis)
    n_vision, n_text = mean_prompt(analysis)
    return ideal_speedup(analysis.shape, plan, prompt_layout(n_vision, n_text), decode_steps=16)


def plan_from_costs(analysis: AnalysisResult, costs: Costs, mode: str | None = None, freeze_vision: bool = False,
                    kl: list[float] | None = None, kappa: float = 0.0) -> Plan:  # fmt: skip
    """The widest bands and every single layer whose decisions all cost < 1 (see the module docstring). With `kl`
    (functional freezing), vision tokens are frozen in the layers of k..m with the lowest `kl`, as many as keep the
    sum under `kappa`."""
    analysis = as_result(analysis)
    L = analysis.num_layers
    ok = {name: [c < 1 for c in getattr(costs, name)] for name in ("skip", "freeze", "absent", "exit")}
    skip = [j for j in range(L) if ok["skip"][j]]
    if len(skip) == L:  # keep the layer that is least redundant
        skip.remove(max(range(L), key=lambda j: costs.skip[j]))

    def prefix(allowed: list[bool]) -> int:  # late entry k: layers 0..k-1 all allowed (or skipped anyway)
        k = 0
        while k < L - 1 and (allowed[k] or k in skip):
            k += 1
        return k

    k_by_mode = {"absent": prefix(ok["absent"]), "frozen": prefix(ok["freeze"])}
    m = L - 1
    while m > 0 and (ok["exit"][m] or m in skip):
        m -= 1
    modes = [mode] if mode else list(MODES)
    best = None
    for md in modes:
        k = min(k_by_mode[md], m)
        frozen = [j for j in range(k, m + 1) if freeze_vision and ok["freeze"][j] and j not in skip]
        if kl is not None:
            frozen, total = [], 0.0
            for j in sorted((j for j in range(k, m + 1) if j not in skip), key=lambda j: kl[j]):
                if total + kl[j] >= kappa:
                    break
                frozen.append(j)
                total += kl[j]
        candidate = _plan(analysis, late_entry=k, late_entry_mode=md, early_exit=None if m == L - 1 else m,
                          skip_layers=skip, frozen_vision_layers=frozen)  # fmt: skip
        saving = predicted(analysis, candidate)["flops_removed"]
        if best is None or saving > best[0] + 1e-12:
            best = (saving, candidate)
    return best[1]


def _plan(analysis: AnalysisResult, **decisions) -> Plan:
    model = analysis.model
    if decisions.get("late_entry") == 0:
        decisions["late_entry_mode"] = "absent"
    return Plan(architecture=model.class_name, num_layers=model.num_layers, fingerprint=model.fingerprint,
                **decisions)  # fmt: skip


def make_plan(
    analysis: AnalysisResult,
    thresholds: Thresholds | None = None,
    budget: float | None = None,
    mode: str | None = None,
    freeze_vision: bool = False,
    functional: bool = False,
    composed: bool = False,
    model=None,
    processor=None,
    calib=None,
    compose_options: dict | None = None,
) -> Plan:
    """The plan the conditions allow (thresholds), or the cheapest-to-lose plan removing `budget` of prefill FLOPs.

    `analysis`: a `skipit.result.AnalysisResult` (`skipit.result.load(RUN_DIR)`), or the Analysis that
    `skipit.analyze` returns. `mode`: late entry mode ("absent" or "frozen"; default: whichever removes more FLOPs).
    `freeze_vision`: also freeze vision tokens in every layer between k and m that meets the freeze condition
    (ShortV-style).
    `functional`: freeze vision tokens by the functional condition instead, from an analysis made with `--ablation`:
    in the layers whose ablation KL for vision tokens is lowest, while its sum stays under `thresholds.kappa`.
    `composed`: the composed functional plan of `model` (with its `processor`) measured on the calibration records
    `calib` (`skipit.composer.compose_plan`, which `compose_options` go to: n_score, n_heldout, beam, shortlist,
    step, batch_size): with `budget`, the least KL with at least that share of the prefill FLOPs removed; without,
    the most FLOPs removed with a held-out KL of at most `thresholds.kappa`. The other conditions do not apply to it.
    """
    analysis = as_result(analysis, "make_plan")
    if composed:
        return _composed_plan(analysis, thresholds, budget, mode, freeze_vision, functional, model, processor, calib,
                              compose_options or {})  # fmt: skip
    if analysis.model.shape is None:
        raise SkipitError(NO_SHAPE)
    if mode is not None and mode not in MODES:
        raise SkipitError(f"late entry mode must be one of {', '.join(MODES)}, got {mode!r}")
    base = thresholds or Thresholds()
    kl = None
    if functional:
        if budget is not None:
            raise SkipitError("functional freezing has its own limit (kappa); it does not take a budget")
        kl = analysis.ablation_kl.get("vision")
        if kl is None:
            raise SkipitError("functional freezing needs the ablation KL of vision tokens: run skipit analyze "
                              "--ablation on a vision-language model")  # fmt: skip
    scale = 1.0
    if budget is not None:
        if not 0 < budget < 1:
            raise SkipitError(f"budget is a fraction of FLOPs to remove, in (0, 1); got {budget}")
        scale = _scale_for_budget(analysis, base, budget, mode, freeze_vision)
    t = base.scaled(scale)
    costs = layer_costs(analysis, t)
    plan = plan_from_costs(analysis, costs, mode, freeze_vision, kl, base.kappa)
    plan.evidence = _evidence(analysis, plan, base, scale, budget, costs)
    if kl is not None:
        plan.evidence["method"] += ", functional freezing"
        plan.evidence["reasons"] = {**plan.evidence["reasons"], "kappa": KAPPA_REASON}
        plan.evidence["functional"] = {"ablation_kl_vision": [round(v, 5) for v in kl],
                                       "frozen_sum": round(sum(kl[j] for j in plan.frozen_vision_layers), 5)}
    return plan


def _composed_plan(analysis: AnalysisResult, thresholds, budget, mode, freeze_vision, functional, model, processor,
                   calib, options: dict) -> Plan:  # fmt: skip
    from skipit.composer import compose_plan
    from skipit.plan import fingerprint

    if functional or freeze_vision or mode is not None:
        given = "functional" if functional else "freeze_vision" if freeze_vision else "mode"
        raise SkipitError(f"composed planning measures every decision itself; it does not take {given}")
    if model is None or processor is None or calib is None:
        raise SkipitError("composed planning runs the model: give model, processor and calib (calibration records)")
    if analysis.model.fingerprint not in (None, fingerprint(model)):
        raise SkipitError("the analysis is of other weights than the model (fingerprint differs): give this model's "
                          "analysis")  # fmt: skip
    kappa = None if budget is not None else (thresholds or Thresholds()).kappa
    plan = compose_plan(model, processor, calib, budget=budget, kappa=kappa, **options)
    plan.evidence["analysis"] = {"fingerprint": analysis.model.fingerprint, "data": analysis.data.to_dict(),
                                 "created": analysis.created}  # fmt: skip
    return plan


def _scale_for_budget(analysis: AnalysisResult, base: Thresholds, budget: float, mode, freeze_vision) -> float:
    """Smallest common scale of the thresholds whose plan removes >= budget of the prefill FLOPs."""
    unit = layer_costs(analysis, base)
    # the plan only changes where a layer's cost crosses 1, so the scale need only be tried at those values
    candidates = sorted({c for name in ("skip", "freeze", "absent", "exit") for c in getattr(unit, name)
                         if c != float("inf")})  # fmt: skip
    best_saving = 0.0
    for c in candidates:
        s = c * (1 + 1e-9)
        plan = plan_from_costs(analysis, layer_costs(analysis, base.scaled(s)), mode, freeze_vision)
        saving = predicted(analysis, plan)["flops_removed"]
        best_saving = max(best_saving, saving)
        if saving >= budget:
            return s
    raise SkipitError(
        f"no plan removes {budget:.0%} of the FLOPs (prefill); the most this analysis allows is {best_saving:.1%}"
    )


def _evidence(analysis: AnalysisResult, plan: Plan, base: Thresholds, scale: float, budget, costs: Costs) -> dict:
    pred = predicted(analysis, plan)
    n_vision, n_text = mean_prompt(analysis)
    roles = plan.roles()

    def rounded(xs):
        return [None if x == float("inf") else round(x, 4) for x in xs]

    return {
        "method": "skipit conditions" + (f", budget {budget}" if budget is not None else ""),
        "thresholds": asdict(base.scaled(scale)),
        "threshold_scale": scale,
        "reasons": REASONS if scale == 1.0 else {"budget": f"default thresholds x {scale:.3g} to remove {budget}"},
        "analysis": {"fingerprint": analysis.model.fingerprint, "data": analysis.data.to_dict(),
                     "created": analysis.created},
        "costs": {name: rounded(getattr(costs, name)) for name in ("skip", "freeze", "absent", "exit")},
        "roles": roles,
        "prompt": {"vision_tokens": n_vision, "text_tokens": n_text},
        "predicted": {k: round(v, 4) for k, v in pred.items()},
    }  # fmt: skip


# ---------------------------------------------------------------- what the measures predict for any plan

MEASURES = ("geometric", "angular", "proximal", "informational", "cka", "logit_lens", "var", "ablation_kl")


def layer_values(analysis: AnalysisResult, delta: float = 0.05) -> dict[str, dict[str, list[float]]]:
    """Per measure and modality, one value per layer, oriented so that larger means the layer matters more."""
    analysis = as_result(analysis)
    mods = analysis.modalities
    out: dict[str, dict[str, list[float]]] = {m: {} for m in MEASURES}
    for name in mods:
        out["geometric"][name] = _mean(analysis, "rho", name)
        out["angular"][name] = _mean(analysis, "angular", name)
        out["proximal"][name] = _tail(analysis, name, delta)
        info, cka = analysis.measure("informational", name), analysis.measure("cka", name)
        out["informational"][name] = info.mean if info is not None else None
        out["cka"][name] = [1 - c for c in cka.mean] if cka is not None else None
    lens = analysis.logit_lens("kl")
    ablation = analysis.ablation_kl
    for name in mods:
        out["ablation_kl"][name] = ablation.get(name)
    var = analysis.var
    for name in mods:  # answer-position measures: one value per layer, the same whichever tokens are skipped
        out["logit_lens"][name] = lens.mean if lens is not None else None
        out["var"][name] = var.share.mean if var and name == "vision" else [0.0] * analysis.num_layers
    return out


def predicted_damage(analysis: AnalysisResult, plan: Plan) -> dict[str, float | None]:
    """Per measure, the summed value of what `plan` removes: for a skipped layer, the token-weighted mean over the
    modalities; for a layer that vision tokens skip, the vision value (times the share pruned, for pruning). VAR
    counts the layers where text loses the vision keys (skipped, vision absent or pruned); for frozen vision layers
    text still reads them, so VAR adds nothing."""
    analysis = as_result(analysis)
    values = layer_values(analysis)
    weight = {m: analysis.n_tokens(m) for m in analysis.modalities}
    total = sum(weight.values())
    out: dict[str, float | None] = {}
    for measure in MEASURES:
        per = values[measure]
        if any(per[m] is None for m in per):
            out[measure] = None
            continue
        s = 0.0
        for j, role in enumerate(plan.roles()):
            if role == "skip" and measure == "var":  # text loses the vision keys (none in a text-only model)
                s += per["vision"][j] if "vision" in per else 0.0
            elif role == "skip":
                s += sum(per[m][j] * weight[m] for m in per) / total
            elif role in ("absent", "frozen") and "vision" in per:
                s += 0.0 if (measure == "var" and role == "frozen") else per["vision"][j]
            elif role == "pruned" and "vision" in per:  # the share of vision tokens pruning removes
                s += (1 - plan.prune_vision_keep) * per["vision"][j]
            elif role == "all" and "vision" in per and plan.input_vision_keep is not None:  # ... the input stage
                s += (1 - plan.input_vision_keep) * per["vision"][j]
        out[measure] = s
    return out


def is_safe(analysis: AnalysisResult, plan: Plan, thresholds: Thresholds | None = None) -> bool:
    """Whether every decision of `plan` meets its condition (module docstring) under `thresholds`."""
    costs = layer_costs(analysis, thresholds or Thresholds())
    m = plan.early_exit if plan.early_exit is not None else plan.num_layers - 1
    for j, role in enumerate(plan.roles()):
        absent = costs.exit[j] if j > m else costs.absent[j]
        # pruned vision tokens leave like an early exit: the exit condition (VAR) must hold for them
        cost = {"skip": costs.skip[j], "frozen": costs.freeze[j], "absent": absent, "pruned": costs.exit[j],
                "all": 0.0}[role]
        if cost >= 1:
            return False
    return True
