"""ONNX translation of `rewriter::decode_attention` (opset 18): the visibility mask from
cache_position and key_valid, then a masked softmax with the G query heads of a kv head grouped
against the cache as stored (no repeated K/V). Dynamic batch, query count and cache length."""
from __future__ import annotations

from rewriter.kernels._onnx_common import onnx_masked_softmax


def decode_attention_onnx(q, k_cache, v_cache, cache_position, key_valid=None, scale: float | None = None):
    from onnxscript import opset18 as op

    heads, kv_heads, head_dim = q.shape[1], k_cache.shape[1], q.shape[3]
    if not all(isinstance(n, int) for n in (heads, kv_heads, head_dim)):
        raise ValueError("decode_attention ONNX translation: heads and head_dim must be static; got "
                         f"q {q.shape}, k_cache {k_cache.shape}")
    ints = lambda vals: op.Constant(value_ints=list(vals))          # noqa: E731
    scale = head_dim ** -0.5 if scale is None else scale
    L = op.Squeeze(op.Shape(k_cache, start=2, end=3))
    slots = op.Range(op.Constant(value_int=0), L, op.Constant(value_int=1))         # [L]
    pos = op.Cast(cache_position, to=7)                                            # int64
    if len(cache_position.shape) == 1:
        pos = op.Unsqueeze(pos, ints([0]))                                         # [1, T_q]
    visible = op.LessOrEqual(op.Unsqueeze(slots, ints([0, 1])), op.Unsqueeze(pos, ints([2])))  # [B|1, T_q, L]
    if key_valid is not None:
        visible = op.And(visible, op.Unsqueeze(key_valid, ints([1])))              # [B, T_q, L]
    visible = op.Unsqueeze(visible, ints([1, 2]))                                  # [B|1, 1, 1, T_q, L]

    # [B, Hq, T_q, D] -> [B, Hkv, G, T_q, D]; caches [B, Hkv, 1, L, D]
    q5 = op.Reshape(q, op.Concat(op.Shape(q, start=0, end=1), ints([kv_heads, heads // kv_heads]),
                                 op.Shape(q, start=2, end=4), axis=0))
    k5 = op.Unsqueeze(k_cache, ints([2]))
    v5 = op.Unsqueeze(v_cache, ints([2]))
    s = op.Mul(op.MatMul(q5, op.Transpose(k5, perm=[0, 1, 2, 4, 3])),
               op.CastLike(op.Constant(value_float=scale), q))                          # [B, Hkv, G, T_q, L]
    o = op.MatMul(onnx_masked_softmax(s, visible), op.CastLike(v5, q))          # [B, Hkv, G, T_q, Dv]
    return op.Reshape(o, op.Concat(op.Shape(q, start=0, end=3), op.Shape(v_cache, start=3, end=4), axis=0))
