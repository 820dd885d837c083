"""`rewriter::causal_attention` in PyTorch: the fused is_causal SDPA whenever the mask is the
plain causal triangle, else SDPA with the mask, exactly what the traced graph did.

    plain(mask)  →  sdpa(q, k, v, is_causal=True, scale)        (the fused causal kernel)
    otherwise    →  sdpa(q, k, v, attn_mask=mask, scale)

plain(mask): T_q = T_k and the mask allows exactly the lower triangle for every sample (bool:
equals tril; additive float: 0 on the triangle and ≤ the dtype's lowest value elsewhere). Both
branches compute the same function on such a mask; only the summation order of the fused kernel
differs (≈ 1e-7 relative in fp32). The same code serves CUDA: PyTorch's own fused kernels
(FlashAttention there) leave nothing for a Triton kernel of ours to add.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def plain_causal(mask: torch.Tensor) -> bool:
    """Whether `mask` ([..., T_q, T_k], bool or additive float) is exactly the causal triangle."""
    t_q, t_k = mask.shape[-2:]
    if t_q != t_k:
        return False
    tril = torch.ones(t_q, t_k, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, tril.expand_as(mask)))
    if not bool(((mask == 0) == tril).all()):
        return False
    return bool((mask.masked_fill(tril, float("-inf")) <= torch.finfo(mask.dtype).min).all())


def causal_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                           scale: float, enable_gqa: bool) -> torch.Tensor:
    if plain_causal(attn_mask):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)
    return out.contiguous()         # one layout whichever SDPA backend ran (the fake promises it)
