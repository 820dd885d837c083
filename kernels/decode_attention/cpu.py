"""`rewriter::decode_attention` in PyTorch: one SDPA call per step (the fused CPU kernel).

GQA without repeat_kv: the G = Hq / Hkv query heads of a kv head and their T_q tokens are stacked
as the G·T_q rows of one head, so SDPA runs with Hkv heads over the cache as it is stored
(q [B, Hkv, G·T_q, D] against k/v [B, Hkv, L, D]; row g·T_q + i keeps query i's mask row). Slots
after the last query position are never visible, so only the filled prefix of a static cache is
read: a step costs O(filled length), not O(cache size).
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .reference import visible_slots


def decode_attention_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_position: Tensor,
                           key_valid: Tensor | None = None, scale: float | None = None) -> Tensor:
    """SDPA over the visible prefix of the cache; q.dtype out, [B, Hq, T_q, Dv], contiguous."""
    B, H, Tq, D = q.shape
    Hkv, Dv = k_cache.shape[1], v_cache.shape[3]
    G = H // Hkv
    n = int(cache_position.max()) + 1                     # slots ≥ n are after every query
    valid = None if key_valid is None else key_valid[:, :n]
    if Tq == 1 and cache_position.dim() == 1:             # decode: slot ≤ p = n − 1 holds for all n slots
        mask = None if valid is None else valid[:, None, None, :]          # [B, 1, 1, n], a view
    else:                                                 # row g·T_q + i keeps query i's mask row
        mask = visible_slots(cache_position, valid, B, n)[:, None]         # [B, 1, T_q, n]
        mask = mask.expand(B, G, Tq, n).reshape(B, 1, G * Tq, n)
    rows = q.reshape(B, Hkv, G * Tq, D)                   # row g·T_q + i = head hkv·G + g, token i
    out = F.scaled_dot_product_attention(rows, k_cache[:, :, :n], v_cache[:, :, :n], attn_mask=mask,
                                         scale=scale)
    if mask is not None:                                  # rows that see no slot: 0 on every backend
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out.reshape(B, H, Tq, Dv).contiguous()
