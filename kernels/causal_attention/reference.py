"""Masked softmax attention, the readable fp32 ground truth of `rewriter::causal_attention`.

    O = softmax(Q Kᵀ · scale + M) V

M is the model's mask [B|1, 1|H, T_q, T_k]: bool (True = attend; False adds −∞) or additive
float (added as is). A query row that sees no key outputs 0, as PyTorch's SDPA does, not NaN.
GQA (enable_gqa): query head h reads kv head h // (H / Hkv).
"""
from __future__ import annotations

import torch


def causal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                         scale: float, enable_gqa: bool) -> torch.Tensor:
    """q [B, H, T_q, D], k [B, Hkv, T_k, D], v [B, Hkv, T_k, Dv] -> O fp32 [B, H, T_q, Dv]."""
    q, k, v = q.float(), k.float(), v.float()
    H = q.shape[1]
    if enable_gqa:
        k = k.repeat_interleave(H // k.shape[1], dim=1)                 # [B, H, T_k, D]
        v = v.repeat_interleave(H // v.shape[1], dim=1)                 # [B, H, T_k, Dv]
    s = (q @ k.transpose(-1, -2)) * scale                               # [B, H, T_q, T_k]
    if attn_mask.dtype == torch.bool:
        s = s.masked_fill(~attn_mask, float("-inf"))
    else:
        s = s + attn_mask.float()
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)                        # a row that sees nothing: 0
    return p @ v
