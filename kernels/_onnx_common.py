"""ONNX pieces the ops' translations share (onnxscript, opset 18; imported lazily, since
onnxscript is an optional dependency)."""
from __future__ import annotations


def onnx_repeat_kv(x, heads: int):
    """GQA in ONNX: [B, Hkv, T, D] → [B, heads, T, D], each kv head repeated over its query group."""
    from onnxscript import opset18 as op

    group = heads // x.shape[1]
    if group == 1:
        return x
    ints = lambda vals: op.Constant(value_ints=vals)              # noqa: E731
    return op.Reshape(op.Expand(op.Unsqueeze(x, ints([2])), ints([1, 1, group, 1, 1])), ints([0, heads, -1, x.shape[3]]))


def onnx_masked_softmax(s, visible):
    """Softmax over the last axis of ONNX scores `s` at the `visible` (bool, broadcastable) entries,
    opset 18. A row with no visible entry gives 0, as PyTorch's kernels do, not NaN: a NaN there
    would reach real rows through the next layer's 0·NaN products."""
    from onnxscript import opset18 as op

    s = op.Where(visible, s, op.CastLike(op.Constant(value_float=float("-inf")), s))
    m = op.ReduceMax(s, op.Constant(value_ints=[-1]), keepdims=1)
    m = op.Where(op.IsInf(m), op.CastLike(op.Constant(value_float=0.0), m), m)
    e = op.Exp(op.Sub(s, m))
    total = op.ReduceSum(e, op.Constant(value_ints=[-1]), keepdims=1)     # ≥ 1 unless the row is all masked
    return op.Div(e, op.Max(total, op.CastLike(op.Constant(value_float=1.0), total)))
