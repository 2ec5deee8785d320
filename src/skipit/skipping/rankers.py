"""How pruning chooses the vision tokens it keeps (`Plan.prune_vision_rank`), as functions of tensors.

Each takes the rows' tensors (batch, seq, ...), the vision positions (batch, seq) and the share to keep, and returns
the kept vision tokens (batch, seq) bool: in every row, exactly `ceil(share * its vision tokens)` of them. FastV's
attention ranking reads weights computed beside the layer (`Adapter.last_query_attention`) and lives with the
forward step (`state.ForwardStep.rank_vision`).

- `dart_keep`: DART (Wen et al., 2025, arXiv:2502.11494; github.com/ZichenWen1/DART, `get_retained_image_token`).
- `divprune_keep`: DivPrune (Alvar et al., CVPR 2025, arXiv:2503.02175; github.com/vbdi/divprune, `DivPrune` in
  `llava_arch.py`).
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

from skipit.adapters import Adapter
from skipit.plan import DART_IMAGE_PIVOTS, DART_TEXT_PIVOTS


def kept_counts(vision: torch.Tensor, share: float) -> list[int]:
    """Per row, how many vision tokens a share keeps: rounded up, as `Plan.vision_kept`."""
    return [math.ceil(int(n) * share) for n in vision.sum(1).tolist()]


def _unit(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(x.float(), dim=-1)


def key_l1_norms(adapter: Adapter, layer: nn.Module, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
    """(batch, seq): the L1 norm of each token's keys in `layer` (every key head, after the rotary), computed from
    the layer's input `hidden` as its attention does (DART's pivot criterion)."""
    adapter.check_ranking(layer)  # an attention class whose keys are a plain k projection, norm and rotary
    norm, attention = adapter.attention_parts(layer)
    keys = adapter._heads(attention, attention.k_proj(norm(hidden)), "k_norm")  # (batch, kv heads, seq, head_dim)
    cos, sin = (t.expand(hidden.shape[0], *t.shape[1:]) for t in position_embeddings)
    rotary = sys.modules[type(attention).__module__].apply_rotary_pos_emb
    _, keys = rotary(keys[:, :0], keys, cos, sin)
    return keys.float().abs().sum((1, 3))


def dart_keep(states: torch.Tensor, key_norms: torch.Tensor, vision: torch.Tensor, valid: torch.Tensor,
              share: float, image_pivots: int = DART_IMAGE_PIVOTS, text_pivots: int = DART_TEXT_PIVOTS,
              of: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """DART: keep the vision tokens least duplicated with respect to a few pivot tokens.

    `states` (batch, seq, dim): the hidden states the similarity is measured on (DART: the output of the layer
    before pruning, through the model's final norm); `key_norms` (batch, seq): the pivot criterion (DART: the L1
    norm of that layer's keys). Pivots: the `image_pivots` vision tokens and the `text_pivots` real text tokens after
    the last vision token with the largest norm (DART's "query" tokens follow the image). The vision pivots are
    kept; then each pivot in turn (vision pivots first, each group by decreasing norm) takes its quota of the
    remaining vision tokens with the lowest cosine similarity to it. The quotas split the rest of the row's count
    evenly (the first pivots take one more when it does not divide), so a row keeps exactly its count: the share of
    its vision tokens, or of `of` (batch, seq) where given (the vision tokens before an input stage left some out).
    """
    B, T = vision.shape
    kept = torch.zeros(B, T, dtype=torch.bool, device=vision.device)
    seq = torch.arange(T, device=vision.device)
    for b, count in enumerate(kept_counts(vision if of is None else of, share)):
        tokens = torch.nonzero(vision[b])[:, 0]
        if count == 0:
            continue
        after = valid[b] & ~vision[b] & (seq > tokens[-1])
        text = torch.nonzero(after)[:, 0]
        norms = key_norms[b].float()
        image_pivot = tokens[norms[tokens].argsort(descending=True, stable=True)[: min(image_pivots, count)]]
        text_pivot = text[norms[text].argsort(descending=True, stable=True)[:text_pivots]]
        pivots = torch.cat([image_pivot, text_pivot])
        rest, n = count - len(image_pivot), len(pivots)
        quotas = [rest // n + (i < rest % n) for i in range(n)]
        similarity = torch.bmm(_unit(states[b, pivots])[None], _unit(states[b, tokens])[None].transpose(1, 2))[0]
        free = ~torch.isin(tokens, image_pivot)  # vision tokens not kept yet
        for i, quota in enumerate(quotas):
            if quota == 0:
                continue
            order = similarity[i].masked_fill(~free, math.inf).argsort(stable=True)[:quota]  # least similar first
            free[order] = False
        kept[b, tokens[~free]] = True
    return kept


TIE = 1e-6  # DivPrune scores closer than this are a tie (1 - cos between duplicates is rounding noise, ~1e-7)


def divprune_keep(states: torch.Tensor, vision: torch.Tensor, share: float) -> torch.Tensor:
    """DivPrune: keep a max-min diverse subset of the vision tokens, chosen greedily on cosine distance.

    `states` (batch, seq, dim): DivPrune's are the input embeddings (the projected image features as the language
    model receives them). With d = 1 - cos between a row's vision tokens, the first token chosen is the one farthest
    from its nearest neighbour; each next one is the token farthest from the chosen set (the largest distance to its
    nearest chosen token); ties (scores within `TIE`, float rounding apart) go to the earliest token. A token is
    never chosen twice.
    """
    B, T = vision.shape
    counts = vision.sum(1)
    n = int(counts.max()) if B else 0
    kept = torch.zeros(B, T, dtype=torch.bool, device=vision.device)
    if n == 0:
        return kept
    take = torch.sort((~vision).to(torch.int8), dim=1, stable=True).indices[:, :n]  # each row's vision tokens first
    real = vision.gather(1, take)  # False at padding slots of rows with fewer vision tokens
    x = _unit(states.gather(1, take[..., None].expand(-1, -1, states.shape[-1])))
    distance = torch.bmm(x, x.transpose(1, 2)).neg_().add_(1)  # (batch, n, n): 1 - cos
    # the first choice: each token's distance to its nearest other (real) token. Masked in place: at 2,880 vision
    # tokens x batch 8 the matrix is 265 MB in float32 and a masked copy would double it. The loop below never
    # needs what is masked: a token's distance to itself (a chosen token is skipped) or from a padding slot (never
    # chosen, so never a row it reads).
    distance.diagonal(dim1=1, dim2=2).fill_(math.inf)
    distance.masked_fill_(~real[:, :, None], math.inf)
    nearest = distance.amin(1)
    chosen = torch.zeros(B, n, dtype=torch.bool, device=vision.device)
    rows = torch.arange(B, device=vision.device)
    target = torch.tensor(kept_counts(vision, share), device=vision.device)
    score = nearest
    for i in range(int(target.max())):
        free = score.masked_fill(chosen | ~real, -math.inf)
        # the earliest of the tokens within TIE of the largest: exact duplicates (LLaVA-OneVision's image-newline
        # tokens) measure distances that differ only by float rounding, which differs between CPUs and kernels
        pick = (free >= free.amax(1, keepdim=True) - TIE).to(torch.int8).argmax(1)
        chosen[rows, pick] |= i < target
        step = distance[rows, pick]  # distance of every token to the one just chosen
        score = step if i == 0 else torch.minimum(score, step)
    kept.scatter_(1, take, chosen & real)
    return kept
