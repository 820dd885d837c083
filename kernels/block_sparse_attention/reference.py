"""Block-sparse attention, the readable fp32 ground truth.

Bi-level routing attention (BiFormer, Zhu et al., CVPR 2023, arXiv:2303.08125) and the
Routing Transformer (Roy et al., TACL 2021, arXiv:2003.05997) both reduce to one primitive:
tokens are cut into blocks of `block_size`; query block i attends, with exact softmax
attention, only to the key blocks listed in `block_table[b, h, i, :]` (-1 = unused slot).

    visible[i, j] = block(j) ∈ table[block(i)]  ∧  key_mask[j]  ∧  (j ≤ i if causal)
    O_i   = Σ_j softmax_j(q_i·k_j·scale | visible) v_j        (0 when no key is visible)
    lse_i = log Σ_{j visible} exp(q_i·k_j·scale)             (-inf when no key is visible)

This file materializes the dense [T_q, T_k] mask on purpose: it is the definition, not the
fast path (the CPU impl in cpu.py and the Triton kernel never build it).
"""
from __future__ import annotations

import torch


def dense_block_mask(block_table: torch.Tensor, block_size: int, t_q: int, t_k: int) -> torch.Tensor:
    """[B, H, n_qblocks, max_kblocks] table -> bool [B, H, t_q, t_k]: True where key j's block
    is listed for query i's block. Entries -1 list nothing."""
    n_kblocks = -(-t_k // block_size)
    table = block_table.long()
    listed = torch.zeros(*table.shape[:3], n_kblocks + 1, dtype=torch.bool, device=table.device)
    # slot n_kblocks collects the -1 padding and is dropped below
    listed.scatter_(-1, torch.where(table < 0, n_kblocks, table), True)
    listed = listed[..., :n_kblocks]                                   # [B, H, nqb, nkb]
    q_block = torch.arange(t_q, device=table.device) // block_size     # [t_q]
    k_block = torch.arange(t_k, device=table.device) // block_size     # [t_k]
    return listed[:, :, q_block][..., k_block]                         # [B, H, t_q, t_k]


def block_sparse_attention_ref(
    q: torch.Tensor,                 # [B, H, T_q, D]
    k: torch.Tensor,                 # [B, Hkv, T_k, D]
    v: torch.Tensor,                 # [B, Hkv, T_k, Dv]
    block_table: torch.Tensor,       # int [B, H, ceil(T_q / block_size), max_kblocks], -1 padded
    block_size: int,
    causal: bool = False,
    key_mask: torch.Tensor | None = None,   # bool [B, T_k], True = real token
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (out fp32 [B, H, T_q, Dv], lse fp32 [B, H, T_q])."""
    q, k, v = q.float(), k.float(), v.float()
    B, H, t_q, D = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    k = k.repeat_interleave(H // h_kv, dim=1)                          # [B, H, T_k, D]
    v = v.repeat_interleave(H // h_kv, dim=1)                          # [B, H, T_k, Dv]

    visible = dense_block_mask(block_table, block_size, t_q, t_k)      # [B, H, T_q, T_k]
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :].bool()
    if causal:
        visible = visible & torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril()

    scores = (q @ k.transpose(-1, -2)) * scale                         # [B, H, T_q, T_k]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                              # -inf on empty rows
    probs = torch.exp(scores - lse[..., None].clamp(min=torch.finfo(torch.float32).min))
    probs = probs.masked_fill(~visible, 0.0)                           # empty rows -> 0, not NaN
    return probs @ v, lse
