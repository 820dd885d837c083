"""`rewriter::block_sparse_attention` and `rewriter::block_sparse_attention_lse`: exact softmax
attention of each query block over a listed subset of key blocks.

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

Implementations: CPU (and any non-CUDA device) = cpu.py, PyTorch over chunks of query blocks,
each gathering its listed K/V blocks for one masked softmax, never building T_q × T_k; CUDA = the
Triton kernel in triton.py; autograd recomputes through cpu.py's blockwise math; ONNX = onnx.py,
a dense boolean mask built from the table + masked softmax (exact, O(T_q·T_k) memory: fine for
moderate sizes); reference.py = the fp32 ground truth. The routing that makes the tables at run
time (BiFormer block routing, k-means clusters) is in rewriter.kernels.routed_attention.
"""
from __future__ import annotations

import torch

from rewriter.kernels import register_onnx

from .cpu import acc_dtype, block_sparse_attention_torch, blockwise_attention, validate_block_table
from .onnx import block_sparse_attention_lse_onnx, block_sparse_attention_onnx
from .reference import block_sparse_attention_ref, dense_block_mask

__all__ = [
    "block_sparse_attention", "block_sparse_attention_lse", "block_sparse_attention_ref",
    "block_sparse_attention_torch", "dense_block_mask", "validate_block_table",
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


# --------------------------------------------------------------------------- custom ops

def _forward_cpu(q, k, v, block_table, block_size, causal, key_mask, scale, want_lse=True):
    _check_inputs(q, k, v, block_table, block_size, causal, key_mask)
    validate_block_table(block_table, (k.shape[2] + block_size - 1) // block_size)
    with torch.no_grad():
        out, lse = block_sparse_attention_torch(q, k, v, block_table, block_size, causal, key_mask, scale, want_lse)
    return out.contiguous(), (lse.contiguous() if want_lse else None)


def _forward_cuda(q, k, v, block_table, block_size, causal, key_mask, scale):
    from .triton import block_sparse_attention_triton
    _check_inputs(q, k, v, block_table, block_size, causal, key_mask)
    return block_sparse_attention_triton(q, k, v, block_table, block_size, causal, key_mask, scale)


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
    return q.new_empty(B, H, t_q, v.shape[-1]), q.new_empty(B, H, t_q, dtype=acc_dtype(q.dtype))


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
        results = blockwise_attention(*xs, block_table, block_size, causal, key_mask, scale, want_lse=len(grads) == 2)
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


register_onnx(torch.ops.rewriter.block_sparse_attention.default, block_sparse_attention_onnx)
register_onnx(torch.ops.rewriter.block_sparse_attention_lse.default, block_sparse_attention_lse_onnx)
