"""`rewriter::block_sparse_attention` and `rewriter::block_sparse_attention_lse`: exact softmax
attention of each query block over a listed subset of key blocks, plus the routing helpers.

BiFormer bi-level routing attention (Zhu et al., CVPR 2023, arXiv:2303.08125): region means of
q and k, region affinity Qʳ Kʳᵀ, each query region keeps its top-k key regions and attends
exactly to their tokens. Routing Transformer (Roy et al., TACL 2021, arXiv:2003.05997) routes
by k-means clusters instead; its rule runs one call per cluster set and merges the partial
results by log-sum-exp, which is what the `_lse` variant returns:

    out = Σ_c exp(lse_c − lse) · out_c,   lse = logsumexp_c(lse_c)

Ops (T_q = query length, T_k = key length, H query heads, Hkv kv heads, H % Hkv == 0):

    block_sparse_attention(q [B,H,T_q,D], k [B,Hkv,T_k,D], v [B,Hkv,T_k,Dv],
                           block_table int32 [B,H,ceil(T_q/bs),max_kblocks] (-1 padded),
                           block_size: int, causal: bool, key_mask bool [B,T_k] | None,
                           scale: float) -> out [B,H,T_q,Dv]
    block_sparse_attention_lse(same) -> (out, lse fp32 [B,H,T_q]; fp64 for fp64 inputs)

Entries of one table row must be distinct block indices in [0, ceil(T_k/bs)) (the CPU impl
checks; the CUDA kernel trusts the table): a duplicate would be counted twice. `causal`
compares original positions (key j visible to query i iff j ≤ i) and needs T_q == T_k.
A query row that sees no key returns 0 and lse = -inf, never NaN. With every allowed block
listed the op is exact attention (tests compare with SDPA).

Implementations: CPU (and any non-CUDA device) = PyTorch over chunks of query blocks, each
gathering its listed K/V blocks for one masked softmax, never building T_q × T_k; CUDA = the Triton kernel in
triton.py; autograd recomputes through the blockwise PyTorch math; ONNX = dense boolean mask
built from the table + masked softmax (exact, O(T_q·T_k) memory: fine for moderate sizes).
"""
from __future__ import annotations

import torch

from rewriter.kernels import onnx_repeat_kv, register_onnx

from .reference import block_sparse_attention_ref, dense_block_mask

__all__ = [
    "block_sparse_attention", "block_sparse_attention_lse", "block_means", "topk_block_table",
    "validate_block_table", "block_sparse_attention_ref", "dense_block_mask",
]


# --------------------------------------------------------------------------- checks

def _check_inputs(q, k, v, block_table, block_size, causal, key_mask) -> None:
    name = "rewriter::block_sparse_attention"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"{name}: q, k, v must be [B, heads, T, head_dim]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    B, H, t_q, D = q.shape
    if k.shape[0] != B or k.shape[-1] != D or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{name}: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if H % k.shape[1] != 0:
        raise ValueError(f"{name}: {H} query heads are not a multiple of {k.shape[1]} kv heads")
    if block_size < 1:
        raise ValueError(f"{name}: block_size must be ≥ 1, got {block_size}")
    n_qblocks = (t_q + block_size - 1) // block_size
    if block_table.dim() != 4 or tuple(block_table.shape[:3]) != (B, H, n_qblocks):
        raise ValueError(f"{name}: block_table must be [B={B}, H={H}, n_qblocks={n_qblocks}, max_kblocks]; "
                         f"got {tuple(block_table.shape)}")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: block_table must be int32 (or int64), got {block_table.dtype}")
    if causal and t_q != k.shape[2]:
        raise ValueError(f"{name}: causal needs equal query and key lengths, got {t_q} and {k.shape[2]}")
    if key_mask is not None and tuple(key_mask.shape) != (B, k.shape[2]):
        raise ValueError(f"{name}: key_mask must be [B={B}, T_k={k.shape[2]}], got {tuple(key_mask.shape)}")


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


# --------------------------------------------------------------------------- PyTorch impl

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / lse dtype: fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


# score elements per chunk of query blocks (32 MiB in fp32): bounds the CPU path's memory;
# a round budget, not a tuned value
_SCORE_BUDGET = 1 << 23


def _blockwise(q, k, v, block_table, block_size: int, causal: bool, key_mask, scale: float,
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
    acc = _acc_dtype(q.dtype)
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


def _by_head_width(q, k, v, block_table, block_size: int, causal: bool, key_mask, scale: float, want_lse: bool):
    """`_blockwise` when heads list different numbers of blocks (per-head budgets): the PyTorch
    path computes every slot of the table's width, so heads are grouped by how many blocks their
    rows list at most and each group runs on its own slice of the table (unused slots dropped:
    rows are sorted so that -1 comes last; the order of a row's blocks does not change the result)."""
    H = q.shape[1]
    width = (block_table >= 0).sum(-1).amax(dim=(0, 2)) if block_table.numel() else None   # [H]
    if width is None or bool((width == width[0]).all()):
        return _blockwise(q, k, v, block_table, block_size, causal, key_mask, scale, want_lse)
    table = block_table.sort(dim=-1, descending=True).values
    group = H // k.shape[1]
    out = q.new_empty(*q.shape[:3], v.shape[-1])
    lse = torch.empty(*q.shape[:3], dtype=_acc_dtype(q.dtype), device=q.device) if want_lse else None
    for w in width.unique().tolist():
        heads = (width == w).nonzero().view(-1)
        kv = heads // group
        o, l = _blockwise(q[:, heads], k[:, kv], v[:, kv], table[:, heads, :, :max(w, 1)], block_size, causal,
                          key_mask, scale, want_lse)
        out[:, heads] = o
        if want_lse:
            lse[:, heads] = l
    return out, lse


def _forward_cpu(q, k, v, block_table, block_size, causal, key_mask, scale, want_lse=True):
    _check_inputs(q, k, v, block_table, block_size, causal, key_mask)
    validate_block_table(block_table, (k.shape[2] + block_size - 1) // block_size)
    with torch.no_grad():
        out, lse = _by_head_width(q, k, v, block_table, block_size, causal, key_mask, scale, want_lse)
    return out.contiguous(), (lse.contiguous() if want_lse else None)


def _forward_cuda(q, k, v, block_table, block_size, causal, key_mask, scale):
    from .triton import block_sparse_attention_triton
    _check_inputs(q, k, v, block_table, block_size, causal, key_mask)
    return block_sparse_attention_triton(q, k, v, block_table, block_size, causal, key_mask, scale)


# --------------------------------------------------------------------------- custom ops

@torch.library.custom_op("rewriter::block_sparse_attention_lse", mutates_args=())
def _bsa_lse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
                block_size: int, causal: bool, key_mask: torch.Tensor | None,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_cpu(q, k, v, block_table, block_size, causal, key_mask, scale)


@torch.library.custom_op("rewriter::block_sparse_attention", mutates_args=())
def _bsa_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_table: torch.Tensor,
            block_size: int, causal: bool, key_mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    return _forward_cpu(q, k, v, block_table, block_size, causal, key_mask, scale, want_lse=False)[0]


@_bsa_lse_op.register_kernel("cuda")
def _(q, k, v, block_table, block_size, causal, key_mask, scale):
    return _forward_cuda(q, k, v, block_table, block_size, causal, key_mask, scale)


@_bsa_op.register_kernel("cuda")
def _(q, k, v, block_table, block_size, causal, key_mask, scale):
    return _forward_cuda(q, k, v, block_table, block_size, causal, key_mask, scale)[0]


@_bsa_lse_op.register_fake
def _(q, k, v, block_table, block_size, causal, key_mask, scale):
    B, H, t_q, _ = q.shape
    return q.new_empty(B, H, t_q, v.shape[-1]), q.new_empty(B, H, t_q, dtype=_acc_dtype(q.dtype))


@_bsa_op.register_fake
def _(q, k, v, block_table, block_size, causal, key_mask, scale):
    return q.new_empty(*q.shape[:3], v.shape[-1])


def _setup_context(ctx, inputs, output):
    q, k, v, block_table, block_size, causal, key_mask, scale = inputs
    ctx.save_for_backward(q, k, v, block_table, key_mask)
    ctx.args = (block_size, causal, scale)


def _recompute_grads(ctx, grads):
    """Gradients by autograd through the blockwise PyTorch math (recomputed, fp32)."""
    q, k, v, block_table, key_mask = ctx.saved_tensors
    block_size, causal, scale = ctx.args
    none = (None,) * 5
    with torch.enable_grad():
        xs = [t.detach().requires_grad_(ctx.needs_input_grad[i]) for i, t in enumerate((q, k, v))]
        wanted = [x for x in xs if x.requires_grad]
        results = _blockwise(*xs, block_table, block_size, causal, key_mask, scale, want_lse=len(grads) == 2)
        pairs = [(r, g) for r, g in zip(results, grads) if g is not None]
        if not wanted or not pairs:
            return (None, None, None) + none
        got = list(torch.autograd.grad([r for r, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True))
    return tuple(got.pop(0) if x.requires_grad else None for x in xs) + none


def _backward_lse(ctx, g_out, g_lse):
    return _recompute_grads(ctx, (g_out, g_lse))


def _backward(ctx, g_out):
    return _recompute_grads(ctx, (g_out,))


_bsa_lse_op.register_autograd(_backward_lse, setup_context=_setup_context)
_bsa_op.register_autograd(_backward, setup_context=_setup_context)


def block_sparse_attention(q, k, v, block_table, block_size: int, *, causal: bool = False,
                           key_mask: torch.Tensor | None = None, scale: float | None = None,
                           return_lse: bool = False):
    """Calls `rewriter::block_sparse_attention` (or `_lse` when return_lse). scale defaults to
    head_dim ** -0.5."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if return_lse:
        return torch.ops.rewriter.block_sparse_attention_lse(q, k, v, block_table, block_size, causal,
                                                             key_mask, scale)
    return torch.ops.rewriter.block_sparse_attention(q, k, v, block_table, block_size, causal, key_mask, scale)


def block_sparse_attention_lse(q, k, v, block_table, block_size: int, *, causal: bool = False,
                               key_mask: torch.Tensor | None = None, scale: float | None = None):
    """(out, lse): for merging several partial attentions by log-sum-exp (k-means routing)."""
    return block_sparse_attention(q, k, v, block_table, block_size, causal=causal, key_mask=key_mask,
                                  scale=scale, return_lse=True)


# --------------------------------------------------------------------------- routing helpers

def _block_counts(t: int, block_size: int, key_mask: torch.Tensor | None, batch: int, device):
    """Valid tokens per block: [B, n_blocks] float, and the padded validity [B, n_blocks, bs]."""
    n_blocks = (t + block_size - 1) // block_size
    ok = torch.arange(n_blocks * block_size, device=device) < t
    ok = ok.expand(batch, -1) if key_mask is None else ok & torch.nn.functional.pad(
        key_mask.bool(), (0, n_blocks * block_size - t))
    ok = ok.view(batch, n_blocks, block_size)
    return ok.sum(-1).float(), ok


def block_means(x: torch.Tensor, block_size: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of x [B, H, T, D] over the valid tokens of each block of `block_size` tokens
    (padding from key_mask [B, T] and the ragged tail excluded) -> [B, H, ceil(T/bs), D] in
    x.dtype; a block with no valid token gets zeros. BiFormer's region-level queries/keys."""
    B, H, t, D = x.shape
    counts, ok = _block_counts(t, block_size, key_mask, B, x.device)              # [B, nb], [B, nb, bs]
    n_blocks = counts.shape[1]
    xp = torch.nn.functional.pad(x.float(), (0, 0, 0, n_blocks * block_size - t))
    xp = xp.view(B, H, n_blocks, block_size, D) * ok[:, None, :, :, None]
    return (xp.sum(3) / counts.clamp(min=1)[:, None, :, None]).to(x.dtype)


def topk_block_table(q: torch.Tensor, k: torch.Tensor, block_size: int, topk: int, *,
                     causal: bool = False, sink_blocks: list[int] | None = None,
                     key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """BiFormer region routing -> int32 block table [B, H, n_qblocks, max_kblocks] (-1 padded,
    ascending). Each query block keeps its own block, the `sink_blocks` (e.g. [0] for an
    attention sink / CLS), and the `topk` other key blocks of highest region affinity
    Qʳ·Kʳᵀ (block means of q and k, padding excluded). Only allowed blocks are listed:
    causal keeps blocks ≤ the query block, and key blocks without a valid token are dropped.
    topk ≥ n_kblocks lists every allowed block (then the op is exact attention)."""
    B, H, t_q, _ = q.shape
    h_kv, t_k = k.shape[1], k.shape[2]
    if topk < 0:
        raise ValueError(f"topk_block_table: topk must be ≥ 0, got {topk}")
    if H % h_kv:
        raise ValueError(f"topk_block_table: {H} query heads are not a multiple of {h_kv} kv heads")
    if causal and t_q != t_k:
        raise ValueError(f"topk_block_table: causal needs equal query and key lengths, got {t_q} and {t_k}")
    n_qb, n_kb = (t_q + block_size - 1) // block_size, (t_k + block_size - 1) // block_size
    sinks = sorted(set(sink_blocks or []))
    if sinks and (sinks[0] < 0 or sinks[-1] >= n_kb):
        raise ValueError(f"topk_block_table: sink_blocks {sinks} outside [0, {n_kb}) key blocks")

    q_r = block_means(q, block_size).float()                                      # [B, H, n_qb, D]
    k_r = block_means(k, block_size, key_mask).float().repeat_interleave(H // h_kv, dim=1)
    affinity = q_r @ k_r.transpose(-1, -2)                                        # [B, H, n_qb, n_kb]

    qb = torch.arange(n_qb, device=q.device)[:, None]
    kb = torch.arange(n_kb, device=q.device)[None, :]
    forced = kb == qb                                                             # own block
    for s in sinks:
        forced = forced | (kb == s)
    allowed = (_block_counts(t_k, block_size, key_mask, B, q.device)[0] > 0)[:, None, None, :]  # [B,1,1,n_kb]
    if causal:
        allowed = allowed & (kb <= qb)
    forced = forced & allowed                                                     # [B, 1, n_qb, n_kb]

    score = torch.where(forced, float("inf"), affinity)
    score = score.masked_fill(~allowed, float("-inf"))
    max_kb = min(n_kb, topk + 1 + len(sinks))
    top = score.topk(max_kb, dim=-1)                                              # forced ones come first
    keep = torch.arange(max_kb, device=q.device) < (topk + forced.sum(-1, keepdim=True))
    keep = keep & (top.values > float("-inf"))
    table = torch.where(keep, top.indices, n_kb).sort(dim=-1).values              # ascending, n_kb last
    table = torch.where(table == n_kb, -1, table)
    return table.expand(B, H, n_qb, max_kb).to(torch.int32).contiguous()


# --------------------------------------------------------------------------- ONNX

def _onnx_dense_attention(q, k, v, block_table, block_size, causal, key_mask, scale):
    """Exact ONNX form: dense visibility mask from the table, then masked softmax written out
    so that rows with no visible key give 0 and lse = -inf (opset 18)."""
    from onnxscript import opset18 as op

    heads, kv_heads, head_dim = q.shape[1], k.shape[1], k.shape[3]
    if not all(isinstance(n, int) for n in (heads, kv_heads, head_dim)):
        raise ValueError("block_sparse_attention ONNX translation: heads and head_dim must be static, got "
                         f"q {q.shape}, k {k.shape}")
    i64 = lambda vals: op.Constant(value_ints=list(vals))          # noqa: E731
    zero, one, bs = (op.Constant(value_int=x) for x in (0, 1, block_size))

    k, v = onnx_repeat_kv(k, heads), onnx_repeat_kv(v, heads)     # GQA: [B,Hkv,T,D] -> [B,H,T,D]
    t_q = op.Squeeze(op.Slice(op.Shape(q), i64([2]), i64([3])))
    t_k = op.Squeeze(op.Slice(op.Shape(k), i64([2]), i64([3])))
    n_kb = op.Div(op.Sub(op.Add(t_k, bs), one), bs)
    q_pos, k_pos = op.Range(zero, t_q, one), op.Range(zero, t_k, one)

    listed = op.Equal(op.Unsqueeze(op.Cast(block_table, to=7), i64([-1])), op.Range(zero, n_kb, one))
    listed = op.ReduceMax(op.Cast(listed, to=7), i64([3]), keepdims=0)           # [B, H, nqb, nkb] int64
    listed = op.Gather(op.Gather(listed, op.Div(q_pos, bs), axis=2), op.Div(k_pos, bs), axis=3)
    visible = op.Greater(listed, op.Constant(value_int=0))                      # [B, H, T_q, T_k]
    if causal:
        visible = op.And(visible, op.LessOrEqual(op.Unsqueeze(k_pos, i64([0])), op.Unsqueeze(q_pos, i64([1]))))
    if key_mask is not None:
        visible = op.And(visible, op.Unsqueeze(op.Cast(key_mask, to=9), i64([1, 2])))

    s = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), op.CastLike(op.Constant(value_float=scale), q))
    s = op.Where(visible, s, op.CastLike(op.Constant(value_float=float("-inf")), s))
    m = op.ReduceMax(s, i64([-1]), keepdims=1)
    m = op.Where(op.IsInf(m), op.CastLike(op.Constant(value_float=0.0), m), m)
    e = op.Exp(op.Sub(s, m))
    l = op.ReduceSum(e, i64([-1]), keepdims=1)
    seen = op.Greater(l, op.CastLike(op.Constant(value_float=0.0), l))
    l_safe = op.Where(seen, l, op.CastLike(op.Constant(value_float=1.0), l))
    out = op.MatMul(op.Div(e, l_safe), v)
    lse = op.Where(seen, op.Add(m, op.Log(l_safe)), op.CastLike(op.Constant(value_float=float("-inf")), l))
    return out, op.Cast(op.Squeeze(lse, i64([-1])), to=1)


def _onnx_bsa(q, k, v, block_table, block_size, causal, key_mask, scale):
    return _onnx_dense_attention(q, k, v, block_table, block_size, causal, key_mask, scale)[0]


register_onnx(torch.ops.rewriter.block_sparse_attention.default, _onnx_bsa)
register_onnx(torch.ops.rewriter.block_sparse_attention_lse.default, _onnx_dense_attention)
