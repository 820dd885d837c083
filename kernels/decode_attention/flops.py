"""FLOP formula of `rewriter::decode_attention` (kernels/flops.py states the convention): T_q new
queries per head against the cache's L slots (the slots a query cannot see are masked, not
skipped, on the CPU path: SDPA over the cache)."""
from __future__ import annotations

from ..flops import softmax_attention


def decode_attention(q, k_cache, v_cache, cache_position, key_valid=None, scale=None, **_):
    B, H, Tq, D = q
    return softmax_attention(B, H, Tq, k_cache[2], D, v_cache[3])


FLOPS = {"decode_attention": decode_attention}
