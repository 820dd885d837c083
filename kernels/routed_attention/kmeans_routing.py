"""Routing Transformer attention at run time (Roy et al., TACL 2021, arXiv:2003.05997): tokens
join balanced clusters around fixed (calibrated) centroids by their shared-QK routing vectors,
each cluster is one block of `rewriter::block_sparse_attention_lse`, and a token's partial
results (its clusters, plus an optional local block) are merged by log-sum-exp.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .block_routing import route_blocks
from .masks import NEG_INF, alignment, along_tokens


def routing_vectors(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """r = normalize(q̂ + k̂), [B, H, T, D] fp32: one unit vector per token and head, so that a
    token joins a cluster as query and as key together (the Routing Transformer's shared-QK
    routing), which keeps the causal mask on original positions exact inside a cluster."""
    H = q.shape[1]
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    return F.normalize(F.normalize(q.float(), dim=-1) + F.normalize(k.float(), dim=-1), dim=-1)


def _gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D], idx [B, H, S] -> [B, H, S, D]."""
    return x.gather(2, idx.unsqueeze(-1).expand(*idx.shape, x.shape[-1]))


def kmeans_routed_attention(q, k, v, key_mask, centroids, *, window: int, causal: bool, scale: float,
                            local_block: int | None) -> torch.Tensor:
    """Routing-Transformer attention with fixed centroids [H, C, D].

    Every centroid takes the `window` tokens (real ones first) whose routing vectors score
    highest on it (balanced clusters); a cluster's tokens, in original order, form one block
    of the block-sparse op, which attends inside the block only (causal on original positions,
    because query slot i and key slot i are the same token). Optionally each token also attends
    its own local block of `local_block` tokens plus the first block (the Routing Transformer's
    local heads; it guarantees every token some context). A token's partial results — one per
    cluster it joined, plus the local one — are merged by log-sum-exp:
        out = Σ_p exp(lse_p − lse)·out_p,  lse = log Σ_p exp(lse_p)
    (a (query, key) pair that falls in two partials is counted in both: the approximation).
    With a key mask, each sample runs left-aligned (masks.py) and its output is rotated back, so
    left padding moves no local block."""
    back = None
    if key_mask is not None:
        to, back = alignment(key_mask)
        q, k, v, key_mask = (along_tokens(x, to) for x in (q, k, v, key_mask))
    B, H, t, D = q.shape
    d_v, C = v.shape[-1], centroids.shape[1]
    if k.shape[1] != H:                                      # GQA: clusters are per query head
        k, v = k.repeat_interleave(H // k.shape[1], 1), v.repeat_interleave(H // v.shape[1], 1)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()   # the op's CPU path views its inputs
    real = torch.ones(B, t, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()

    score = torch.einsum("bhtd,hcd->bhct", routing_vectors(q, k), centroids.float())       # [B, H, C, T]
    score = score.masked_fill(~real[:, None, None, :], -1e4)        # padding joins only when room is left
    w = torch.sym_min(window, t)
    members = score.topk(w, dim=-1).indices.sort(dim=-1).values                              # [B, H, C, w]
    members = F.pad(members, (0, window - w))                       # static block size; extra slots unused
    slot_ok = (torch.arange(window, device=q.device) < w).expand(B, H, C, window)
    idx = members.reshape(B, H, C * window)

    qg, kg, vg = (_gather_tokens(x, idx) for x in (q, k, v))                               # [B, H, C·w, ·]
    kmask = (real.unsqueeze(1).expand(B, H, t).gather(2, idx) & slot_ok.reshape(B, H, -1))
    table = torch.arange(C, device=q.device, dtype=torch.int32).view(1, 1, C, 1).expand(B * H, 1, C, 1)
    out_c, lse_c = torch.ops.rewriter.block_sparse_attention_lse(
        qg.reshape(B * H, 1, C * window, D), kg.reshape(B * H, 1, C * window, D),
        vg.reshape(B * H, 1, C * window, d_v), table.contiguous(), window, causal,
        kmask.reshape(B * H, C * window), scale)
    out_c = out_c.reshape(B, H, C * window, d_v).float()
    lse_c = lse_c.reshape(B, H, C * window).float().masked_fill(~slot_ok.reshape(B, H, -1), NEG_INF)

    if local_block is not None:
        local = route_blocks(q, k, key_mask, block_size=local_block, topk=0, causal=causal, sinks=("first",))
        out_l, lse_l = torch.ops.rewriter.block_sparse_attention_lse(q, k, v, local, local_block, causal,
                                                                     key_mask, scale)
        out_l, lse_l = out_l.float(), lse_l.float()
    else:
        out_l = torch.zeros(B, H, t, d_v, device=q.device)
        lse_l = torch.full((B, H, t), NEG_INF, device=q.device)

    m = lse_l.scatter_reduce(2, idx, lse_c, reduce="amax", include_self=True)               # [B, H, T]
    m = torch.where(torch.isfinite(m), m, 0.0)
    w_l = torch.exp(lse_l - m)
    w_c = torch.exp(lse_c - m.gather(2, idx))
    den = w_l.scatter_add(2, idx, w_c)
    num = (out_l * w_l[..., None]).scatter_add(2, idx[..., None].expand(-1, -1, -1, d_v), out_c * w_c[..., None])
    out = (num / den.clamp(min=1e-30)[..., None]).to(q.dtype)
    return out if back is None else along_tokens(out, back)

