"""ONNX translations (opset 18) of the linear attention ops: the expanded O(T²) form of
reference.py, exact rather than fast; dynamic batch and length."""
from __future__ import annotations

import torch


def translations() -> dict:
    """{op overload: onnxscript translation}; raises ImportError without onnxscript."""
    from onnxscript import opset18 as op

    def grouped(x, kv):
        """[B, H, T, X] -> [B, Hkv, G, T, X] (head h = hkv·G + g)."""
        return op.Reshape(x, op.Concat(op.Shape(kv, start=0, end=2), op.Constant(value_ints=[-1]),
                                       op.Shape(x, start=2, end=4), axis=0))

    def ungrouped(x, like):
        """[B, Hkv, G, T, D] -> [B, H, T, D]."""
        return op.Reshape(x, op.Concat(op.Shape(like, start=0, end=3), op.Shape(x, start=4, end=5), axis=0))

    def key_allowed(key_mask):
        return op.Unsqueeze(key_mask, op.Constant(value_ints=[1, 2, 3]))   # [B, 1, 1, 1, Tk]

    def normalize(a, v5, eps):
        num = op.MatMul(a, v5)                                              # [B, Hkv, G, T, D]
        den = op.Add(op.ReduceSum(a, op.Constant(value_ints=[-1]), keepdims=1), op.CastLike(eps, a))
        return op.Div(num, den)

    def linear_attention_onnx(fq, fk, v, key_mask=None, causal: bool = False, eps: float = 1e-6):
        q5 = grouped(fq, fk)                                                # [B, Hkv, G, Tq, F]
        k5 = op.Unsqueeze(fk, op.Constant(value_ints=[2]))                 # [B, Hkv, 1, Tk, F]
        v5 = op.Unsqueeze(v, op.Constant(value_ints=[2]))                  # [B, Hkv, 1, Tk, D]
        a = op.MatMul(q5, op.Transpose(k5, perm=[0, 1, 2, 4, 3]))          # [B, Hkv, G, Tq, Tk]
        if causal:
            a = op.Trilu(a, upper=0)
        if key_mask is not None:
            a = op.Where(key_allowed(key_mask), a, op.CastLike(0.0, a))
        return ungrouped(normalize(a, v5, eps), fq)

    def hybrid_window_attention_onnx(q, k, v, fq, fk, window: int, scale: float, mix, key_mask=None,
                                     eps: float = 1e-6):
        q5, fq5 = grouped(q, k), grouped(fq, fk)
        k5 = op.Unsqueeze(k, op.Constant(value_ints=[2]))
        fk5 = op.Unsqueeze(fk, op.Constant(value_ints=[2]))
        v5 = op.Unsqueeze(v, op.Constant(value_ints=[2]))
        T = op.Shape(q, start=2, end=3)
        pos = op.Range(op.Constant(value_int=0), op.Squeeze(T), op.Constant(value_int=1))
        i = op.Unsqueeze(pos, op.Constant(value_ints=[1]))                 # [T, 1]
        j = op.Unsqueeze(pos, op.Constant(value_ints=[0]))                 # [1, T]
        i_minus_w = op.Sub(i, op.Constant(value_int=window))
        in_window = op.And(op.LessOrEqual(j, i), op.Greater(j, i_minus_w))
        in_linear = op.LessOrEqual(j, i_minus_w)
        if key_mask is not None:
            in_window = op.And(in_window, key_allowed(key_mask))
            in_linear = op.And(in_linear, key_allowed(key_mask))
        s = op.Mul(op.MatMul(q5, op.Transpose(k5, perm=[0, 1, 2, 4, 3])), op.CastLike(scale, q))
        s = op.Where(in_window, s, op.CastLike(float("-inf"), s))
        m = op.ReduceMax(s, op.Constant(value_ints=[-1]), keepdims=1)
        m = op.Where(op.IsInf(m), op.CastLike(0.0, m), m)
        a_win = op.Exp(op.Sub(s, m))
        a_lin = op.MatMul(fq5, op.Transpose(fk5, perm=[0, 1, 2, 4, 3]))
        a_lin = op.Where(in_linear, a_lin, op.CastLike(0.0, a_lin))
        mix5 = op.Reshape(op.CastLike(mix, a_lin), op.Concat(
            op.Constant(value_ints=[1]), op.Shape(k, start=1, end=2), op.Constant(value_ints=[-1, 1, 1]), axis=0))
        a = op.Add(a_win, op.Mul(mix5, a_lin))
        return ungrouped(normalize(a, v5, eps), q)

    def linear_attention_step_onnx(fq_t, fk_t, v_t, state_S, state_z, eps: float = 1e-6):
        fk = op.Squeeze(fk_t, op.Constant(value_ints=[2]))                 # [B, Hkv, F]
        S_new = op.Add(state_S, op.CastLike(op.MatMul(op.Unsqueeze(fk, op.Constant(value_ints=[3])),
                                                      v_t), state_S))       # [B, Hkv, F, D]
        z_new = op.Add(state_z, op.CastLike(fk, state_z))
        q = grouped(fq_t, fk_t)                                             # [B, Hkv, G, 1, F]
        num = op.MatMul(q, op.Unsqueeze(op.CastLike(S_new, q), op.Constant(value_ints=[2])))   # [B, Hkv, G, 1, D]
        z5 = op.Unsqueeze(op.CastLike(z_new, q), op.Constant(value_ints=[2, 4]))              # [B, Hkv, 1, F, 1]
        den = op.Add(op.MatMul(q, z5), op.CastLike(eps, q))                                     # [B, Hkv, G, 1, 1]
        o = ungrouped(op.Div(num, den), fq_t)
        return op.CastLike(o, v_t), S_new, z_new

    return {
        torch.ops.rewriter.linear_attention.default: linear_attention_onnx,
        torch.ops.rewriter.hybrid_window_attention.default: hybrid_window_attention_onnx,
        torch.ops.rewriter.linear_attention_step.default: linear_attention_step_onnx,
    }

