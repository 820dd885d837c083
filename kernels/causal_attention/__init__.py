"""`rewriter::causal_attention`: SDPA with the model's causal(+padding) mask, taking the fused
is_causal path whenever that mask turns out to be the plain causal triangle.

A traced decoder (HF Llama and friends) builds its mask from the `attention_mask` input as a
[B, 1, T, T] tensor and hands it to SDPA, so the traced graph always runs masked attention —
while eager HF, seeing no padding, calls SDPA with is_causal=True, which on the CPU is about
2× faster at 2048 tokens (one SmolLM2 layer: 211 → 101 ms, benchmarks/results/
routed_models_smollm2.json). This op keeps the mask as an input and decides per call:

    plain(mask)  →  sdpa(q, k, v, is_causal=True, scale)        (the fused causal kernel)
    otherwise    →  sdpa(q, k, v, attn_mask=mask, scale)          (exactly what the graph did)

plain(mask): T_q = T_k and the mask allows exactly the lower triangle for every sample (bool:
equals tril; additive float: 0 on the triangle and ≤ the dtype's lowest value elsewhere). Both
branches compute the same function on such a mask, so the op is exact; only the summation order
of the fused kernel differs (≈ 1e-7 relative in fp32).

Implementations: CPU and CUDA = the two SDPA calls above (PyTorch's own fused kernels: FlashAttention
on CUDA, the flash CPU kernel on CPU — nothing for a Triton kernel of ours to add); fake = the
output shape; ONNX = softmax attention with the mask (MatMul/Softmax, opset 18), the `otherwise`
branch, which is the same function (rows with no visible key give 0, as PyTorch's SDPA does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rewriter.kernels import onnx_masked_softmax, onnx_repeat_kv, register_onnx

__all__ = ["causal_attention", "plain_causal"]

_OP = "rewriter::causal_attention"


def plain_causal(mask: torch.Tensor) -> bool:
    """Whether `mask` ([..., T_q, T_k], bool or additive float) is exactly the causal triangle."""
    t_q, t_k = mask.shape[-2:]
    if t_q != t_k:
        return False
    tril = torch.ones(t_q, t_k, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, tril.expand_as(mask)))
    if not bool(((mask == 0) == tril).all()):
        return False
    return bool((mask.masked_fill(tril, float("-inf")) <= torch.finfo(mask.dtype).min).all())


@torch.library.custom_op(_OP, mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                     scale: float, enable_gqa: bool) -> torch.Tensor:
    if plain_causal(attn_mask):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=enable_gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale, enable_gqa=enable_gqa)
    return out.contiguous()         # one layout whichever SDPA backend ran (the fake promises it)


@causal_attention.register_fake
def _(q, k, v, attn_mask, scale, enable_gqa):
    return q.new_empty(*q.shape[:-1], v.shape[-1])


def _onnx_causal_attention(q, k, v, attn_mask, scale: float, enable_gqa: bool):
    """softmax(q·kᵀ·scale + mask)·v; GQA by expanding k/v over each kv head's query group."""
    from onnxscript import opset18 as op

    heads, kv_heads = q.shape[1], k.shape[1]
    if not isinstance(heads, int) or not isinstance(kv_heads, int):
        raise ValueError(f"causal_attention ONNX translation: head counts must be static; got q {q.shape}, k {k.shape}")
    k, v = onnx_repeat_kv(k, heads), onnx_repeat_kv(v, heads)
    s = op.Mul(op.MatMul(q, op.Transpose(k, perm=[0, 1, 3, 2])), op.CastLike(op.Constant(value_float=scale), q))
    if attn_mask.dtype != 9:                                        # additive float mask (9: onnx BOOL)
        return op.MatMul(op.Softmax(op.Add(s, op.CastLike(attn_mask, s)), axis=-1), v)
    return op.MatMul(onnx_masked_softmax(s, attn_mask), v)     # a left-padded row with no visible key → 0


register_onnx(torch.ops.rewriter.causal_attention.default, _onnx_causal_attention)
