"""`rewriter::agent_attention` in PyTorch: two batched GEMM + softmax stages, O(N·n·d), GQA by
grouping each kv head's query heads onto it (no K/V copies). The CPU impl, and what autograd
recomputes for the gradients of q, k, v, agents, scales, biases and shortcut."""
from __future__ import annotations

import torch


def agent_attention_torch(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut):
    """The PyTorch implementation of `rewriter::agent_attention` (the CPU impl, and what autograd
    recomputes). Differentiable. Returns O [B, H, N, Dv] in the accumulation dtype (fp32, or fp64)."""
    B, H, N, D = q.shape
    h_kv, d_v, n = k.shape[1], v.shape[-1], agents.shape[2]
    group = H // h_kv
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k, v, a = q.to(acc), k.to(acc), v.to(acc), agents.to(acc)
    per_head = lambda t: t.to(acc).view(1, H, 1, 1)                                 # noqa: E731

    # stage 1: agents → keys; GQA by grouping query heads onto their kv head (no K/V copies)
    s1 = (a.reshape(B, h_kv, group * n, D) @ k.transpose(-1, -2)).view(B, H, n, N) * per_head(scale1)
    if bias1 is not None:
        s1 = s1 + bias1.to(acc)
    if key_mask is not None:
        key_mask = key_mask.bool()
        any_key = key_mask.any(-1).view(B, 1, 1, 1)
        s1 = s1.masked_fill(~key_mask[:, None, None, :], float("-inf")).masked_fill(~any_key, 0.0)
        p1 = torch.softmax(s1, dim=-1) * any_key                                     # fully padded -> 0
    else:
        p1 = torch.softmax(s1, dim=-1)                                               # [B, H, n, N]
    v_agents = (p1.view(B, h_kv, group * n, N) @ v).view(B, H, n, d_v)

    # stage 2: queries → agents
    s2 = (q @ a.transpose(-1, -2)) * per_head(scale2)                               # [B, H, N, n]
    if bias2 is not None:
        s2 = s2 + bias2.to(acc)
    out = torch.softmax(s2, dim=-1) @ v_agents                                      # [B, H, N, Dv]
    out = out.view(B, h_kv, group, N, d_v) + shortcut.to(acc).view(1, h_kv, group, 1, 1) * v[:, :, None]
    return out.view(B, H, N, d_v)

