"""Which keys are real tokens, read from the site's SDPA attn_mask.

For a padding mask (the analyzer's kinds "padding" / "causal+padding") the LAST query row of a
[B, *, Tq, Tk] mask allows exactly the real keys — also in a causal mask, whose last row sees
every earlier key, and for right- or left-padded batches. Boolean masks: True = attend;
additive masks: 0 = attend, a large negative value (≤ −1, in practice −1e4 … −inf) = masked.
"""
from __future__ import annotations

import torch

NEG_INF = float("-inf")


def key_mask_from_attn_mask(mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """bool [B, Tk] of real keys from an SDPA padding mask ([B|1, H|1, Tq|1, Tk], bool or additive)."""
    row = mask
    while row.dim() > 2:                        # [..., Tq, Tk] -> last query row, first head
        row = row.select(-2, -1) if row.dim() == 3 else row.select(1, 0)
    row = row.reshape(-1, mask.shape[-1]) if row.dim() == 2 else row.reshape(1, -1)
    valid = row if row.dtype == torch.bool else row > -1.0
    return valid.expand(q.shape[0], -1)

