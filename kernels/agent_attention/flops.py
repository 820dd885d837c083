"""FLOP formula of `rewriter::agent_attention` (kernels/flops.py states the convention), as cpu.py
computes it: stage 1, n agents attend over the N keys; stage 2, the N queries attend over the n
agents; the biases and the c·V shortcut. Han et al., Agent Attention, arXiv:2312.08874.
`agent_block` (pooling + biases + this op) is a plain function: the cost model counts through it."""
from __future__ import annotations

from ..flops import softmax_attention


def agent_attention(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut, **_):
    B, H, N, D = q
    Nk, Dv, n = k[2], v[3], agents[2]
    stage1 = softmax_attention(B, H, n, Nk, D, Dv) + B * H * n * Nk                 # + the scale
    stage2 = softmax_attention(B, H, N, n, D, Dv) + B * H * N * n
    biases = (0 if bias1 is None else B * H * n * Nk) + (0 if bias2 is None else B * H * N * n)
    return stage1 + stage2 + biases + 2 * B * H * N * Dv                            # + c·V


FLOPS = {"agent_attention": agent_attention}
