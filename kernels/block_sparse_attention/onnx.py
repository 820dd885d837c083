"""ONNX translations of `rewriter::block_sparse_attention(_lse)` (opset 18): the dense boolean
visibility mask built from the table, then a masked softmax written out. Exact, O(T_q·T_k)
memory: fine for moderate sizes."""
from __future__ import annotations

from rewriter.kernels._onnx_common import onnx_repeat_kv


def block_sparse_attention_lse_onnx(q, k, v, block_table, block_size, causal, key_mask, scale):
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


def block_sparse_attention_onnx(q, k, v, block_table, block_size, causal, key_mask, scale):
    return block_sparse_attention_lse_onnx(q, k, v, block_table, block_size, causal, key_mask, scale)[0]

