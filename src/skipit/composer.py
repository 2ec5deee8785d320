"""The composed functional planner: decisions chosen by the KL they are measured to cost, per FLOP they remove.

Where `skipit.planner` reads per-layer conditions off an analysis, this planner runs the model. What it measures is
one number per plan: the KL(untouched || plan) of the model's next-token distribution at the answer position (the
last prompt token), averaged over calibration examples, the quantity of `skipit.baselines.kl`. A decision is one
unit a plan can hold:

- `freeze j`: vision tokens are not updated by layer j (`frozen_vision_layers`);
- `exit m`: vision tokens leave after layer m (`early_exit`); its measured KL is the functional early-exit condition;
- `prune p f`: after layer p only the share f of the vision tokens that the ranker keeps goes on
  (`prune_vision_after`, `prune_vision_keep` and whatever ranker the plan offers); DivPrune's before layer 0 and
  one after a layer make a two-stage plan (`input_vision_keep`) when both join;
- `skip j`: layer j is not run at all (`skip_layers`);
- `enter k absent|frozen`: vision tokens enter at layer k (`late_entry`, `late_entry_mode`).

The search, top to bottom in `compose`:

1. Every decision alone is measured on the *scoring* examples: its KL and its share of prefill FLOPs removed. The
   decisions are ranked by KL per FLOP removed.
2. Greedy composition from the empty plan. At each step, the `shortlist` best-ranked decisions that still apply to
   the current plan (and remove more FLOPs) are added to it one at a time and each composed plan is measured on the
   scoring examples; the one with the least added KL per added FLOP joins the plan. With `beam` B > 1, B plans go
   on: each current plan's best child (so each goes on greedily), then the other children with the least added KL
   per FLOP; at the first step these are the B best decisions alone. Each plan that goes on is measured on the
   *held-out* examples, which never rank or choose a decision (with `kappa` they say where the search stops).
3. Stopping. `budget` F: a plan that removes at least F of the prefill FLOPs is finished and does not go on, nor
   does one whose KL on the scoring examples is already above a finished plan's; of the finished plans, the one
   with the least held-out KL is the plan (an error when none is); its pruning shares are
   then raised to the largest that still meet F (it may pass F by a whole decision), if that measures less KL.
   `kappa` K: a child whose held-out KL exceeds K does not go on, and the next child in the same order is tried in
   its place (up to the shortlist): the search stops when none of them stays within K, not at the first that
   breaks it (on mini-llava v3 the greedy child at 14.9 % broke K while smaller decisions still fitted). The plan
   is the one with the most FLOPs removed among those whose held-out KL stayed at most K (the empty plan when no
   decision does).

The plan's evidence holds the held-out KL of the composed plan with a bootstrap interval over examples, each
decision in the order it joined (its KL alone, what it added, the composed plan's KL on both sets and FLOPs
removed), the KL and FLOPs of every decision alone, and the cost of the search. The vision encoder runs once per
calibration record: every plan is measured from the same encoded inputs, since a plan changes only the language
backbone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import DynamicCache

from skipit.errors import SkipitError
from skipit.flops import batch_costs, largest_keep_share
from skipit.intervals import mean_interval
from skipit.plan import BEFORE_LAYERS, Plan
from skipit.prompts import caption_text, model_inputs, record_inputs
from skipit.replay import Recorder, replaying
from skipit.skipping import apply_plan, remove_plan

KAPPA = 0.02  # nats: the composed KL allowed when no budget is given (the functional planner's Pinsker argument)
KEEP_SHARES = (0.75, 0.5, 0.25, 0.125)  # the vision-token shares a pruning decision may keep
SEEDS = 2  # with a budget, the search also grows from this many large decisions alone (see `compose`)
SEARCH_VERSION = 6  # changes when the search itself does (a saved plan of another version is searched again)
MEASURE_VERSION = 1  # changes when what a plan's KL is does (KLs kept in a file under another are measured again)
MEASUREMENTS = "measurements.jsonl"  # the file a run folder keeps its composed search's KLs in (`Measurer.keep_in`)
NEAR_BUDGET = 0.9  # ... and from the least-KL decision that alone removes at least this share of the budget
N_SCORE, N_HELDOUT = 16, 16  # calibration examples that rank the decisions, and those that check the composed plan
SHORTLIST, BEAM = 6, 1
BAND_POSITIONS = 8  # by default, the band decisions (exit, entry, pruning) are tried at about this many layers
DECODE_STEPS = 16  # for the predicted decode-step saving, as in `skipit.planner.predicted`
PROMPTS = ("question", "caption")  # what the calibration records are asked (`calibration_inputs`)

# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Decision:
    """One unit of work a plan can remove. `kind`: freeze, exit, prune, skip or enter."""

    kind: str
    layer: int
    mode: str | None = None  # enter: absent or frozen
    keep: float | None = None  # prune: the share of vision tokens kept
    ranker: str | None = None  # prune: how the kept tokens are chosen (when the plan offers a choice)

    @property
    def name(self) -> str:
        name = f"{self.kind} {self.layer}"
        if self.kind == "enter":
            name += f" {self.mode}"
        if self.kind == "prune":
            name += f" keep {self.keep:g}" + (f" {self.ranker}" if self.ranker else "")
        return name

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def apply(self, fields: dict) -> dict | None:
        """The plan's decisions `fields` with this one added, or None where it does not apply (already there,
        covered by what the plan removes, or in conflict with it). `Plan` checks the rest."""
        f = dict(fields)
        j = self.layer
        last = f["early_exit"] if f["early_exit"] is not None else math.inf
        prune = f["prune_vision_after"]
        if self.kind == "freeze":
            if j in f["skip_layers"] or j in f["frozen_vision_layers"] or not f["late_entry"] <= j <= last:
                return None
            f["frozen_vision_layers"] = (*f["frozen_vision_layers"], j)
        elif self.kind == "skip":
            if j in f["skip_layers"]:
                return None
            f["skip_layers"] = (*f["skip_layers"], j)
            f["frozen_vision_layers"] = tuple(i for i in f["frozen_vision_layers"] if i != j)
        elif self.kind == "exit":
            if j >= last:
                return None
            f["early_exit"] = j
            f["frozen_vision_layers"] = tuple(i for i in f["frozen_vision_layers"] if i <= j)
        elif self.kind == "enter":
            if f["late_entry"] and (j <= f["late_entry"] or self.mode != f["late_entry_mode"]):
                return None
            f["late_entry"], f["late_entry_mode"] = j, self.mode
            f["frozen_vision_layers"] = tuple(i for i in f["frozen_vision_layers"] if i >= j)
        elif self.kind == "prune":
            if (two := self._second_stage(f)) is not None:
                return two
            if prune is not None and not (prune == j and self.keep < f["prune_vision_keep"]
                                          and (self.ranker or "attention") == f.get("prune_vision_rank",
                                                                                    "attention")):  # fmt: skip
                return None
            f["prune_vision_after"], f["prune_vision_keep"] = j, self.keep
            if self.ranker is not None:
                f["prune_vision_rank"] = self.ranker
        else:
            raise ValueError(f"unknown decision kind {self.kind!r}")
        return f

    def _second_stage(self, fields: dict) -> dict | None:
        """Two stages: DivPrune before layer 0 (`input_vision_keep`) with pruning after a layer, whichever joins
        first (`Plan` checks that pruning keeps fewer than entered); a lower input share for a plan with both. None
        where this pruning decision is not one of those."""
        f, before = dict(fields), self.layer == BEFORE_LAYERS
        p, g = f["prune_vision_after"], f.get("input_vision_keep")
        if p is None or (g is None and (p == BEFORE_LAYERS) == before) or (before and self.ranker != "divprune"):
            return None
        if before:  # the input stage joins a plan that prunes after a layer, or lowers its share
            if g is not None and self.keep >= g:
                return None
            f["input_vision_keep"] = self.keep
        elif g is None:  # pruning after a layer joins a plan that prunes before layer 0 (DivPrune)
            f["input_vision_keep"] = f["prune_vision_keep"]
            f["prune_vision_after"], f["prune_vision_keep"] = self.layer, self.keep
            f["prune_vision_rank"] = self.ranker or "attention"
        else:
            return None  # both stages are there: a lower share after the same layer is the plain rule
        return f


def plan_fields(plan: Plan) -> dict:
    """The decisions of `plan` as keyword arguments of `Plan.with_decisions`."""
    d = plan.to_dict()
    names = {f.name for f in dataclasses.fields(Plan)} - {"architecture", "num_layers", "fingerprint", "evidence"}
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}


def prune_options() -> tuple[tuple[str | None, ...], tuple[int, ...]]:
    """The rankings a pruning decision may use (None: the plan offers only FastV's attention ranking) and where
    pruning may start besides the decoder layers (the plan's index for "before layer 0", where it has one). Which
    ranking may start where is the plan's rule: a combination it refuses is not a candidate."""
    import skipit.plan as plan_module

    rankers = tuple(getattr(plan_module, "RANKS", ())) or (None,)
    before = getattr(plan_module, "BEFORE_LAYERS", None)
    return rankers, (before,) if before is not None else ()


def band_step(num_layers: int, step: int | None = None) -> int:
    """The layer spacing of the band decisions: `step`, or about num_layers / BAND_POSITIONS."""
    return step if step is not None else max(1, round(num_layers / BAND_POSITIONS))


def candidates(num_layers: int, step: int | None = None, keep_shares: Sequence[float] = KEEP_SHARES) -> list[Decision]:
    """Every decision on a model of `num_layers` layers. Freezing and skipping are tried at every layer; the band
    decisions (exit, entry, pruning) at every `step`-th layer (`band_step`)."""
    L = num_layers
    band = range(0, L - 1, band_step(L, step))
    rankers, before = prune_options()
    out = [Decision("freeze", j) for j in range(L)]
    out += [Decision("skip", j) for j in range(L)]
    out += [Decision("exit", m) for m in band]
    out += [Decision("enter", k, mode=md) for md in ("absent", "frozen") for k in band if k > 0]
    out += [Decision("prune", p, keep=f, ranker=r) for r in rankers for p in (*before, *band) for f in keep_shares]
    return out


# ---------------------------------------------------------------- what is measured


class Measurer:
    """Measures plans: `kl(plan, split)` per example of the "score" or "heldout" records, `saving(plan)` the share
    of prefill FLOPs removed. Results are kept per plan, so a plan is measured once per split; with `keep_in`, also
    in a file, so a search run again (a sweep resumed, more budgets) reads them instead of running the model."""

    def __init__(self, kl: Callable[[Plan, str], list[float]], saving: Callable[[Plan], float]):
        self._kl, self._saving = kl, saving
        self._cache: dict = {}
        self._stored: dict = {}  # read from the file, not yet asked for
        self._store: tuple | None = None  # (path, context digest)
        self.measured = {"score": 0, "heldout": 0}  # plans the search asked for on each split
        self.reused = 0  # of those, read from the file instead of run
        self.on_measure: Callable[[], None] | None = None  # told after each plan run (progress)

    def keep_in(self, path, context: dict) -> None:
        """Keep the KLs measured in the file `path` (JSON lines, appended as they are measured) and read those
        measured there before under the same `context` (model, records, settings, `MEASURE_VERSION`); other
        lines, and a last line cut short by a stopped run, are passed over."""
        path, digest = Path(path), _digest(context)
        self._store = (path, digest)
        if not path.is_file():
            return
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                if row["context"] == digest:
                    self._stored[(row["split"], row["plan"])] = [float(v) for v in row["kl"]]
            except (ValueError, KeyError, TypeError):
                continue

    def kl(self, plan: Plan, split: str) -> list[float]:
        key = (split, _key(plan))
        if key not in self._cache:
            self.measured[split] += 1
            if key in self._stored:
                self._cache[key] = self._stored.pop(key)
                self.reused += 1
                return self._cache[key]
            self._cache[key] = self._kl(plan, split)
            if self._store is not None:
                path, digest = self._store
                path.parent.mkdir(parents=True, exist_ok=True)
                with path.open("a") as f:  # one whole line per write: a stopped run loses at most that line
                    f.write(json.dumps({"context": digest, "split": split, "plan": key[1], "kl": self._cache[key]})
                            + "\n")  # fmt: skip
            if self.on_measure:
                self.on_measure()
        return self._cache[key]

    def mean_kl(self, plan: Plan, split: str) -> float:
        values = self.kl(plan, split)
        return sum(values) / len(values)

    def saving(self, plan: Plan) -> float:
        key = ("saving", _key(plan))
        if key not in self._cache:
            self._cache[key] = self._saving(plan)
        return self._cache[key]


def _key(plan: Plan) -> str:
    return json.dumps(plan_fields(plan), sort_keys=True)


def _digest(context: dict) -> str:
    return hashlib.sha256(json.dumps(context, sort_keys=True).encode()).hexdigest()[:16]


def encode(model, inputs: dict) -> dict:
    """`inputs` with the pixels replaced by the vision encoder's output, as generate() does before the prefill, so
    that the encoder runs once; models that cannot take encoded inputs keep their pixels."""
    supports = getattr(model, "_supports_mm_encoder_outputs", None)
    modalities = set(getattr(model, "input_modalities", ())) & {"image", "video"}
    if supports is None or not supports() or not modalities:
        return dict(inputs)
    with torch.inference_mode():
        return model._prepare_multimodal_encoder_kwargs_for_generation(dict(inputs))


def calibration_inputs(processor, rows: Sequence, prompt: str = "question", device=None) -> dict:
    """Model inputs of calibration records asked `prompt` (`PROMPTS`): their VQA question, or for a caption."""
    check_kl(1, prompt)
    if prompt == "question":
        return record_inputs(processor, rows, device=device)
    return model_inputs(processor, [caption_text(processor)] * len(rows), [r.load_image() for r in rows],
                        device=device)  # fmt: skip


class ModelMeasurer(Measurer):
    """KL and FLOPs of plans of `model` on two sets of calibration records, from inputs encoded once.

    `tokens` T: the KL is the mean over the first T tokens of the untouched model's greedy reply (T = 1: the answer
    token alone). The reply is generated once; under each plan it is teacher-forced: the prompt's prefill, then
    the reply's tokens in one call that continues the plan's cache, as a plan's decoding does (the tokens a pruned
    or exited vision token would have been attended by see it gone). Positions past the reply's end-of-text token
    do not count.

    The layers a plan leaves as they are, before its first change, replay the untouched model's prefill instead of
    running again (`skipit.replay`): a decision at layer j costs the layers from j on."""

    def __init__(self, model, processor, score: Sequence, heldout: Sequence, batch_size: int = 16,
                 replay: bool = True, batches: dict[str, list[dict]] | None = None, tokens: int = 1,
                 prompt: str = "question"):  # fmt: skip
        """`batches`: {"score": [...], "heldout": [...]} model inputs, instead of the records' (`processor`, `score`
        and `heldout` are then not read)."""
        check_kl(tokens, prompt)
        self.model, self.replay, self.tokens = model, replay, tokens
        self.batches = batches or {
            split: [encode(model, calibration_inputs(processor, rows[i:i + batch_size], prompt, model.device))
                    for i in range(0, len(rows), batch_size)]
            for split, rows in (("score", score), ("heldout", heldout))}  # fmt: skip
        self.recorders = {split: Recorder(model) for split in self.batches}
        # per batch: the reply tokens fed back after the prompt (batch, T - 1) and the positions that count (batch, T)
        self.replies = {split: [self._greedy_reply(b) for b in batches] for split, batches in self.batches.items()}
        self.reference = {split: self._logprobs(split, None) for split in self.batches}
        self.plain_prefill = sum(batch_costs(model, b, None, 1)["prefill"] for b in self._all())
        super().__init__(self._measure_kl, self._measure_saving)

    def _all(self) -> list[dict]:
        return [b for batches in self.batches.values() for b in batches]

    @torch.inference_mode()
    def _greedy_reply(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The untouched model's greedy reply to `batch`, one token at a time from its cache: the T - 1 tokens fed
        back (the last one predicted is never fed), and whether each of the T predictions comes before the row's
        end-of-text token (the answer token always does)."""
        B = batch["input_ids"].shape[0]
        fed = torch.zeros(B, 0, dtype=torch.long, device=self.model.device)
        if self.tokens > 1:
            cache, mask = DynamicCache(config=self.model.config), batch["attention_mask"]
            logits = self.model(**batch, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
            for _ in range(self.tokens - 1):
                fed = torch.cat([fed, logits.argmax(-1, keepdim=True)], 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
                logits = self.model(input_ids=fed[:, -1:], attention_mask=mask, past_key_values=cache,
                                    use_cache=True).logits[:, -1]  # fmt: skip
        eos = self.model.generation_config.eos_token_id
        eos = torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=fed.device)
        ended = torch.isin(fed, eos).cumsum(1) > 0  # an end-of-text token fed at or before this position
        return fed, torch.cat([torch.ones(B, 1, dtype=torch.bool, device=fed.device), ~ended], 1)

    def _reply_logprobs(self, batch: dict, fed: torch.Tensor) -> torch.Tensor:
        """(batch, T, vocab) log-probabilities of the reply's T tokens: the prompt's prefill, then `fed` in one call."""
        if fed.shape[1] == 0:
            return torch.log_softmax(self.model(**batch, logits_to_keep=1).logits[:, -1:].float(), -1)
        cache = DynamicCache(config=self.model.config)
        first = self.model(**batch, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1:]
        mask = torch.cat([batch["attention_mask"], torch.ones_like(fed)], 1)
        rest = self.model(input_ids=fed, attention_mask=mask, past_key_values=cache, use_cache=True).logits
        return torch.log_softmax(torch.cat([first, rest], 1).float(), -1)

    @torch.inference_mode()
    def _logprobs(self, split: str, plan: Plan | None) -> list[torch.Tensor]:
        if plan is None:  # the untouched model, recorded for the plans' replays (its prefill calls only)
            context = self.recorders[split]
        else:
            apply_plan(self.model, plan)
            context = replaying(self.model, self.recorders[split] if self.replay else None)
        try:
            with context:
                return [self._reply_logprobs(b, fed) for b, (fed, _) in zip(self.batches[split], self.replies[split],
                                                                              strict=True)]  # fmt: skip
        finally:
            if plan is not None:
                remove_plan(self.model)

    def _measure_kl(self, plan: Plan, split: str) -> list[float]:
        out = []  # KL(untouched || plan) per example, in nats: the mean over the reply's positions that count
        for p, q, (_, counts) in zip(self.reference[split], self._logprobs(split, plan), self.replies[split],
                                     strict=True):  # fmt: skip
            kl = (p.exp() * (p - q)).sum(-1)  # (batch, T)
            out += ((kl * counts).sum(1) / counts.sum(1)).tolist()
        return out

    def _measure_saving(self, plan: Plan) -> float:
        return 1 - sum(batch_costs(self.model, b, plan, 1)["prefill"] for b in self._all()) / self.plain_prefill

    def predicted(self, plan: Plan) -> dict:
        """Ideal speed-ups and FLOPs removed on the calibration prompts, with the keys of `planner.predicted`."""
        base, mine = ({k: sum(batch_costs(self.model, b, p, DECODE_STEPS + 1)[k] for b in self._all())
                       for k in ("prefill", "decode", "kv_bytes")} for p in (None, plan))  # fmt: skip
        return {"prefill": base["prefill"] / mine["prefill"], "decode": base["decode"] / mine["decode"],
                "kv_memory": mine["kv_bytes"] / base["kv_bytes"],
                "flops_removed": 1 - mine["prefill"] / base["prefill"],
                "decode_flops_removed": 1 - mine["decode"] / base["decode"]}  # fmt: skip


# ---------------------------------------------------------------- the search


@dataclass
class State:
    """A plan on the search path: the decisions it was built from, in order, and what was measured on it."""

    plan: Plan
    decisions: tuple[Decision, ...] = ()
    kl: float = 0.0  # mean KL on the scoring examples
    saving: float = 0.0  # share of prefill FLOPs removed
    ratio: float = 0.0  # KL added per FLOP added by its last decision (scoring examples)
    heldout: list[float] | None = None  # per held-out example KL
    steps: list[dict] = field(default_factory=list)  # what each decision did, in order

    @property
    def heldout_kl(self) -> float:
        return sum(self.heldout) / len(self.heldout)


@dataclass(frozen=True)
class Alone:
    decision: Decision
    kl: float
    saving: float

    @property
    def ratio(self) -> float:
        return max(self.kl, 0.0) / self.saving


def budget_shares(measurer: Measurer, empty: Plan, pool: Sequence[Decision], budget: float) -> list[Decision]:
    """For each place and ranking a pruning decision in `pool` takes, pruning there to the largest share kept that
    alone removes `budget` (bisection on the FLOPs, as the token-pruning baselines are given their share at a budget).
    With the fixed shares only, a budget just past one (50 % against 49.3 % for 12.5 % kept before layer 0 on
    mini-llava) could be reached only by adding a whole layer to it."""
    out = []
    for layer, ranker in sorted({(d.layer, d.ranker) for d in pool if d.kind == "prune"}, key=str):
        def meets(keep: float, layer: int = layer, ranker: str | None = ranker) -> bool:
            plan = _with(empty, Decision("prune", layer, keep=keep, ranker=ranker), plan_fields(empty))
            return plan is not None and measurer.saving(plan) >= budget

        if (share := largest_keep_share(meets)) is None:
            continue
        keep = math.floor(share * 1e4) / 1e4  # a readable share that keeps no more, so still meets the budget
        if not any(d.kind == "prune" and (d.layer, d.ranker) == (layer, ranker) and d.keep >= keep - 1e-3
                   and meets(d.keep) for d in pool):  # fmt: skip  # (a fixed share already meets it)
            out.append(Decision("prune", layer, keep=keep, ranker=ranker))
    return out


def score_alone(measurer: Measurer, empty: Plan, pool: Sequence[Decision]) -> list[Alone]:
    """Each decision that applies to the empty plan, measured alone on the scoring examples, ranked by KL per FLOP
    removed (then by FLOPs removed, most first)."""
    out = []
    for d in pool:
        plan = _with(empty, d, plan_fields(empty))
        if plan is None or (s := measurer.saving(plan)) <= 0 or (k := _score(measurer, plan)) is None:
            continue
        out.append(Alone(d, k, s))
    return sorted(out, key=lambda a: (a.ratio, -a.saving))


def _score(measurer: Measurer, plan: Plan) -> float | None:
    """Mean KL on the scoring examples; None when the engine refuses the plan on this model (a ranking the family
    cannot compute, say): such a plan is not a candidate."""
    try:
        return measurer.mean_kl(plan, "score")
    except SkipitError:
        return None


def _with(empty: Plan, d: Decision, fields: dict) -> Plan | None:
    new = d.apply(fields)
    return None if new is None else _plan(empty, new)


def _plan(empty: Plan, fields: dict) -> Plan | None:
    """The plan of `fields` for `empty`'s model, or None where the plan cannot hold them."""
    try:
        return empty.with_decisions(**fields)
    except SkipitError:  # e.g. every layer skipped, or a frozen layer after the pruning layer
        return None


def _children(measurer: Measurer, empty: Plan, state: State, ranking: Sequence[Alone], shortlist: int) -> list[State]:
    """The current plan with each of the `shortlist` best-ranked decisions that still apply and remove more."""
    out = []
    fields = plan_fields(state.plan)
    for alone in ranking:
        if len(out) == shortlist:
            break
        plan = _with(empty, alone.decision, fields)
        if plan is None or (s := measurer.saving(plan)) <= state.saving + 1e-12:
            continue
        if (k := _score(measurer, plan)) is None:
            continue
        ratio = max(k - state.kl, 0.0) / (s - state.saving)
        entry = {"decision": alone.decision.to_dict(), "name": alone.decision.name,
                 "alone": {"kl": _r(alone.kl), "flops_removed": _r(alone.saving)},
                 "added": {"kl": _r(k - state.kl), "flops_removed": _r(s - state.saving)}}  # fmt: skip
        out.append(State(plan, (*state.decisions, alone.decision), k, s, ratio, None, state.steps + [entry]))
    return out


def _next_beam(measurer: Measurer, empty: Plan, frontier: Sequence[State], ranking: Sequence[Alone],
               shortlist: int, beam: int, fits: Callable[[State], bool]) -> list[State]:  # fmt: skip
    """The plans that go on: each current plan's child with the least added KL per added FLOP (so each plan goes
    on greedily, and with `beam` 1 this is the greedy rule), then, up to `beam` plans, the other children with the
    least added KL per FLOP. A plan reached from two current plans counts once. A child that does not `fit` (with
    kappa: its held-out KL is above it) is passed over for the next in the same order; `fits` is asked only of the
    children that would otherwise go on, in order, since it runs the plan on the held-out examples."""
    def order(c: State):
        return c.ratio, -c.saving

    families = [sorted(_children(measurer, empty, state, ranking, shortlist), key=order) for state in frontier]
    kept, seen, rest = [], set(), []

    def take(children: Sequence[State], one: bool) -> None:  # in order; `one`: stop at the first taken
        for i, child in enumerate(children):
            if len(kept) == beam:
                return
            if (key := _key(child.plan)) in seen:
                continue
            seen.add(key)  # asked once, whether it fits or not
            if fits(child):
                kept.append(child)
                if one:
                    rest.extend(children[i + 1:])
                    return

    for family in families:
        take(family, one=True)
    take(sorted(rest, key=order), one=False)
    return kept


def _seed(empty: Plan, alone: Alone) -> State:
    """A search's start: the plan of one decision alone, measured as such in the ranking."""
    entry = {"decision": alone.decision.to_dict(), "name": alone.decision.name,
             "alone": {"kl": _r(alone.kl), "flops_removed": _r(alone.saving)},
             "added": {"kl": _r(alone.kl), "flops_removed": _r(alone.saving)}}  # fmt: skip
    plan = _with(empty, alone.decision, plan_fields(empty))
    return State(plan, (alone.decision,), alone.kl, alone.saving, alone.ratio, None, [entry])


def compose(measurer: Measurer, empty: Plan, budget: float | None = None, kappa: float | None = None,
            beam: int = BEAM, shortlist: int = SHORTLIST, step: int | None = None,
            pool: Sequence[Decision] | None = None, seeds: int = SEEDS,
            keep_shares: Sequence[float] = KEEP_SHARES) -> tuple[State, dict]:  # fmt: skip
    """The composed plan (module docstring) as the last `State` of its search, and the search's record: every
    decision alone, and the plans measured on the held-out examples in the order they were."""
    budget, kappa = check_objective(budget, kappa)
    check_search(beam, shortlist, step)
    pool = list(pool if pool is not None else candidates(empty.num_layers, step, keep_shares))
    if budget is not None:
        pool += budget_shares(measurer, empty, pool, budget)
    ranking = score_alone(measurer, empty, pool)
    root = State(empty, heldout=measurer.kl(empty, "heldout"))
    finished, feasible, path = [], [root], []

    def measured(child: State) -> State:  # each plan that goes on (or, with kappa, is tried), held out
        child.heldout = measurer.kl(child.plan, "heldout")
        composed = {"kl_score": _r(child.kl), "kl_heldout": _r(child.heldout_kl), "flops_removed": _r(child.saving)}
        child.steps[-1]["composed"] = composed
        path.append({"decisions": [d.name for d in child.decisions], **composed})
        return child

    def fits(child: State) -> bool:  # measured held out; with kappa, a child above it is passed over (`_next_beam`)
        heldout_kl = measured(child).heldout_kl
        return budget is not None or heldout_kl <= kappa

    def goes_on(kept: list[State]) -> list[State]:
        nonlocal finished
        if budget is not None:
            finished += [c for c in kept if c.saving >= budget]
            best = min((c.kl for c in finished), default=math.inf)
            return [c for c in kept if c.saving < budget and c.kl < best]
        feasible.extend(kept)  # each within kappa (`fits`)
        return kept

    # With a budget, the search also grows from the `seeds` decisions that alone remove at least half of it at the
    # least KL: ranked by KL per FLOP, such a decision (most vision tokens pruned, say) comes after many small ones,
    # and once those fill the plan it may no longer apply, though alone it is the cheapest way to a large budget.
    # Also from the least-KL decision that alone comes within 10 % of the budget (DivPrune's keep 12.5 % before layer
    # 0, say): seeded only from the larger halves, the search reached 50 % on mini-llava by pruning after layer 4 and
    # then skipping layers, at three times that decision's KL (docs/planning.md).
    def least_kl(share: float, n: int) -> list[Alone]:
        return sorted((a for a in ranking if a.saving >= share * budget), key=lambda a: (a.kl, -a.saving))[:n]

    big = []
    if budget is not None and seeds:
        big = least_kl(0.5, seeds)
        big += [a for a in least_kl(NEAR_BUDGET, 1) if a not in big]
    for start in [None, *big]:
        frontier = [root] if start is None else goes_on([measured(_seed(empty, start))])
        while frontier:
            frontier = goes_on(_next_beam(measurer, empty, frontier, ranking, shortlist, beam, fits))
    record = {"alone": ranking, "path": path}
    if budget is not None:
        if not finished:
            most = max((p["flops_removed"] for p in path), default=0.0)
            raise SkipitError(f"no composed plan removes {budget:.0%} of the prefill FLOPs; the search reached "
                              f"{most:.1%} (step 1 or a wider shortlist may reach further)")  # fmt: skip
        # chosen on the held-out examples alone: a plan the greedy search built step by step on the scoring examples
        # measures optimistically there, the more so the more steps it took (at 50 % on mini-llava an eleven-step
        # plan beat DivPrune's one decision on the sum of both sets and lost on the held-out ones; docs/planning.md)
        chosen = min(finished, key=lambda c: (c.heldout_kl, -c.saving))
        return fit_to_budget(measurer, chosen, budget), record
    return max(feasible, key=lambda c: (c.saving, -c.heldout_kl)), record


def fit_to_budget(measurer: Measurer, state: State, budget: float) -> State:
    """The chosen plan with its pruning shares raised to the largest that still remove `budget`; a plan that prunes
    nothing is returned as it was.

    A composed plan passes its budget by up to a whole decision (33.6 % for 30 % on mini-llava v3), where the
    token-pruning baselines are given the share that meets it exactly. The second stage's share is raised first
    (below the input stage's), then the input stage's; only FLOPs are computed for that, then the fitted plan is
    measured once on each set, for the record. It is taken whatever it measures: each stage's rankings keep a
    superset of the tokens they kept, and the plan it replaces was chosen as the least KL of many, so measures
    optimistically (on mini-llava v3 the fit measured more KL at 40 % on both searches, and scored 1 point more
    accuracy on the test questions at 40 % and 2 at 50 %; docs/planning.md)."""
    plan = state.plan
    if plan.prune_vision_after is None:
        return state
    fields = plan_fields(plan)
    for name in ("prune_vision_keep", "input_vision_keep"):
        if fields.get(name) is None:
            continue

        def meets(share: float, name: str = name) -> bool:
            candidate = _plan(plan, {**fields, name: share})
            return candidate is not None and measurer.saving(candidate) >= budget

        share = largest_keep_share(meets, lo=fields[name]) or 0.0  # from the plan's own share, which meets it
        fields[name] = max(fields[name], math.floor(share * 1e4) / 1e4)  # readable, and no more than meets it
    fitted = plan.with_decisions(**fields)
    if fitted == plan:
        return state
    kl, heldout = measurer.mean_kl(fitted, "score"), measurer.kl(fitted, "heldout")
    saving, heldout_kl = measurer.saving(fitted), sum(heldout) / len(heldout)
    shares = {k: fields[k] for k in ("input_vision_keep", "prune_vision_keep") if fields.get(k) is not None}
    step = {"name": "shares fitted to the budget", "shares": shares,
            "added": {"kl": _r(kl - state.kl), "flops_removed": _r(saving - state.saving)},
            "composed": {"kl_score": _r(kl), "kl_heldout": _r(heldout_kl), "flops_removed": _r(saving)}}
    return State(fitted, state.decisions, kl, saving, state.ratio, heldout, [*state.steps, step])


def check_objective(budget: float | None, kappa: float | None) -> tuple[float | None, float | None]:
    """(budget, kappa) with the default: kappa = KAPPA when neither is given."""
    if budget is not None and kappa is not None:
        raise SkipitError("give one of budget (the FLOPs to remove) and kappa (the KL allowed), not both")
    if budget is not None and not 0 < budget < 1:
        raise SkipitError(f"budget is a fraction of the prefill FLOPs to remove, in (0, 1); got {budget:g}")
    if kappa is not None and not kappa > 0:
        raise SkipitError(f"kappa is the composed KL allowed, in nats, above 0; got {kappa:g}")
    return budget, (KAPPA if budget is None and kappa is None else kappa)


def check_search(beam: int, shortlist: int, step: int | None) -> None:
    for name, value in (("beam", beam), ("shortlist", shortlist), ("step", step)):
        if value is not None and value < 1:
            raise SkipitError(f"{name} must be at least 1")


def check_kl(tokens: int, prompt: str) -> None:
    """What the KL is measured on: at least one token of the reply, to a prompt in `PROMPTS`."""
    if tokens < 1:
        raise SkipitError(f"--kl-tokens must be at least 1, got {tokens}")
    if prompt not in PROMPTS:
        raise SkipitError(f"unknown --kl-prompt {prompt!r}; available: {', '.join(PROMPTS)}")


# ---------------------------------------------------------------- the API


def compose_plan(model, processor, records: Sequence, budget: float | None = None, kappa: float | None = None, *,
                 n_score: int | None = None, n_heldout: int | None = None, beam: int = BEAM,
                 shortlist: int = SHORTLIST, step: int | None = None, batch_size: int = 16, tokens: int = 1,
                 prompt: str = "question") -> Plan:  # fmt: skip
    """The composed functional plan of `model` (module docstring) from calibration `records` (no answers needed):
    the first `n_score` rank the decisions, the next `n_heldout` measure the composed plans (default, when neither is
    given: half and half of the records; when one is, 16 for the other). `budget`: the least KL with at least that
    share of the prefill FLOPs removed; `kappa`: the most FLOPs removed with a held-out KL of at most kappa nats (the
    default, kappa = 0.02).
    `tokens`, `prompt`: the KL is the mean over the first `tokens` tokens of the untouched model's greedy reply to
    the records asked `prompt` ("question": their VQA question; "caption": for a caption); see `ModelMeasurer`."""
    check_objective(budget, kappa)
    composer = Composer(model, processor, records, n_score=n_score, n_heldout=n_heldout, beam=beam,
                        shortlist=shortlist, step=step, batch_size=batch_size, tokens=tokens,
                        prompt=prompt)  # fmt: skip
    return composer.plan(budget=budget, kappa=kappa)


class Composer:
    """Composed plans of one model for several objectives (budgets, kappas), sharing every measurement: a plan is
    measured once per set of examples, whichever search asks for it (the decisions alone, above all). The model
    runs only when a plan is searched for (`measurer`), not to check a saved one (`made_here`)."""

    def __init__(self, model, processor, records: Sequence, *, n_score: int | None = None,
                 n_heldout: int | None = None, beam: int = BEAM, shortlist: int = SHORTLIST, step: int | None = None,
                 batch_size: int = 16, seeds: int = SEEDS, keep_shares: Sequence[float] = KEEP_SHARES,
                 tokens: int = 1, prompt: str = "question", on_measure: Callable[[], None] | None = None,
                 store=None):  # fmt: skip
        """`tokens`, `prompt`: what the KL is measured on (`ModelMeasurer`, `calibration_inputs`). `on_measure()` is
        called after each plan the search runs (a progress display). `store`: a file that keeps every KL measured,
        read back by a later composer of the same model, records and settings (`Measurer.keep_in`)."""
        from skipit.analysis import records_digest

        check_search(beam, shortlist, step)
        check_kl(tokens, prompt)
        if seeds < 0 or not keep_shares or not all(0 < f < 1 for f in keep_shares):
            raise SkipitError("seeds must be at least 0 and every keep share in (0, 1)")
        self.score, self.heldout = split_records(records, n_score, n_heldout)
        self.digest = records_digest([*self.score, *self.heldout])
        self.tokens, self.prompt = tokens, prompt
        self.empty = Plan.for_model(model)
        self.search = {"beam": beam, "shortlist": shortlist, "step": band_step(self.empty.num_layers, step),
                       "seeds": seeds, "keep_shares": list(keep_shares), "version": SEARCH_VERSION}  # fmt: skip
        self._measurer_args = (model, processor, batch_size, on_measure)
        self._measurer: ModelMeasurer | None = None
        self.store = store
        self.context = {"version": MEASURE_VERSION, "model": self.empty.fingerprint, "records": self.digest,
                        "n_score": len(self.score), "tokens": tokens, "prompt": prompt, "batch_size": batch_size,
                        "dtype": str(model.dtype), "device": str(model.device), "torch": torch.__version__,
                        "transformers": transformers.__version__}  # fmt: skip
        self.seconds = 0.0

    @property
    def measurer(self) -> ModelMeasurer:
        """The calibration records encoded and the untouched model's replies measured, on first use."""
        if self._measurer is None:
            start = time.perf_counter()
            model, processor, batch_size, on_measure = self._measurer_args
            self._measurer = ModelMeasurer(model, processor, self.score, self.heldout, batch_size,
                                           tokens=self.tokens, prompt=self.prompt)  # fmt: skip
            self._measurer.on_measure = on_measure
            if self.store is not None:
                self._measurer.keep_in(self.store, self.context)
            self.seconds += time.perf_counter() - start
        return self._measurer

    def plan(self, budget: float | None = None, kappa: float | None = None) -> Plan:
        budget, kappa = check_objective(budget, kappa)
        start = time.perf_counter()
        measurer = self.measurer
        state, record = compose(measurer, self.empty, budget, kappa, **{k: v for k, v in self.search.items()
                                                                       if k != "version"})  # fmt: skip
        plan = self.empty.with_decisions(**plan_fields(state.plan))
        plan.evidence = evidence(state, record, measurer, budget, kappa, dict(self.search), self.score,
                                 self.heldout, self.tokens, self.prompt)  # fmt: skip
        plan.evidence["calibration"]["digest"] = self.digest
        self.seconds += time.perf_counter() - start
        plan.evidence["search"]["seconds"] = round(self.seconds, 2)  # so far, measurements shared with earlier plans
        plan.evidence["predicted"] = {k: round(v, 4) for k, v in measurer.predicted(plan).items()}
        return plan

    def made_here(self, plan: Plan, budget: float | None = None, kappa: float | None = None) -> bool:
        """Whether `plan` (a saved one) is what `self.plan(budget, kappa)` returns: this model, objective and KL,
        the same calibration records split the same way, the same search settings and search version. The search
        is deterministic, so a resumed sweep takes such a plan instead of searching again."""
        budget, kappa = check_objective(budget, kappa)
        ev = plan.evidence or {}
        objective = ({"budget": budget} if budget is not None else {"kappa": kappa}) | {
            "tokens": self.tokens, "prompt": self.prompt}
        calibration, search = ev.get("calibration") or {}, ev.get("search") or {}
        return (plan.fingerprint == self.empty.fingerprint and ev.get("objective") == objective
                and calibration.get("score") == [r.id for r in self.score]
                and calibration.get("heldout") == [r.id for r in self.heldout]
                and calibration.get("digest") == self.digest
                and all(search.get(k) == v for k, v in self.search.items()))  # fmt: skip


def split_records(records: Sequence, n_score: int | None, n_heldout: int | None) -> tuple[list, list]:
    """The scoring records (first) and the held-out ones (next); see `compose_plan` for the defaults (a sweep's
    `--n-calib 64` is 32 and 32: before, the first 16 and 16, the other 32 records unused)."""
    n = len(records)
    if n_score is None and n_heldout is None:  # every record given is used
        n_score, n_heldout = (n + 1) // 2, n // 2
    n_score = N_SCORE if n_score is None else n_score
    n_heldout = N_HELDOUT if n_heldout is None else n_heldout
    if n_score < 1 or n_heldout < 1:
        raise SkipitError("composed planning needs at least one scoring and one held-out calibration record")
    if n < n_score + n_heldout:
        raise SkipitError(f"composed planning uses {n_score} calibration records to score decisions and {n_heldout} "
                          f"held out, but got {n}: give more records or fewer of each")  # fmt: skip
    return list(records[:n_score]), list(records[n_score:n_score + n_heldout])


def _r(x: float) -> float:
    """Six significant digits: KLs of a few 1e-4 nats keep their precision."""
    return float(f"{x:.6g}")


def evidence(state: State, record: dict, measurer: Measurer, budget, kappa, search: dict,
             score: Sequence, heldout: Sequence, tokens: int = 1, prompt: str = "question") -> dict:  # fmt: skip
    """What the plan's evidence holds: the composed plan's held-out KL (bootstrap interval over examples) and FLOPs
    removed, each decision in order with its measurements, every decision alone, and the search's cost."""
    ci = mean_interval(state.heldout)
    alone = {a.decision.name: {"kl": _r(a.kl), "flops_removed": _r(a.saving)} for a in record["alone"]}
    objective = {"budget": budget} if budget is not None else {"kappa": kappa}
    name, value = next(iter(objective.items()))
    objective |= {"tokens": tokens, "prompt": prompt}
    where = ("the next token at the answer position" if tokens == 1 else
             f"the next token, mean over the first {tokens} tokens of the untouched model's greedy reply")
    return {
        "method": f"skipit composed (measured KL), {name} {value}",
        "objective": objective,
        "kl": {"value": _r(ci.value), "low": _r(ci.low), "high": _r(ci.high), "level": ci.level,
               "examples": "heldout", "unit": f"nats, KL(untouched || plan) of {where}, calibration records asked "
                                              f"{'for a caption' if prompt == 'caption' else 'their question'}"},
        "kl_score": _r(state.kl),
        "flops_removed": _r(state.saving),
        "decisions": state.steps,
        "alone": alone,
        "path": record["path"],
        "calibration": {"score": [r.id for r in score], "heldout": [r.id for r in heldout]},
        "search": {**search, "plans_measured": dict(measurer.measured), "plans_read_back": measurer.reused},
        "roles": state.plan.roles(),
    }  # fmt: skip
