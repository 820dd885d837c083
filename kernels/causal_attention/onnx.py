"""ONNX translation of `rewriter::causal_attention` (opset 18): softmax attention with the mask,
the op's `otherwise` branch, which is the same function on every mask."""
from __future__ import annotations

from rewriter.kernels._onnx_common import onnx_masked_softmax, onnx_repeat_kv


def causal_attention_onnx(q, k, v, attn_mask, scale: float, enable_gqa: bool):
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
