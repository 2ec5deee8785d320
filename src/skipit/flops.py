"""Analytical cost of the language backbone under a skip plan: FLOPs and KV-cache bytes.

The "ideal speed-up" of a plan is `cost(empty plan) / cost(plan)`: what a perfect implementation would gain.
Counted, per token a layer processes (2 FLOPs per multiply-add):
- attention projections: q and o (hidden x heads*head_dim each), k and v (hidden x kv_heads*head_dim each);
- attention scores and the weighted sum: 2 * heads * head_dim multiply-adds per (query, key) pair it attends to
  (causal: a query attends to the layer's keys at or before its own position);
- the gated MLP (gate, up, down: 3 * hidden * intermediate), as in every family skipit supports;
- the LM head (hidden x vocab) for the tokens whose logits are computed (generate(): the last one).
Norms, rotary, softmax and activations (a few per element, not per weight) are left out, and so is the vision
encoder, which a skip plan does not touch. Per layer role (see `skipit.plan`): `all` processes every token;
`absent` only text tokens, which see only text keys; `frozen` text tokens fully, and vision tokens through the
k and v projections only (they are keys/values, not updated); `pruned` the text tokens and the vision tokens that
pruning keeps (`prune_vision_keep` of them, rounded up); `skip` nothing; with an input stage (`input_vision_keep`)
the vision tokens it leaves out are in no layer. Choosing the kept tokens is counted with the pruning layer (layer 0
for DivPrune and the input stage, which choose before it), as the engine computes it: FastV's attention
ranking (keys of every token, the last token's query, its scores on the keys), DART's (keys of every token for the
pivots' norms, cosine similarity of each pivot with each vision token) and DivPrune's (cosine similarity of every
pair of vision tokens; its greedy max-min choice is comparisons, not multiply-adds). Similarities count with the
attention scores in `prefill_scores` (token-pair products, not weight matrices).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from skipit.plan import ABSENT, ALL, DART_IMAGE_PIVOTS, DART_TEXT_PIVOTS, FROZEN, PRUNED, SKIP, Plan


@dataclass(frozen=True)
class Shape:
    """The dimensions of a language backbone that its cost depends on."""

    num_layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> Shape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = text.num_attention_heads
        return cls(
            num_layers=text.num_hidden_layers,
            hidden=text.hidden_size,
            heads=heads,
            kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            intermediate=text.intermediate_size,
            vocab=text.vocab_size,
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> Shape:
        return cls.from_config(model.config)

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def token_macs(self) -> int:
        """Multiply-adds of one layer for one token, attention scores excluded."""
        h, q = self.hidden, self.heads * self.head_dim
        return 2 * h * q + 2 * h * self.kv_width + 3 * h * self.intermediate

    @property
    def pair_macs(self) -> int:
        """Multiply-adds per (query, key) pair: scores and weighted sum."""
        return 2 * self.heads * self.head_dim


@dataclass
class Cost:
    """Cost of one prompt (per row; multiply by the batch size) followed by `decode_steps` single-token steps."""

    prefill: float  # FLOPs, LM head included for `logits` tokens
    decode: list[float]  # FLOPs of each decode step, LM head included
    prefill_layers: list[float]  # FLOPs of each layer in the prefill
    prefill_scores: float  # the part of `prefill` spent on token pairs: attention scores, weighted sums, similarities
    kv_tokens: list[int]  # per layer: tokens in its cache after the prefill and the decode steps
    kv_bytes: int  # sum over layers: keys + values

    @property
    def decode_mean(self) -> float:
        return sum(self.decode) / len(self.decode) if self.decode else 0.0

    @property
    def total(self) -> float:
        return self.prefill + sum(self.decode)


def roles_of(plan: Plan | Sequence[str] | None, num_layers: int) -> list[str]:
    if plan is None:
        return [ALL] * num_layers
    roles = plan.roles() if isinstance(plan, Plan) else list(plan)
    if len(roles) != num_layers:
        raise ValueError(f"the plan has {len(roles)} layers, the model {num_layers}")
    return roles


def cost(
    shape: Shape,
    plan: Plan | Sequence[str] | None,
    vision: Sequence[bool],
    decode_steps: int = 0,
    logits: int = 1,
    bytes_per_value: int = 2,
) -> Cost:
    """Cost of the prompt whose tokens are vision (True) or text (False), in order, under `plan` (None: untouched).

    `bytes_per_value`: 2 for bfloat16/float16 caches, 4 for float32.
    """
    roles = roles_of(plan, shape.num_layers)
    if PRUNED in roles and not isinstance(plan, Plan):
        raise ValueError("pruned layers need the Plan (its prune_vision_keep), not only its roles")
    vision = [bool(v) for v in vision]
    n_vision, n_prompt = sum(vision), len(vision)
    ranking: dict[int, tuple[int, int]] = {}  # layer -> multiply-adds of choosing tokens there, and their pairs
    if isinstance(plan, Plan) and plan.input_vision_keep is not None and n_vision:
        # the input stage: DivPrune on X_0, counted with layer 0; the tokens it leaves out are in no layer (which
        # of them does not change a count, so the last ones go)
        ranking[0] = _ranking_macs(shape, "divprune", vision, 0)
        left_out = set([i for i, v in enumerate(vision) if v][plan.vision_entering(n_vision) :])
        vision = [v for i, v in enumerate(vision) if i not in left_out]
    n = len(vision)
    n_text = n - sum(vision)
    n_entered = sum(vision)
    n_pruned = n_text + (plan.vision_kept(n_vision) if PRUNED in roles else n_entered)
    # causal pairs: every query sees every key at or before it, among the tokens the layer keeps
    pairs = {
        ALL: n * (n + 1) // 2,
        ABSENT: n_text * (n_text + 1) // 2,
        PRUNED: n_pruned * (n_pruned + 1) // 2,
        FROZEN: sum(i + 1 for i, v in enumerate(vision) if not v),  # text queries, all keys
    }
    keys = {ALL: n, ABSENT: n_text, PRUNED: n_pruned, FROZEN: n, SKIP: 0}
    queries = {ALL: n, ABSENT: n_text, PRUNED: n_pruned, FROZEN: n_text}
    kv_macs = shape.hidden * shape.kv_width * 2
    if PRUNED in roles and n_vision:
        at = max(plan.prune_vision_after, 0)
        # FastV's and DART's keys are computed for the whole prompt, the tokens left out included
        macs, pair_part = _ranking_macs(shape, plan.prune_vision_rank, vision, plan.vision_kept(n_vision), n_prompt)
        ranking[at] = tuple(a + b for a, b in zip(ranking.get(at, (0, 0)), (macs, pair_part), strict=True))
    layers, scores = [], 0.0
    for j, role in enumerate(roles):
        if role == SKIP and j not in ranking:
            layers.append(0.0)
            continue
        macs = 0.0
        if role != SKIP:
            scores += 2.0 * pairs[role] * shape.pair_macs
            macs = queries[role] * shape.token_macs + pairs[role] * shape.pair_macs
        if role == FROZEN:
            macs += n_entered * kv_macs
        if j in ranking:
            macs += ranking[j][0]
            scores += 2.0 * ranking[j][1]
        layers.append(2.0 * macs)
    head = 2.0 * shape.hidden * shape.vocab
    decode = []
    for s in range(decode_steps):  # the new token is text and also attends to itself
        attended = sum(keys[r] + s + 1 for r in roles if r != SKIP)
        computing = sum(r != SKIP for r in roles)
        decode.append(2.0 * (computing * shape.token_macs + attended * shape.pair_macs) + head)
    kv_tokens = [keys[r] + decode_steps if r != SKIP else 0 for r in roles]
    kv_bytes = 2 * sum(kv_tokens) * shape.kv_width * bytes_per_value
    return Cost(sum(layers) + logits * head, decode, layers, scores, kv_tokens, kv_bytes)


def _ranking_macs(shape: Shape, rank: str, vision: list[bool], kept: int, keyed: int = 0) -> tuple[int, int]:
    """Multiply-adds of choosing, by `rank`, the `kept` vision tokens pruning keeps in a prompt whose tokens (those
    that entered) are `vision`, with keys computed for `keyed` tokens; and the part of them on token pairs."""
    n, n_vision = keyed, sum(vision)
    if rank == "attention":  # keys of every token, the last token's query, its scores on the keys
        pairs = n * shape.pair_macs // 2
        return n * shape.hidden * shape.kv_width + shape.hidden * shape.heads * shape.head_dim + pairs, pairs
    if rank == "dart":  # keys of every token; each pivot's similarity to each vision token
        last = max(i for i, v in enumerate(vision) if v)
        text_after = sum(not v for v in vision[last + 1 :])
        pivots = min(DART_IMAGE_PIVOTS, kept) + min(DART_TEXT_PIVOTS, text_after)
        pairs = pivots * n_vision * shape.hidden
        return n * shape.hidden * shape.kv_width + pairs, pairs
    pairs = n_vision * n_vision * shape.hidden  # DivPrune: every pair of vision tokens
    return pairs, pairs


def batch_costs(model: nn.Module, encoded: dict, plan: Plan | None, new_tokens: int) -> dict[str, float]:
    """Analytical cost of a batch of model inputs under `plan`, summed over rows (each row's real tokens only):
    prefill FLOPs, mean decode-step FLOPs over `new_tokens - 1` steps, and KV-cache bytes."""
    import torch

    from skipit.adapters import get_adapter

    shape = Shape.from_model(model)
    ids = encoded["input_ids"]
    vision = get_adapter(model).vision_mask(ids, encoded)
    vision = torch.zeros_like(ids, dtype=torch.bool) if vision is None else vision.cpu()
    real = encoded.get("attention_mask", torch.ones_like(ids)).bool().cpu()
    value_bytes = next(model.parameters()).element_size()
    rows = [cost(shape, plan, vision[b][real[b]].tolist(), new_tokens - 1, bytes_per_value=value_bytes)
            for b in range(ids.shape[0])]  # fmt: skip
    return {
        "prefill": sum(c.prefill for c in rows),
        "decode": sum(c.decode_mean for c in rows),
        "kv_bytes": sum(c.kv_bytes for c in rows),
    }


def prefill_saving(model: nn.Module, encoded: dict, plan: Plan) -> float:
    """Fraction of the prefill FLOPs of the batch `encoded` that `plan` removes."""
    plain, mine = (batch_costs(model, encoded, p, 1)["prefill"] for p in (None, plan))
    return 1 - mine / plain


def prompt_layout(n_vision: int, n_text: int, text_before: int = 0) -> list[bool]:
    """A prompt of `text_before` text tokens, then the vision tokens, then the rest of the text."""
    if not 0 <= text_before <= n_text:
        raise ValueError(f"text_before must be in 0..{n_text}, got {text_before}")
    return [False] * text_before + [True] * n_vision + [False] * (n_text - text_before)


def ideal_speedup(shape: Shape, plan: Plan | Sequence[str], vision: Sequence[bool], decode_steps: int = 0) -> dict:
    """Untouched / plan, for the prefill, the mean decode step, and the KV-cache size."""
    base, mine = cost(shape, None, vision, decode_steps), cost(shape, plan, vision, decode_steps)
    return {
        "prefill": base.prefill / mine.prefill,
        "decode": base.decode_mean / mine.decode_mean if decode_steps else 1.0,
        "kv_memory": mine.kv_bytes / base.kv_bytes,
        # The one definition of "FLOPs removed": the prefill's (what the README, the sweep and --budget mean); the
        # decode step's share is reported under its own name.
        "flops_removed": 1.0 - mine.prefill / base.prefill,
        "decode_flops_removed": 1.0 - mine.decode_mean / base.decode_mean if decode_steps else 0.0,
    }


def largest_keep_share(meets: Callable[[float], bool], lo: float = 1e-3) -> float | None:
    """The largest share of vision tokens kept, to about 1e-6, at which `meets(share)` (a plan pruning to it removes
    enough FLOPs) holds, by bisection from `lo` up: the FLOPs removed fall as the share kept grows. None when even
    `lo` (0.1 %) does not."""
    hi = 1 - 1e-3
    if not meets(lo):
        return None
    for _ in range(20):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if meets(mid) else (lo, mid)
    return lo
