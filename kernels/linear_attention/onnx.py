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

    def hybrid_window_step_onnx(q_t, k_t, v_t, fq_t, fk_t, state_S, state_z, k_win, v_win, fk_win, win_valid,
                                position, scale: float, mix, token_valid=None, eps: float = 1e-6):
        ints = lambda vals: op.Constant(value_ints=list(vals))          # noqa: E731
        zero = lambda x: op.CastLike(op.Constant(value_float=0.0), x)   # noqa: E731
        W = op.Shape(k_win, start=2, end=3)                                 # [1]
        slots = op.Range(op.Constant(value_int=0), op.Squeeze(W), op.Constant(value_int=1))   # [W]
        here = op.Equal(slots, op.Mod(op.Reshape(op.Cast(position, to=7), ints([1])), W))    # [W] one-hot
        here4 = op.Unsqueeze(here, ints([0, 1, 3]))                         # [1, 1, W, 1]
        # 1. fold the token leaving the window (the slot's old content, if valid) into S, z
        leave = op.And(op.Unsqueeze(here, ints([0])), win_valid)            # [B, W]
        leave4 = op.Unsqueeze(leave, ints([1, 3]))                          # [B, 1, W, 1]
        fk_l = op.ReduceSum(op.Where(leave4, fk_win, zero(fk_win)), ints([2]), keepdims=0)     # [B, Hkv, F]
        v_l = op.ReduceSum(op.Where(leave4, v_win, zero(v_win)), ints([2]), keepdims=0)        # [B, Hkv, D]
        S_new = op.Add(state_S, op.CastLike(op.MatMul(op.Unsqueeze(fk_l, ints([3])),
                                                      op.Unsqueeze(v_l, ints([2]))), state_S))
        z_new = op.Add(state_z, op.CastLike(fk_l, state_z))
        # 2. the new token into its slot (zeros and invalid if it is padding)
        if token_valid is None:
            real, valid_new = None, op.Or(win_valid, op.Unsqueeze(here, ints([0])))
        else:
            real = op.Unsqueeze(token_valid, ints([1, 2, 3]))                # [B, 1, 1, 1]
            here2 = op.Unsqueeze(here, ints([0]))                            # (onnxruntime has no bool Where)
            valid_new = op.Or(op.And(here2, op.Unsqueeze(token_valid, ints([1]))),
                              op.And(op.Not(here2), win_valid))

        def put(buf, new):
            new = op.CastLike(new, buf)
            if real is not None:
                new = op.Where(real, new, zero(new))
            return op.Where(here4, new, buf)

        kw_new, vw_new, fw_new = put(k_win, k_t), put(v_win, v_t), put(fk_win, fk_t)
        # 3. W-slot softmax (max over the valid slots, 0 if none) beside mix·φq·S
        q5 = grouped(q_t, k_t)                                              # [B, Hkv, G, 1, Dk]
        fq5 = grouped(fq_t, k_t)                                            # [B, Hkv, G, 1, F]
        vis = op.Unsqueeze(valid_new, ints([1, 2, 3]))                      # [B, 1, 1, 1, W]
        kT = op.Transpose(op.CastLike(kw_new, q_t), perm=[0, 1, 3, 2])     # [B, Hkv, Dk, W]
        k5 = op.Unsqueeze(kT, ints([2]))                                    # [B, Hkv, 1, Dk, W]
        s = op.Mul(op.MatMul(q5, k5), op.CastLike(scale, q_t))             # [B, Hkv, G, 1, W]
        s = op.Where(vis, s, op.CastLike(float("-inf"), s))
        m = op.ReduceMax(s, ints([-1]), keepdims=1)
        m = op.Where(op.IsInf(m), zero(m), m)
        p = op.Exp(op.Sub(s, m))
        vv = op.Where(op.Unsqueeze(valid_new, ints([1, 3])), vw_new, zero(vw_new))          # [B, Hkv, W, D]
        num = op.MatMul(p, op.Unsqueeze(op.CastLike(vv, p), ints([2])))    # [B, Hkv, G, 1, D]
        den = op.ReduceSum(p, ints([-1]), keepdims=1)                       # [B, Hkv, G, 1, 1]
        mix5 = op.Reshape(op.CastLike(mix, p), op.Concat(ints([1]), op.Shape(k_t, start=1, end=2),
                                                         ints([-1, 1, 1]), axis=0))
        num = op.Add(num, op.Mul(mix5, op.MatMul(fq5, op.Unsqueeze(op.CastLike(S_new, p), ints([2])))))
        z5 = op.Unsqueeze(op.CastLike(z_new, p), ints([2, 4]))             # [B, Hkv, 1, F, 1]
        den = op.Add(op.Add(den, op.Mul(mix5, op.MatMul(fq5, z5))), op.CastLike(eps, p))
        o = op.CastLike(ungrouped(op.Div(num, den), q_t), v_t)
        return o, S_new, z_new, kw_new, vw_new, fw_new, valid_new

    return {
        torch.ops.rewriter.hybrid_window_step.default: hybrid_window_step_onnx,
        torch.ops.rewriter.linear_attention.default: linear_attention_onnx,
        torch.ops.rewriter.hybrid_window_attention.default: hybrid_window_attention_onnx,
        torch.ops.rewriter.linear_attention_step.default: linear_attention_step_onnx,
    }

