"""Token positions shared by measurement (`skipit.capture`) and inference (`skipit.skipping`)."""

from __future__ import annotations

import torch


def answer_index(valid: torch.Tensor) -> torch.Tensor:
    """Index [B] of each row's last real token (left or right padding)."""
    t = valid.shape[1]
    return t - 1 - valid.flip(1).long().argmax(1)
