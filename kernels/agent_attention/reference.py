"""Agent attention, the readable fp32 ground truth.

Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024,
arXiv:2312.08874. n ≪ N agent tokens A first aggregate
the values, then broadcast them back to every query:

    V_A = softmax(A Kᵀ · s₁ + B₁) V          agents as queries   [n, Dv]   (padded keys excluded)
    O   = softmax(Q Aᵀ · s₂ + B₂) V_A + c·V  agents as keys      [N, Dv]

s₁, s₂ are per-head temperatures, B₁ [(B,) H, n, N] / B₂ [(B,) H, N, n] optional additive
biases, c a per-head shortcut weight (AgentSD's training-free form uses c = 0.075). Cost
O(N·n·d) instead of O(N²·d). Agents are usually the average-pooled queries (`pool_agents`).
"""
from __future__ import annotations

import torch


def agent_attention_ref(
    q: torch.Tensor,                    # [B, H, N, D]
    k: torch.Tensor,                    # [B, Hkv, N, D]
    v: torch.Tensor,                    # [B, Hkv, N, Dv]
    agents: torch.Tensor,               # [B, H, n, D]
    key_mask: torch.Tensor | None,      # bool [B, N], True = real token
    scale1: torch.Tensor,               # [H]
    scale2: torch.Tensor,               # [H]
    bias1: torch.Tensor | None,         # [(B,) H, n, N]
    bias2: torch.Tensor | None,         # [(B,) H, N, n]
    shortcut: torch.Tensor,             # [H]
) -> torch.Tensor:
    """Returns O in fp32, [B, H, N, Dv]. An agent that sees no valid key aggregates 0."""
    q, k, v, a = q.float(), k.float(), v.float(), agents.float()
    H = q.shape[1]
    k = k.repeat_interleave(H // k.shape[1], dim=1)                 # [B, H, N, D]
    v = v.repeat_interleave(H // v.shape[1], dim=1)                 # [B, H, N, Dv]
    per_head = lambda t: t.float().view(1, H, 1, 1)                 # noqa: E731

    # stage 1: the agents attend to the keys
    s1 = (a @ k.transpose(-1, -2)) * per_head(scale1)               # [B, H, n, N]
    if bias1 is not None:
        s1 = s1 + bias1.float()
    if key_mask is not None:
        s1 = s1.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    lse1 = torch.logsumexp(s1, dim=-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
    v_agents = torch.exp(s1 - lse1) @ v                             # [B, H, n, Dv]

    # stage 2: the queries attend to the agents
    s2 = (q @ a.transpose(-1, -2)) * per_head(scale2)               # [B, H, N, n]
    if bias2 is not None:
        s2 = s2 + bias2.float()
    return torch.softmax(s2, dim=-1) @ v_agents + per_head(shortcut) * v
