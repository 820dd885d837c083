"""`rewriter::agent_attention`: softmax(QKᵀ)V → softmax(QAᵀ·s₂ + B₂)·softmax(AKᵀ·s₁ + B₁)V + c·V.

Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024,
arXiv:2312.08874; training-free form from AgentSD
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

Implementations: CPU (any non-CUDA device) = cpu.py, two batched GEMM + softmax stages in
PyTorch (O(N·n·d), GQA without copying K/V); CUDA = the Triton kernels in triton.py (biases and
all); autograd = recompute through cpu.py (gradients for q, k, v, agents, scales, biases and
shortcut, so calibration can fit s₁, s₂, c); ONNX = onnx.py, the two-softmax formula with
MatMul/Softmax (opset 18); reference.py = the fp32 ground truth.

agents.py makes the agents — `pool_agents(q, n, key_mask, prefix)`: adaptive average pooling of
the queries over the valid tokens only — their biases, and `agent_block`, the composite the
agent_attention rule puts in a graph (pool + biases + this op).
"""
from __future__ import annotations

import torch

from rewriter.kernels import register_onnx

from .agents import agent_bias, agent_block, agent_windows, pool_agents
from .cpu import agent_attention_torch
from .onnx import agent_attention_onnx
from .reference import agent_attention_ref

__all__ = ["agent_attention", "agent_attention_ref", "agent_attention_torch", "agent_bias", "agent_block",
           "agent_windows", "pool_agents"]

_OP = "rewriter::agent_attention"


# --------------------------------------------------------------------------- checks

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


# --------------------------------------------------------------------------- custom op

@torch.library.custom_op(_OP, mutates_args=())
def _agent_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, agents: torch.Tensor,
              key_mask: torch.Tensor | None, scale1: torch.Tensor, scale2: torch.Tensor,
              bias1: torch.Tensor | None, bias2: torch.Tensor | None, shortcut: torch.Tensor) -> torch.Tensor:
    _check_inputs(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut)
    with torch.no_grad():
        return agent_attention_torch(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut).to(q.dtype)


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
        got = list(torch.autograd.grad(agent_attention_torch(*xs), wanted, grad, allow_unused=True))
    return tuple(got.pop(0) if x is not None and x.requires_grad else None for x in xs)


_agent_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------- entry point

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


register_onnx(torch.ops.rewriter.agent_attention.default, agent_attention_onnx)
