"""`rewriter::block_sparse_attention(_lse)` in PyTorch: a chunk of query blocks at a time, each
gathering its listed K/V blocks for one masked softmax, never building T_q × T_k. The CPU impl
(any non-CUDA device), and what autograd recomputes (`blockwise_attention` is differentiable).
`validate_block_table` is the CPU path's check of the table (the CUDA kernel trusts it)."""
from __future__ import annotations

import torch


def validate_block_table(block_table: torch.Tensor, n_kblocks: int) -> None:
    """Raise if an entry is outside [-1, n_kblocks) or a row lists a block twice."""
    if block_table.numel() == 0:
        return
    lo, hi = int(block_table.min()), int(block_table.max())
    if lo < -1 or hi >= n_kblocks:
        raise ValueError(f"block_table: entries must lie in [-1, {n_kblocks}) (n_kblocks = ceil(T_k / block_size)); "
                         f"found values in [{lo}, {hi}]")
    s = block_table.sort(dim=-1).values
    dup = (s[..., 1:] == s[..., :-1]) & (s[..., 1:] >= 0)
    if bool(dup.any()):
        where = tuple(int(i) for i in dup.nonzero()[0][:3])
        raise ValueError(f"block_table: row [b, h, qblock] = {list(where)} lists a key block twice; "
                         "entries of a row must be distinct")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / lse dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


# score elements per chunk of query blocks (2 MiB in fp32): bounds the CPU path's memory. Measured
# on SmolLM2's shapes at 8192 tokens (9 heads, b = 64, ~17 listed blocks, 1 thread): 2^23 → 6.8 s,
# 2^21 → 5.9 s, 2^19 → 5.3 s; the chunk's gathered K/V, scores and probabilities stay small
# enough to be reused from the allocator's pool instead of being fresh pages each chunk
_SCORE_BUDGET = 1 << 19


def blockwise_attention(q, k, v, block_table, block_size: int, causal: bool, key_mask, scale: float,
                        want_lse: bool = True):
    """Exact attention over the listed blocks in PyTorch, a chunk of query blocks at a time:
    gather (index_select) the chunk's listed K/V blocks ([B, H, c, max_kblocks·bs, D]) and run one masked
    softmax. Memory O(chunk), never T_q × T_k; differentiable (used for autograd too).
    Returns (out [B, H, T_q, Dv] in q.dtype, lse [B, H, T_q] or None)."""
    B, H, t_q, D = q.shape
    h_kv, t_k, d_v = k.shape[1], k.shape[2], v.shape[-1]
    group, bs = H // h_kv, block_size
    n_qb, n_kb = (t_q + bs - 1) // bs, (t_k + bs - 1) // bs
    max_kb = block_table.shape[-1]
    acc = acc_dtype(q.dtype)
    pad = torch.nn.functional.pad

    q_b = pad(q.to(acc), (0, 0, 0, n_qb * bs - t_q)).reshape(B, H, n_qb, bs, D)
    k_b = pad(k.to(acc), (0, 0, 0, n_kb * bs - t_k)).reshape(B, h_kv, n_kb, bs * D)
    v_b = pad(v.to(acc), (0, 0, 0, n_kb * bs - t_k)).reshape(B, h_kv, n_kb, bs * d_v)
    key_ok = torch.arange(n_kb * bs, device=q.device) < t_k                        # ragged tail
    key_ok = key_ok.expand(B, -1) if key_mask is None else key_ok & pad(key_mask.bool(), (0, n_kb * bs - t_k))
    key_ok = key_ok.view(B, 1, n_kb, bs).expand(B, h_kv, n_kb, bs)
    key_ok = key_ok.contiguous()
    table = block_table.long().view(B, h_kv, group, n_qb, max_kb)                  # GQA: heads grouped
    bh_base = (torch.arange(B * h_kv, device=q.device) * n_kb).view(B, h_kv, 1)   # first block row of (b, hkv)

    per_chunk = max(1, _SCORE_BUDGET // (B * H * bs * max_kb * bs))
    outs, lses = [], []
    for c0 in range(0, n_qb, per_chunk):
        c1 = min(n_qb, c0 + per_chunk)
        c = c1 - c0
        idx = table[:, :, :, c0:c1]                                                # [B, Hkv, G, c, max_kb]
        listed = (idx >= 0).reshape(B, H, c, max_kb, 1)
        idx = idx.clamp(min=0).reshape(B, h_kv, group * c * max_kb)
        rows = (idx + bh_base).reshape(-1)                                         # rows of [B·Hkv·n_kb, ·]
        k_c = k_b.reshape(-1, bs * D).index_select(0, rows).view(B, H, c, max_kb * bs, D)
        v_c = v_b.reshape(-1, bs * d_v).index_select(0, rows).view(B, H, c, max_kb * bs, d_v)
        ok = key_ok.reshape(-1, bs).index_select(0, rows).view(B, H, c, max_kb, bs)
        visible = (ok & listed).view(B, H, c, 1, max_kb * bs)
        if causal:                                                                 # original positions
            k_pos = (idx.view(B, H, c, max_kb, 1) * bs + torch.arange(bs, device=q.device)).view(B, H, c, 1, -1)
            q_pos = torch.arange(c0 * bs, c1 * bs, device=q.device).view(1, 1, c, bs, 1)
            visible = visible & (k_pos <= q_pos)                                   # [B, H, c, bs, max_kb·bs]
        s = (q_b[:, :, c0:c1] * scale) @ k_c.transpose(-1, -2)                     # [B, H, c, bs, max_kb·bs]
        s.masked_fill_(~visible, float("-inf"))        # in place: s is a fresh GEMM output
        seen = visible.any(-1, keepdim=True)
        if not bool(seen.all()):
            s.masked_fill_(~seen, 0.0)                 # rows that see nothing: finite dummies, zeroed below
        outs.append((torch.softmax(s, dim=-1) @ v_c) * seen)                      # [B, H, c, bs, Dv]
        if want_lse:
            lses.append(torch.where(seen[..., 0], torch.logsumexp(s, dim=-1), float("-inf")))
    out = torch.cat(outs, dim=2).view(B, H, n_qb * bs, d_v)[:, :, :t_q].to(q.dtype)
    if not want_lse:
        return out, None
    lse = torch.cat([x.expand(B, H, x.shape[2], bs) for x in lses], dim=2).reshape(B, H, n_qb * bs)
    return out, lse[:, :, :t_q]


def block_sparse_attention_torch(q, k, v, block_table, block_size: int, causal: bool, key_mask, scale: float,
                                 want_lse: bool = True):
    """The CPU impl: `blockwise_attention`, and when heads list different numbers of blocks
    (per-head budgets) one call per group of heads. The PyTorch path computes every slot of the
    table's width, so heads are grouped by how many blocks their rows list at most and each group
    runs on its own slice of the table (unused slots dropped: rows are sorted so that -1 comes
    last; the order of a row's blocks does not change the result)."""
    H = q.shape[1]
    width = (block_table >= 0).sum(-1).amax(dim=(0, 2)) if block_table.numel() else None   # [H]
    if width is None or bool((width == width[0]).all()):
        return blockwise_attention(q, k, v, block_table, block_size, causal, key_mask, scale, want_lse)
    table = block_table.sort(dim=-1, descending=True).values
    group = H // k.shape[1]
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    lse = torch.empty(*q.shape[:3], dtype=acc_dtype(q.dtype), device=q.device) if want_lse else None
    for w in width.unique().tolist():
        heads = (width == w).nonzero().view(-1)
        kv = heads // group
        o, l = blockwise_attention(q[:, heads], k[:, kv], v[:, kv], table[:, heads, :, :max(w, 1)], block_size,
                                   causal, key_mask, scale, want_lse)
        out[:, heads] = o
        if want_lse:
            lse[:, heads] = l
    return out, lse

