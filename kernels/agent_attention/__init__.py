"""`rewriter::agent_attention`: softmax(QKᵀ)V → softmax(QAᵀ·s₂ + B₂)·softmax(AKᵀ·s₁ + B₁)V + c·V.

Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024,
arXiv:2312.08874 (code: LeapLabTHU/Agent-Attention); training-free form from AgentSD
(same paper, §5: s₂ = d^-0.15-style temperatures and a 0.075·V shortcut).

    agent_attention(q [B,H,N,D], k [B,Hkv,N,D], v [B,Hkv,N,Dv], agents [B,H,n,D],
                    key_mask bool [B,N] | None  (True = real token; padded keys get no weight),
                    scale1 [H], scale2 [H]      (per-head temperatures, fp32, differentiable),
                    bias1 [(B,) H,n,N] | None, bias2 [(B,) H,N,n] | None   (additive biases, per sample or shared),
                    shortcut [H]                (per-head weight c of the c·V term))
        -> O [B,H,N,Dv] in q.dtype

GQA: query head h reads kv head h // (H / Hkv), agents are per query head. An agent that
sees no valid key (a fully padded sample) aggregates 0. Queries at padded positions get
outputs like any other row (as SDPA with a padding mask does); callers ignore them.

Implementations: CPU (any non-CUDA device) = two batched GEMM + softmax stages in PyTorch
(O(N·n·d), GQA without copying K/V); CUDA = the Triton kernels in triton.py (biases and all);
autograd = recompute through the PyTorch math (gradients for q, k, v, agents, scales,
biases and shortcut, so calibration can fit s₁, s₂, c); ONNX = the two-softmax formula with
MatMul/Softmax (opset 18).

`pool_agents(q, n, key_mask, prefix)` makes the agents: adaptive average pooling of the
queries over the valid tokens only.
"""
from __future__ import annotations

import torch

from rewriter.kernels import onnx_masked_softmax, register_onnx

from .reference import agent_attention_ref

__all__ = ["agent_attention", "agent_attention_ref", "agent_bias", "agent_windows", "pool_agents"]

_OP = "rewriter::agent_attention"


def _check_inputs(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or agents.dim() != 4:
        raise ValueError(f"{_OP}: q, k, v, agents must be 4-D [B, heads, tokens, head_dim]; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}, {tuple(agents.shape)}")
    B, H, N, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (N, D) or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{_OP}: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if H % k.shape[1]:
        raise ValueError(f"{_OP}: {H} query heads are not a multiple of {k.shape[1]} kv heads")
    n = agents.shape[2]
    if agents.shape[:2] != (B, H) or agents.shape[3] != D or n < 1:
        raise ValueError(f"{_OP}: agents must be [B={B}, H={H}, n ≥ 1, D={D}], got {tuple(agents.shape)}")
    if key_mask is not None and tuple(key_mask.shape) != (B, N):
        raise ValueError(f"{_OP}: key_mask must be [B={B}, N={N}], got {tuple(key_mask.shape)}")
    for name, t in (("scale1", scale1), ("scale2", scale2), ("shortcut", shortcut)):
        if tuple(t.shape) != (H,):
            raise ValueError(f"{_OP}: {name} must be a [H={H}] tensor, got shape {tuple(t.shape)}")
    for name, bias, tail in (("bias1", bias1, (H, n, N)), ("bias2", bias2, (H, N, n))):
        if bias is not None and tuple(bias.shape) not in (tail, (B, *tail), (1, *tail)):
            raise ValueError(f"{_OP}: {name} must be [H={H}, {'n' if name == 'bias1' else 'N'}={tail[1]}, "
                             f"{'N' if name == 'bias1' else 'n'}={tail[2]}] or with a leading batch dim "
                             f"[B={B}, ...], got {tuple(bias.shape)}")


def _math(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut):
    """The PyTorch implementation (CPU impl and autograd recompute). Differentiable."""
    B, H, N, D = q.shape
    h_kv, d_v, n = k.shape[1], v.shape[-1], agents.shape[2]
    group = H // h_kv
    acc = torch.promote_types(q.dtype, torch.float32)
    q, k, v, a = q.to(acc), k.to(acc), v.to(acc), agents.to(acc)
    per_head = lambda t: t.to(acc).view(1, H, 1, 1)                                 # noqa: E731

    # stage 1: agents → keys; GQA by grouping query heads onto their kv head (no K/V copies)
    s1 = (a.reshape(B, h_kv, group * n, D) @ k.transpose(-1, -2)).view(B, H, n, N) * per_head(scale1)
    if bias1 is not None:
        s1 = s1 + bias1.to(acc)
    if key_mask is not None:
        key_mask = key_mask.bool()
        any_key = key_mask.any(-1).view(B, 1, 1, 1)
        s1 = s1.masked_fill(~key_mask[:, None, None, :], float("-inf")).masked_fill(~any_key, 0.0)
        p1 = torch.softmax(s1, dim=-1) * any_key                                     # fully padded -> 0
    else:
        p1 = torch.softmax(s1, dim=-1)                                               # [B, H, n, N]
    v_agents = (p1.view(B, h_kv, group * n, N) @ v).view(B, H, n, d_v)

    # stage 2: queries → agents
    s2 = (q @ a.transpose(-1, -2)) * per_head(scale2)                               # [B, H, N, n]
    if bias2 is not None:
        s2 = s2 + bias2.to(acc)
    out = torch.softmax(s2, dim=-1) @ v_agents                                      # [B, H, N, Dv]
    out = out.view(B, h_kv, group, N, d_v) + shortcut.to(acc).view(1, h_kv, group, 1, 1) * v[:, :, None]
    return out.view(B, H, N, d_v)


@torch.library.custom_op(_OP, mutates_args=())
def _agent_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor,
              key_mask: torch.Tensor | None, scale1: torch.Tensor, scale2: torch.Tensor,
              bias1: torch.Tensor | None, bias2: torch.Tensor | None, shortcut: torch.Tensor) -> torch.Tensor:
    _check_inputs(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut)
    with torch.no_grad():
        return _math(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut).to(q.dtype)


@_agent_op.register_kernel("cuda")
def _(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut):
    from .triton import agent_attention_triton
    _check_inputs(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut)
    return agent_attention_triton(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut)


@_agent_op.register_fake
def _(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut):
    return q.new_empty(*q.shape[:3], v.shape[-1])


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    """Gradients by autograd through the PyTorch math, recomputed."""
    inputs = list(ctx.saved_tensors)
    with torch.enable_grad():
        xs = [t.detach().requires_grad_(ctx.needs_input_grad[i]) if t is not None and i != 4 else t
              for i, t in enumerate(inputs)]
        wanted = [x for x in xs if x is not None and x.requires_grad]
        if not wanted:
            return (None,) * len(xs)
        got = list(torch.autograd.grad(_math(*xs), wanted, grad, allow_unused=True))
    return tuple(got.pop(0) if x is not None and x.requires_grad else None for x in xs)


_agent_op.register_autograd(_backward, setup_context=_setup_context)


def _per_head(x, heads: int, name: str, device) -> torch.Tensor:
    """A float, 0-d/1-element tensor, or [H] tensor -> fp32 [H] (grad preserved)."""
    if not isinstance(x, torch.Tensor):
        return torch.full((heads,), float(x), dtype=torch.float32, device=device)
    if x.numel() == 1:
        return x.to(torch.float32).reshape(1).expand(heads)
    if tuple(x.shape) != (heads,):
        raise ValueError(f"agent_attention: {name} must be a float, a 1-element tensor or a [H={heads}] "
                         f"tensor; got shape {tuple(x.shape)}")
    return x.to(torch.float32)


def agent_attention(q, k, v, agents, *, key_mask: torch.Tensor | None = None,
                    scale1: float | torch.Tensor | None = None, scale2: float | torch.Tensor | None = None,
                    bias1: torch.Tensor | None = None, bias2: torch.Tensor | None = None,
                    shortcut: float | torch.Tensor = 0.0) -> torch.Tensor:
    """Calls `rewriter::agent_attention`; scales default to head_dim ** -0.5, floats and
    1-element tensors are broadcast to every head."""
    heads, default = q.shape[1], q.shape[-1] ** -0.5
    s1 = _per_head(default if scale1 is None else scale1, heads, "scale1", q.device)
    s2 = _per_head(default if scale2 is None else scale2, heads, "scale2", q.device)
    c = _per_head(shortcut, heads, "shortcut", q.device)
    return torch.ops.rewriter.agent_attention(q, k, v, agents, key_mask, s1, s2, bias1, bias2, c)


def agent_windows(key_mask: torch.Tensor | None, batch: int, tokens, n: int, prefix: int = 0,
                  device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each agent pools from, per sample: adaptive-average-pooling windows over the VALID
    tokens (key_mask [B, N] True; all when None) after the first `prefix` of them (e.g. CLS).

    n is capped at N − prefix (the static token count). A sample with L_b valid pooled tokens
    gets n_b = min(n, L_b) live agents, window i covering ranks [⌊i·L/n_b⌋, ⌈(i+1)·L/n_b⌉) (the
    adaptive_avg_pool1d rule); its agents n_b … n−1 are dead (zero weights) and must get no
    weight in stage 2 (`agent_bias` puts −inf there). So a sample's agents — and the op's
    output — do not depend on how much padding its batch adds: batch-invariant. Pure tensor
    math, no data-dependent shapes: it traces under torch.export.

    Returns weights [B, n, N] (each live row averages its window), live [B, n] bool, and
    distance [B, N, n]: token j's distance to agent i's window centre in units of the window
    width L_b/n_b (0 for tokens that are not pooled: padding and the prefix)."""
    if n < 1 or prefix < 0:
        raise ValueError(f"pool_agents: need n ≥ 1 and prefix ≥ 0, got n={n}, prefix={prefix}")
    if key_mask is not None and tuple(key_mask.shape) != (batch, tokens):
        raise ValueError(f"pool_agents: key_mask must be [B={batch}, N={tokens}], got {tuple(key_mask.shape)}")
    n_out = torch.sym_min(n, tokens - prefix) if isinstance(tokens, torch.SymInt) else min(n, tokens - prefix)
    if isinstance(n_out, int) and n_out < 1:
        raise ValueError(f"pool_agents: prefix={prefix} leaves no token to pool out of N={tokens}")
    valid = (torch.ones(batch, tokens, dtype=torch.bool, device=device) if key_mask is None
             else key_mask.bool())
    rank = valid.long().cumsum(-1) - 1 - prefix                   # rank among pooled tokens, [B, N]
    pooled = valid & (rank >= 0)
    length = pooled.sum(-1, keepdim=True)                         # L_b, [B, 1]
    live_n = length.clamp(min=1, max=n_out)                       # n_b, [B, 1]
    i = torch.arange(n_out, device=valid.device)                  # [n]
    live = i < live_n                                             # [B, n]
    start = (i * length) // live_n                                # [B, n]
    end = ((i + 1) * length + live_n - 1) // live_n
    window = (pooled[:, None, :] & live[..., None]
              & (rank[:, None, :] >= start[..., None]) & (rank[:, None, :] < end[..., None]))
    weights = window.float() / (end - start).clamp(min=1)[..., None].float()          # [B, n, N]
    centre = (start + end - 1).float() / 2                                            # [B, n]
    width = (length.float() / live_n.float()).clamp(min=1.0)                          # [B, 1]
    distance = (rank[:, :, None].float() - centre[:, None, :]).abs() / width[..., None]
    distance = distance * pooled[:, :, None]                                          # [B, N, n]
    return weights, live, distance


def pool_agents(q: torch.Tensor, n: int, key_mask: torch.Tensor | None = None, prefix: int = 0) -> torch.Tensor:
    """Agent tokens [B, H, min(n, N − prefix), D] in q.dtype: adaptive average pooling of
    q [B, H, N, D] over the valid tokens (`agent_windows`; dead agents of short samples are 0)."""
    B, H, N, D = q.shape
    weights, _, _ = agent_windows(key_mask, B, N, n, prefix, q.device)
    return torch.einsum("bnt,bhtd->bhnd", weights.to(q.dtype), q)


def agent_bias(live: torch.Tensor, distance: torch.Tensor, beta1: torch.Tensor | None,
               beta2: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The agent biases from `agent_windows`: B₂ [B, H, N, n] = −β₂,h · distance, −inf at dead
    agents; B₁ [B, H, n, N] = −β₁,h · distanceᵀ (None when beta1 is None). β per head, [H]."""
    b2 = -beta2.float()[None, :, None, None] * distance[:, None]
    b2 = b2.masked_fill(~live[:, None, None, :], float("-inf"))
    b1 = None if beta1 is None else -beta1.float()[None, :, None, None] * distance.transpose(1, 2)[:, None]
    return b1, b2


# --------------------------------------------------------------------------- ONNX

def _onnx_agent_attention(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut):
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


register_onnx(torch.ops.rewriter.agent_attention.default, _onnx_agent_attention)
