"""The agents of agent attention and the composite a rewritten graph calls: adaptive-average
pooling windows over each sample's real tokens (`agent_windows`, `pool_agents`), the fixed
locality biases (`agent_bias`), and `agent_block` = pool + biases + `rewriter::agent_attention`.

Plain tensor code with static Python hyperparameters and no data-dependent shapes: a rewritten
graph holds `agent_block` as a call_function node, and torch.export, torch.compile and the ONNX
exporter trace through it into aten ops plus the custom op.
"""
from __future__ import annotations

import torch


def agent_windows(key_mask: torch.Tensor | None, batch: int, tokens, n: int, prefix: int = 0,
                  device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each agent pools from, per sample: adaptive-average-pooling windows over the VALID
    tokens (key_mask [B, N] True; all when None) after the first `prefix` of them (e.g. CLS).

    n is capped at N − prefix (the static token count). A sample with L_b valid pooled tokens
    gets n_b = min(n, L_b) live agents, window i covering ranks [⌊i·L/n_b⌋, ⌈(i+1)·L/n_b⌉) (the
    adaptive_avg_pool1d rule); its agents n_b … n−1 are dead (zero weights) and must get no
    weight in stage 2 (`agent_bias` puts −inf there). So a sample's agents — and the op's
    output — do not depend on how much padding its batch adds: batch-invariant. Pure tensor
    math, no data-dependent shapes: it traces under torch.export.

    Returns weights [B, n, N] (each live row averages its window), live [B, n] bool, and
    distance [B, N, n]: token j's distance to agent i's window centre in units of the window
    width L_b/n_b (0 for tokens that are not pooled: padding and the prefix)."""
    if n < 1 or prefix < 0:
        raise ValueError(f"pool_agents: need n ≥ 1 and prefix ≥ 0, got n={n}, prefix={prefix}")
    if key_mask is not None and tuple(key_mask.shape) != (batch, tokens):
        raise ValueError(f"pool_agents: key_mask must be [B={batch}, N={tokens}], got {tuple(key_mask.shape)}")
    n_out = torch.sym_min(n, tokens - prefix) if isinstance(tokens, torch.SymInt) else min(n, tokens - prefix)
    if isinstance(n_out, int) and n_out < 1:
        raise ValueError(f"pool_agents: prefix={prefix} leaves no token to pool out of N={tokens}")
    valid = (torch.ones(batch, tokens, dtype=torch.bool, device=device) if key_mask is None
             else key_mask.bool())
    rank = valid.long().cumsum(-1) - 1 - prefix                   # rank among pooled tokens, [B, N]
    pooled = valid & (rank >= 0)
    length = pooled.sum(-1, keepdim=True)                         # L_b, [B, 1]
    live_n = length.clamp(min=1, max=n_out)                       # n_b, [B, 1]
    i = torch.arange(n_out, device=valid.device)                  # [n]
    live = i < live_n                                             # [B, n]
    start = (i * length) // live_n                                # [B, n]
    end = ((i + 1) * length + live_n - 1) // live_n
    window = (pooled[:, None, :] & live[..., None]
              & (rank[:, None, :] >= start[..., None]) & (rank[:, None, :] < end[..., None]))
    weights = window.float() / (end - start).clamp(min=1)[..., None].float()          # [B, n, N]
    centre = (start + end - 1).float() / 2                                            # [B, n]
    width = (length.float() / live_n.float()).clamp(min=1.0)                          # [B, 1]
    distance = (rank[:, :, None].float() - centre[:, None, :]).abs() / width[..., None]
    distance = distance * pooled[:, :, None]                                          # [B, N, n]
    return weights, live, distance


def pool_agents(q: torch.Tensor, n: int, key_mask: torch.Tensor | None = None, prefix: int = 0) -> torch.Tensor:
    """Agent tokens [B, H, min(n, N − prefix), D] in q.dtype: adaptive average pooling of
    q [B, H, N, D] over the valid tokens (`agent_windows`; dead agents of short samples are 0)."""
    B, H, N, D = q.shape
    weights, _, _ = agent_windows(key_mask, B, N, n, prefix, q.device)
    return torch.einsum("bnt,bhtd->bhnd", weights.to(q.dtype), q)


def agent_bias(live: torch.Tensor, distance: torch.Tensor, beta1: torch.Tensor | None,
               beta2: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The agent biases from `agent_windows`: B₂ [B, H, N, n] = −β₂,h · distance, −inf at dead
    agents; B₁ [B, H, n, N] = −β₁,h · distanceᵀ (None when beta1 is None). β per head, [H]."""
    b2 = -beta2.float()[None, :, None, None] * distance[:, None]
    b2 = b2.masked_fill(~live[:, None, None, :], float("-inf"))
    b1 = None if beta1 is None else -beta1.float()[None, :, None, None] * distance.transpose(1, 2)[:, None]
    return b1, b2


def agent_block(q, k, v, key_mask, scale1, scale2, shortcut, beta, *, agents: int, prefix: int,
                stage1_bias: bool = False) -> torch.Tensor:
    """Pool agents from q over each sample's real tokens, build the agent biases (−inf on the
    dead agents of short samples, −β·window distance), then the two-softmax agent attention op.
    What the agent_attention rule puts in the graph; beta [H, (β₁, β₂)], β₁ used with stage1_bias."""
    B, _, T, _ = q.shape
    weights, live, distance = agent_windows(key_mask, B, T, agents, prefix, q.device)
    a = torch.einsum("bnt,bhtd->bhnd", weights.to(q.dtype), q)
    b1, b2 = agent_bias(live, distance, beta[:, 0] if stage1_bias else None, beta[:, 1])
    return torch.ops.rewriter.agent_attention(q, k, v, a, key_mask, scale1, scale2, b1, b2, shortcut)
