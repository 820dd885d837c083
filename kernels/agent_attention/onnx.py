"""ONNX translation of `rewriter::agent_attention` (opset 18): the two-softmax formula with
MatMul/Softmax; dynamic batch, length and agent count, static heads and head_dim."""
from __future__ import annotations

from rewriter.kernels._onnx_common import onnx_masked_softmax


def agent_attention_onnx(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut):
    """The two-softmax formula with MatMul/Softmax (opset 18); fully padded samples give 0."""
    from onnxscript import opset18 as op

    heads, kv_heads, head_dim, d_v = q.shape[1], k.shape[1], q.shape[3], v.shape[3]
    if not all(isinstance(x, int) for x in (heads, kv_heads, head_dim, d_v)):       # n and N may be symbolic
        raise ValueError("agent_attention ONNX translation: heads and head_dim must be "
                         f"static; got q {q.shape}, k {k.shape}, v {v.shape}, agents {agents.shape}")
    group = heads // kv_heads
    i64 = lambda vals: op.Constant(value_ints=list(vals))         # noqa: E731
    per_head = lambda t, shape: op.CastLike(op.Reshape(t, i64(shape)), q)   # noqa: E731

    # stage 1: [B, Hkv, G·n, D] @ [B, Hkv, D, N] -> [B, H, n, N]
    s1 = op.MatMul(op.Reshape(agents, i64([0, kv_heads, -1, head_dim])), op.Transpose(k, perm=[0, 1, 3, 2]))
    s1 = op.Mul(op.Reshape(s1, i64([0, heads, -1, 0])), per_head(scale1, [1, heads, 1, 1]))
    if bias1 is not None:
        s1 = op.Add(s1, op.CastLike(bias1, s1))
    if key_mask is None:
        p1 = op.Softmax(s1, axis=-1)
    else:
        p1 = onnx_masked_softmax(s1, op.Unsqueeze(op.Cast(key_mask, to=9), i64([1, 2])))   # mask [B, 1, 1, N]
    v_agents = op.MatMul(op.Reshape(p1, i64([0, kv_heads, -1, 0])), v)          # [B, Hkv, G·n, Dv]
    v_agents = op.Reshape(v_agents, i64([0, heads, -1, d_v]))

    # stage 2: [B, H, N, n] softmax over agents
    s2 = op.Mul(op.MatMul(q, op.Transpose(agents, perm=[0, 1, 3, 2])), per_head(scale2, [1, heads, 1, 1]))
    if bias2 is not None:
        s2 = op.Add(s2, op.CastLike(bias2, s2))
    out = op.MatMul(op.Softmax(s2, axis=-1), v_agents)                          # [B, H, N, Dv]
    out = op.Reshape(out, i64([0, kv_heads, group, -1, d_v]))
    out = op.Add(out, op.Mul(per_head(shortcut, [1, kv_heads, group, 1, 1]), op.Unsqueeze(v, i64([2]))))
    return op.Reshape(out, i64([0, heads, -1, d_v]))

