"""Cross-modal attention condition VAR (framework measure 5): the share of attention mass that text
queries (prompt and generated tokens) put on vision keys, averaged over heads and queries.

Conventions
- attention weights [B, H, Q, K]; masks are over key positions [B, K]; the Q queries are the last Q key
  positions (prefill: Q = K; a decode step with a KV cache: Q = 1).
- A query counts when it is valid, of a query modality, and can see at least one vision key (a text
  token before the image has no choice to make, so it says nothing about a preference).
- visible keys: valid and causally visible (key j <= query position), unless `visible` [B, Q, K] is given.
- VAR = mean over counted queries of (mean over heads of the mass on vision keys).
- normalised VAR = sum(mass) / sum(vision share of the visible keys): the ratio to what uniform attention
  over the visible keys would give, so 1.0 = no preference, < 1 = vision under-attended.
"""

from __future__ import annotations

import numpy as np
import torch

from skipit.measures.geometric import bootstrap_mean


def vision_attention_terms(
    attn: torch.Tensor,
    query_mask: torch.Tensor,
    vision_mask: torch.Tensor,
    valid_mask: torch.Tensor,
    visible: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mass [B, Q], share [B, Q], counted [B, Q]) in float64 / bool; see the module doc for the conventions."""
    b, _, q, k = attn.shape
    valid = valid_mask.bool().to(attn.device)
    vision_keys = vision_mask.bool().to(attn.device) & valid
    if visible is None:
        visible = torch.ones(q, k, dtype=torch.bool, device=attn.device).tril(k - q).expand(b, q, k)
    visible = visible.bool().to(attn.device) & valid[:, None, :]
    n_visible = visible.sum(-1)
    n_vision = (visible & vision_keys[:, None, :]).sum(-1)
    share = n_vision.double() / n_visible.clamp_min(1).double()
    mass = torch.einsum("bhqk,bk->bq", attn.float(), vision_keys.float()).double() / attn.shape[1]
    counted = query_mask.bool().to(attn.device)[:, k - q :] & valid[:, k - q :] & (n_vision > 0)
    zero = torch.zeros((), dtype=torch.float64, device=attn.device)
    return torch.where(counted, mass, zero).cpu(), torch.where(counted, share, zero).cpu(), counted.cpu()


def var_from_sums(mass, share, n_queries, level: float = 0.95) -> dict:
    """VAR, normalised VAR (each mean, ci_low, ci_high) and expected_share from accumulated sums [..., R + 1]
    (column 0 plain, columns 1..R bootstrap replicates over examples, as in skipit.stats)."""
    mass, share, n = (np.asarray(a, dtype=np.float64) for a in (mass, share, n_queries))
    return {
        "var": bootstrap_mean(mass, n, level),
        "var_normalised": bootstrap_mean(mass, share, level),
        "expected_share": bootstrap_mean(share, n, level)["mean"],
        "n_queries": n[..., 0],
    }
