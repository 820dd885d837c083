"""Decode attention written out: the fp32 ground truth of `rewriter::decode_attention`.

T_q new query tokens attend to a KV cache of L slots (a static-size cache: slots past the last
written one hold anything finite). Query i of batch row b sits at slot p_bi = cache_position[(b,) i]
(its own key already written there) and sees slot j iff

    j ≤ p_bi   and   key_valid[b, j]                           (causality aligned bottom-right)

    O_bhi = Σ_j softmax_j(scale · Q_bhi·K_b,g(h),j over the visible j) V_b,g(h),j

g(h) = h // (Hq / Hkv) (grouped-query attention, SDPA's enable_gqa). A query that sees no slot
(a left-padding position, or every slot before it invalid) outputs 0, as SDPA does, not NaN.
"""
from __future__ import annotations

import torch
from torch import Tensor


def visible_slots(cache_position: Tensor, key_valid: Tensor | None, B: int, L: int) -> Tensor:
    """bool [B, T_q, L]: slot j visible to query i of row b (j ≤ p_bi and key_valid[b, j])."""
    pos = cache_position if cache_position.dim() == 2 else cache_position[None]   # [B | 1, T_q]
    j = torch.arange(L, device=cache_position.device)
    visible = (j[None, None, :] <= pos[:, :, None]).expand(B, -1, -1)   # [B, T_q, L]
    if key_valid is not None:
        visible = visible & key_valid[:, None, :].bool()
    return visible


def decode_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_position: Tensor,
                         key_valid: Tensor | None = None, scale: float | None = None) -> Tensor:
    """q [B, Hq, T_q, D], k_cache [B, Hkv, L, D], v_cache [B, Hkv, L, Dv] -> O fp32 [B, Hq, T_q, Dv]."""
    B, H, _, D = q.shape
    L = k_cache.shape[2]
    scale = D ** -0.5 if scale is None else scale
    k = k_cache.float().repeat_interleave(H // k_cache.shape[1], dim=1)    # [B, Hq, L, D]
    v = v_cache.float().repeat_interleave(H // v_cache.shape[1], dim=1)    # [B, Hq, L, Dv]
    s = (q.float() @ k.transpose(-1, -2)) * scale                          # [B, Hq, T_q, L]
    s = s.masked_fill(~visible_slots(cache_position, key_valid, B, L)[:, None], float("-inf"))
    return torch.softmax(s, dim=-1).nan_to_num(0.0) @ v                    # a row that sees nothing: 0
