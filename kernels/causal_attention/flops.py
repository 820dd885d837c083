"""FLOP formula of `rewriter::causal_attention` (kernels/flops.py states the convention): the
fused causal kernel computes the (query, key) pairs of the causal triangle only, about half of
the masked SDPA it replaces (a batch with padding falls back to the masked SDPA: Tq·Tk pairs)."""
from __future__ import annotations

from ..flops import causal_pairs, softmax_attention


def causal_attention(q, k, v, *_, **__):
    B, H, Tq, D = q
    return softmax_attention(B, H, Tq, k[2], D, v[3], pairs=causal_pairs(Tq, k[2]))


FLOPS = {"causal_attention": causal_attention}
