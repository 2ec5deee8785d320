"""Per-forward state of an applied plan: which tokens each layer processes, the key slots each group of layers has
cached, and the attention masks built from them. One `ForwardStep` is shared by all decoder layers of a forward call.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from skipit.adapters import Adapter
from skipit.errors import SkipitError
from skipit.plan import ABSENT, ALL, FROZEN, PRUNED, Plan
from skipit.skipping.rankers import dart_keep, divprune_keep, key_l1_norms
from skipit.tokens import answer_index


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The tokens of `x` (batch, seq, dim) at `index` (batch, n)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def scatter_tokens(x: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`x` with the tokens at `index` (batch, n) replaced by `values` (batch, n, dim)."""
    return x.scatter(1, index[..., None].expand(-1, -1, x.shape[-1]), values)


class ForwardCall:
    """What the model's forward was called with that the layers need: vision positions, the 2-D attention mask and
    the bidirectional blocks of the model's mask (`Adapter.blocks`)."""

    def __init__(self, vision: torch.Tensor | None, attention_mask: torch.Tensor | None,
                 blocks: torch.Tensor | None = None):  # fmt: skip
        self.vision, self.attention_mask, self.blocks = vision, attention_mask, blocks


class CachedKeys:
    """What one group of layers (same role, so same cached tokens) holds in its caches, one entry per key slot.

    A layer caches only the tokens it processes, so its keys are not the sequence: causality, sliding windows,
    padding and bidirectional blocks are read from each slot's original sequence index, validity and block id, kept
    here across forward calls.
    """

    def __init__(self):
        self.index = self.valid = None  # (batch, keys): original sequence index, and whether a real token
        self.block = None  # (batch, keys): bidirectional block id (-1: none), once a call has brought blocks
        self.dense = True  # no invalid slot so far

    def add(self, index: torch.Tensor, valid: torch.Tensor, dense: bool, block: torch.Tensor | None = None) -> int:
        """Append slots; returns how many were there before."""
        before = 0 if self.index is None else self.index.shape[1]
        if block is not None and self.block is None:
            self.block = torch.full((index.shape[0], before), -1, dtype=torch.long, device=index.device)
        if self.block is not None:
            block = torch.full_like(index, -1) if block is None else block
            self.block = torch.cat([self.block, block], 1)
        self.index = index if self.index is None else torch.cat([self.index, index], 1)
        self.valid = valid if self.valid is None else torch.cat([self.valid, valid], 1)
        self.dense = self.dense and dense
        return before


class CacheState:
    """Bookkeeping for one cache object across the forward calls that extend it."""

    def __init__(self):
        self.seen = 0  # tokens of the sequence processed so far
        self.keys: dict[str, CachedKeys] = {}  # per role


def padding_mask(valid: torch.Tensor) -> torch.Tensor | None:
    """The 2-D mask a linear-attention layer gets for tokens whose validity is `valid` (batch, n), as transformers'
    `create_recurrent_attention_mask` builds it: None for one token or when every token is real (nothing to zero)."""
    return None if valid.shape[1] == 1 or bool(valid.all()) else valid


class LayerRun:
    """One run of a layer (or of its attention only) on a subset of the current tokens."""

    def __init__(self, take, keep, size, masks=None, attention_only=False, valid=None):
        self.take = take  # (batch, n) token indices in the current call, or None: all tokens in order
        self.keep = keep  # (batch, n) False at padding slots of ragged rows, or None: no padding slot
        self.valid = valid  # (batch, n) whether each slot is a real token (not padding, not a padding slot)
        self.size = size
        self.attention_only = attention_only
        self._masks = masks  # (window, chunk) -> the mask of this run's queries for layers with that window, chunk
        self._built = {}
        self._pe = None

    def mask(self, window: int | None, chunk: int | None = None):
        """The attention mask of this run's queries on the group's cached keys, in a layer with sliding window
        `window` and attention chunk `chunk` (None: none); built once per kind of layer."""
        if self._masks is None:
            return None
        if (window, chunk) not in self._built:
            self._built[window, chunk] = self._masks(window, chunk)
        return self._built[window, chunk]

    def positions(self, position_embeddings, adapter: Adapter):
        """The rotary (cos, sin) of exactly this run's tokens, so each keeps its original position (M-RoPE too)."""
        if self.take is None:
            return position_embeddings
        if self._pe is None or self._pe[0] is not position_embeddings:  # same (cos, sin) object for all layers
            self._pe = (position_embeddings, adapter.take_positions(position_embeddings, self.take))
        return self._pe[1]


class ForwardStep:
    """Everything shared by the layers during one forward call: token kinds, slots and masks per role."""

    def __init__(self, call: ForwardCall, state: CacheState, adapter: Adapter, plan: Plan, hidden: torch.Tensor):
        B, T = hidden.shape[:2]
        self.adapter, self.plan, self.dtype, self.device = adapter, plan, hidden.dtype, hidden.device
        self.state = state
        seen = state.seen
        self.index = (torch.arange(T, device=self.device) + seen).expand(B, T)
        mask = call.attention_mask
        if mask is None:
            self.valid, self.all_valid = torch.ones(B, T, dtype=torch.bool, device=self.device), True
        elif mask.ndim != 2 or mask.shape[1] != seen + T:
            raise SkipitError(
                f"a skip plan needs the 2-D attention mask of the whole sequence ({seen + T} tokens), "
                f"got shape {tuple(mask.shape)}"
            )
        else:
            self.valid = mask[:, -T:].to(self.device, torch.bool)
            self.all_valid = bool(self.valid.all())
        # left padding per row, from which chunked layers count their chunks (as `create_chunked_causal_mask`)
        self.left_padding = None if mask is None else (mask.cumsum(-1) == 0).sum(-1).to(self.device)
        vision = call.vision
        self.vision = vision.to(self.device) if vision is not None and bool(vision.any()) else None
        blocks = call.blocks
        if blocks is not None and blocks.shape != (B, T):
            raise SkipitError(f"token_type_ids of shape {tuple(blocks.shape)} do not match the call's {(B, T)} tokens")
        self.blocks = blocks.to(self.device) if blocks is not None and bool((blocks >= 0).any()) else None
        state.seen += T
        self._runs, self._selections = {}, {}
        self._scratch = None
        self.kept = None  # (batch, seq) vision tokens kept by pruning, once the pruning layer has ranked them
        # (batch, seq) vision tokens the input stage (`input_vision_keep`) left out of every layer, once layer 0 has
        # chosen; None: every token entered
        self.dropped = None
        self.key_norms = None  # (batch, seq) DART's pivot criterion, noted at the pruning layer
        # Layers that process the same subset in a row pass it on compacted: gathered once, scattered back once
        # (at the first layer that needs other tokens, or at the last layer).
        self._full = None  # the whole sequence as it was when the subset was taken (rows outside it stay current)
        self._subset = None  # the `take` index of the subset being passed on, or None: the whole sequence is

    def full(self, hidden: torch.Tensor) -> torch.Tensor:
        """The whole sequence, current outside the subset being passed on (enough to read vision tokens)."""
        return hidden if self._subset is None else self._full

    def expand(self, hidden: torch.Tensor) -> torch.Tensor:
        """The whole sequence: the subset being passed on, if any, scattered back."""
        if self._subset is None:
            return hidden
        hidden = scatter_tokens(self._full, self._subset, hidden)
        self._full = self._subset = None
        return hidden

    def subset(self, hidden: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
        """The tokens at `take`: `hidden` itself when it is that subset already (same index object)."""
        if self._subset is take:
            return hidden
        self._full = self.expand(hidden)
        return gather_tokens(self._full, take)

    def compact(self, hidden: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
        """Pass `hidden`, the layer's output on the tokens at `take`, on to the next layer without scattering it."""
        self._subset = take
        return hidden

    @property
    def scratch_cache(self) -> DynamicCache:
        """A throwaway cache for frozen layers called without one (text tokens still attend to the vision keys)."""
        if self._scratch is None:
            self._scratch = DynamicCache()
        return self._scratch

    def rank_vision(self, layer: nn.Module, hidden: torch.Tensor, position_embeddings,
                    window: int | None = None) -> None:  # fmt: skip
        """Keep, in each row, the share `prune_vision_keep` (rounded up) of its vision tokens that the row's last
        real token attends to most in `layer` (sliding window `window`), whose input is `hidden` (the whole
        sequence)."""
        if self.vision is None or self.kept is not None:
            return
        last = answer_index(self.valid)
        # FastV-style: ranked once, in the call that carries the vision tokens, by weights computed beside the
        # layer (`Adapter.last_query_attention`), so the layer itself keeps running under SDPA. Tokens the input
        # stage dropped are no keys there and are not ranked.
        valid, vision = self.entered()
        weights = self.adapter.last_query_attention(layer, hidden, position_embeddings, valid, last, window)
        weights = weights.masked_fill(~vision, -1.0)
        counts = torch.ceil(self.vision.sum(1) * self.plan.prune_vision_keep).long()
        # rank of each token by weight (stable: ties keep sequence order); non-vision tokens rank last
        rank = weights.argsort(dim=1, descending=True, stable=True).argsort(dim=1)
        self.kept = self.vision & (rank < counts[:, None])

    def note_keys(self, layer: nn.Module, hidden: torch.Tensor, position_embeddings) -> None:
        """DART, at the pruning layer: the L1 norm of each token's keys in `layer`, whose input is `hidden`."""
        if self.vision is None or self.kept is not None:
            return
        self.key_norms = key_l1_norms(self.adapter, layer, hidden, position_embeddings)

    def entered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(valid, vision) of the tokens that entered layer 0: without those the input stage dropped, if any."""
        if self.dropped is None:
            return self.valid, self.vision
        return self.valid & ~self.dropped, self.vision & ~self.dropped

    def reduce_input(self, hidden: torch.Tensor) -> None:
        """The input stage, on X_0 (`hidden`, the whole sequence): DivPrune keeps the share `input_vision_keep` of
        each row's vision tokens; the others are left out of every layer (`dropped`)."""
        if self.vision is None or self.dropped is not None:
            return
        self.dropped = self.vision & ~divprune_keep(hidden, self.vision, self.plan.input_vision_keep)

    def rank_states(self, hidden: torch.Tensor) -> None:
        """DART or DivPrune, at the input `hidden` (the whole sequence) of the layer after the pruning layer: X_{p+1}
        (X_0 for DivPrune); see `skipit.skipping.rankers`."""
        if self.vision is None or self.kept is not None:
            return
        keep = self.plan.prune_vision_keep
        if self.plan.prune_vision_rank == "dart":
            states = self.adapter.final_norm(hidden)
            valid, vision = self.entered()  # only those that entered are pivots or ranked
            self.kept = dart_keep(states, self.key_norms, vision, valid, keep, of=self.vision)
        else:
            self.kept = divprune_keep(hidden, self.vision, keep)

    def runs(self, role: str) -> list[LayerRun]:
        """The runs a layer of `role` makes in this call, in order; built once per role (group of layers)."""
        if role not in self._runs:
            self._runs[role] = self._make_runs(role)
        return self._runs[role]

    def _make_runs(self, role: str) -> list[LayerRun]:
        keys = self.state.keys.setdefault(role, CachedKeys())
        if self.vision is None:
            return [self._layer_run(keys, None, ordered=True)]
        if role == ALL:
            return [self._layer_run(keys, None if self.dropped is None else "entered", ordered=True)]
        if role == ABSENT:
            return [self._layer_run(keys, "text", ordered=True)]
        if role == PRUNED:  # later layers process the kept vision tokens as a subset, like text after an exit
            return [self._layer_run(keys, "kept", ordered=True)]
        assert role == FROZEN
        # Late entry: the vision tokens' keys/values go to the cache first, their states frozen
        # (`Adapter.cache_keys_values`: k and v projections only where the attention class allows it), then the
        # whole layer runs on the text tokens, which attend to them.
        vision = self._layer_run(keys, "vision", ordered=True, attention_only=True)
        return [vision, self._layer_run(keys, "text", ordered=False)]

    def _select(self, name: str):
        """(take, keep, index, valid, block) of the text, the vision, the text and kept vision tokens, or every
        token that entered (`dropped`); the same objects for every role."""
        if name not in self._selections:
            select = self.vision if name == "vision" else ~self.vision
            if name == "kept":
                select = select | self.kept
            if self.dropped is not None:
                select = ~self.dropped if name == "entered" else select & ~self.dropped
            counts = select.sum(1)
            n = int(counts.max())
            # Rows may select different numbers of tokens (e.g. of vision tokens): the subset is padded to the
            # longest row, selected tokens first in sequence order, and the padding slots masked out (`keep`).
            take = torch.sort((~select).to(torch.int8), dim=1, stable=True).indices[:, :n]
            keep = select.gather(1, take)
            keep = None if bool((counts == n).all()) else keep
            index, valid = self.index.gather(1, take), self.valid.gather(1, take)
            block = None if self.blocks is None else self.blocks.gather(1, take)
            if keep is not None:
                valid = valid & keep
                block = None if block is None else block.masked_fill(~keep, -1)
            self._selections[name] = take, keep, index, valid, block
        return self._selections[name]

    def _layer_run(self, keys: CachedKeys, select: str | None, ordered: bool,
                   attention_only: bool = False) -> LayerRun:  # fmt: skip
        """Slots for the tokens in `select` (None: all), appended to `keys`, with the masks their queries need."""
        if select is None:
            take, keep, index, valid, block = None, None, self.index, self.valid, self.blocks
        else:
            take, keep, index, valid, block = self._select(select)
        size = index.shape[1]
        dense = self.all_valid and keep is None
        before = keys.add(index, valid, dense, block)
        if attention_only:
            return LayerRun(take, keep, size, attention_only=True, valid=valid)
        # the slots cached so far (later runs of this call append more, which these queries do not see)
        k_index, k_valid, k_block, k_dense = keys.index, keys.valid, keys.block, keys.dense

        def masks(window, chunk):
            return self._mask(k_index, k_valid, k_block, k_dense, before, index, block, ordered, window, chunk)

        return LayerRun(take, keep, size, masks, valid=valid)

    def _mask(self, k_index: torch.Tensor, k_valid: torch.Tensor, k_block: torch.Tensor | None, dense: bool,
              before: int, q_index: torch.Tensor, q_block: torch.Tensor | None, ordered: bool,
              window: int | None, chunk: int | None = None):  # fmt: skip
        """The attention mask of queries at original indices `q_index` on the keys at `k_index` (every key the group
        has cached), in a layer with sliding window `window` (None: full attention).

        Built here, once per group of layers that cache the same tokens and per window, since transformers' masks
        assume the layer sees the whole sequence. A query at index q sees a key at index k when k <= q and, in a
        sliding layer, k > q - window (transformers' `sliding_window_overlay`); two tokens of the same bidirectional
        block (`Adapter.blocks`) see each other whatever their order, inside the window in a sliding layer (Gemma 3's
        AND(window, OR(causal, block))). In a chunked layer a query sees the keys of its own chunk only, chunks
        counted from the row's first real token (transformers' `chunked_overlay`). Invalid slots (left padding,
        padding slots of ragged subsets) are masked out.
        """
        n = q_index.shape[1]
        sdpa = self.adapter.attn_implementation == "sdpa"
        bidirectional = q_block is not None and bool((q_block >= 0).any())
        # whether the window leaves out any key of any query (conservatively: the farthest pair)
        cuts = window is not None and int(q_index.max()) - int(k_index.min()) >= window
        cuts = cuts or (chunk is not None and int(q_index.max()) >= chunk)  # a query may be past the first chunk
        # No mask where SDPA's own handling is exact: one query that may see every key, or a plain causal prefill
        # (in attention that is causal when given no mask).
        shortcut = n == 1 or (sdpa and ordered and before == 0 and self.adapter.causal_without_mask)
        if dense and not bidirectional and not cuts and shortcut:
            return None
        q, k = q_index[:, :, None], k_index[:, None, :]
        allowed = k <= q
        same = None
        if bidirectional:
            if k_block is None:
                k_block = torch.full_like(k_index, -1)
            same = (k_block[:, None, :] == q_block[:, :, None]) & (q_block[:, :, None] >= 0)
        if same is not None:
            allowed = allowed | same
        if window is not None:
            inside = k > q - window
            if same is not None and not self.adapter.blocks_in_window:
                inside = inside | same  # OR(AND(window, causal), block): a block pair attends across the window
            allowed = allowed & inside
        if chunk is not None:
            pad = 0 if self.left_padding is None else self.left_padding[:, None, None]
            allowed = allowed & ((k - pad) // chunk == (q - pad) // chunk)
        allowed = allowed & k_valid[:, None, :]
        # A query always sees its own key: keeps padding queries finite (a fully masked row gives NaN in SDPA).
        rows = torch.arange(n, device=self.device)
        allowed[:, rows, before + rows] = True
        allowed = allowed[:, None]
        if sdpa:
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min
        )
