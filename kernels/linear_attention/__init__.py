"""Linear attention custom ops: `rewriter::linear_attention`, `rewriter::hybrid_window_attention`,
`rewriter::linear_attention_step`, `rewriter::hybrid_window_step`.

Katharopoulos et al., "Transformers are RNNs", ICML 2020, arXiv:2006.16236 (the ops);
Zhang et al., "Hedgehog & the Porcupine", arXiv:2402.04347 and Zhang et al., "LoLCATs",
arXiv:2410.10254 (the feature maps and the sliding-window hybrid the `linear_attention` rule
calibrates by attention transfer).

The ops take ALREADY-MAPPED features fq = φ(q), fk = φ(k): the feature map stays ordinary
(trainable) torch ops in the graph, in front of the op. reference.py states the math.

    linear_attention(fq [B,H,T,F], fk [B,Hkv,Tk,F], v [B,Hkv,Tk,D], key_mask [B,Tk] | None,
                     causal, eps) -> [B,H,T,D]
    hybrid_window_attention(q [B,H,T,Dk], k [B,Hkv,T,Dk], v [B,Hkv,T,D], fq, fk, window, scale,
                            mix [H], key_mask, eps) -> [B,H,T,D]       (causal)
    linear_attention_step(fq_t [B,H,1,F], fk_t [B,Hkv,1,F], v_t [B,Hkv,1,D],
                          S [B,Hkv,F,D], z [B,Hkv,F], eps) -> (o_t [B,H,1,D], S_new, z_new)
    hybrid_window_step(q_t [B,H,1,Dk], k_t [B,Hkv,1,Dk], v_t [B,Hkv,1,D], fq_t [B,H,1,F], fk_t [B,Hkv,1,F],
                       S [B,Hkv,F,D], z [B,Hkv,F], k_win [B,Hkv,W,Dk], v_win [B,Hkv,W,D], fk_win [B,Hkv,W,F],
                       win_valid bool [B,W], position int [1], scale, mix [H], token_valid bool [B] | None,
                       eps) -> (o_t [B,H,1,D], S, z, k_win, v_win, fk_win, win_valid)   (the new state)

The decode form of the hybrid (LoLCATs with window W = k_win.shape[2]): `position` is the index t
of the new token in the sequence, left padding included (the lowered graph's cache_position; the
same for every row); slot t mod W of the ring buffer holds token t − W, which is folded into
(S, z) if valid, and then token t. Prefill + steps reproduce the full-sequence op: build the
state of the first T0 tokens with `hybrid_window_prefill_state(k, v, fk, W, key_mask)`
(`linear_attention_prefill_state(fk, v, key_mask)` for linear_attention_step), then step with
positions T0, T0 + 1, … and token_valid = the key mask's column (None = real). The ring buffers
keep the model's dtypes; S, z stay fp32. Functional (no input is mutated); no autograd (decode).

key_mask is bool, True = real token; padded keys contribute nothing. Outputs take v's dtype
(the step's new state takes the state's dtype; keep the state in fp32). Computation is fp32.

Implementations: the default (CPU and any device) is the chunked PyTorch math of cpu.py; CUDA
runs the Triton kernels of triton.py when triton is installed; ONNX = onnx.py (the expanded
O(T²) form); reference.py = the fp32 ground truth. Gradients (for attention-transfer
calibration) come from the `*_backward` ops, which re-run cpu.py's math under autograd: opaque
to torch.compile / export, so compiled training treats them as one op each.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rewriter.kernels import register_onnx

from . import reference
from .cpu import (hybrid_window_attention_torch, hybrid_window_prefill_state, hybrid_window_step_torch,
                  linear_attention_prefill_state, linear_attention_step_torch, linear_attention_torch)

try:
    from . import triton as _triton
except ImportError:            # triton is an optional dependency; CUDA then uses the torch math
    _triton = None

__all__ = ["linear_attention", "hybrid_window_attention", "linear_attention_step", "hybrid_window_step",
           "reference", "linear_attention_torch", "hybrid_window_attention_torch",
           "linear_attention_step_torch", "hybrid_window_step_torch", "linear_attention_prefill_state",
           "hybrid_window_prefill_state"]


# --------------------------------------------------------------------------------------------
# argument checks (shared by the real and fake impls, so export reports them too)
# --------------------------------------------------------------------------------------------
def _fail(op: str, msg: str):
    raise ValueError(f"rewriter::{op}: {msg}")


def _check_heads(op: str, q: Tensor, kv: Tensor, qname: str, kvname: str) -> None:
    if q.dim() != 4 or kv.dim() != 4:
        _fail(op, f"{qname} and {kvname} must be 4-D [batch, heads, time, dim]; "
                  f"got {tuple(q.shape)} and {tuple(kv.shape)}")
    if q.shape[0] != kv.shape[0]:
        _fail(op, f"{qname} has batch {q.shape[0]} but {kvname} has batch {kv.shape[0]}")
    if kv.shape[1] == 0 or q.shape[1] % kv.shape[1] != 0:
        _fail(op, f"{qname} has {q.shape[1]} heads, not a multiple of the {kv.shape[1]} heads of "
                  f"{kvname} (grouped-query attention needs heads % kv_heads == 0)")


def _check_mask(op: str, key_mask: Tensor | None, B, Tk) -> None:
    if key_mask is None:
        return
    if key_mask.dtype != torch.bool:
        _fail(op, f"key_mask must be bool (True = real token); got {key_mask.dtype}")
    if tuple(key_mask.shape) != (B, Tk):
        _fail(op, f"key_mask must be [batch, key_len] = [{B}, {Tk}]; got {tuple(key_mask.shape)}")


def _check_linear_attention(fq, fk, v, key_mask, causal) -> None:
    op = "linear_attention"
    _check_heads(op, fq, fk, "fq", "fk")
    if v.dim() != 4 or v.shape[:3] != fk.shape[:3]:
        _fail(op, f"v {tuple(v.shape)} must be [batch, kv_heads, key_len, D] matching fk {tuple(fk.shape)}")
    if fq.shape[3] != fk.shape[3]:
        _fail(op, f"fq has feature dim {fq.shape[3]} but fk has {fk.shape[3]}")
    if causal and fq.shape[2] != fk.shape[2]:
        _fail(op, f"causal=True needs as many queries as keys; got {fq.shape[2]} and {fk.shape[2]}")
    _check_mask(op, key_mask, fq.shape[0], fk.shape[2])


def _check_hybrid(q, k, v, fq, fk, window, mix, key_mask) -> None:
    op = "hybrid_window_attention"
    _check_heads(op, q, k, "q", "k")
    if q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
        _fail(op, f"q {tuple(q.shape)} and k {tuple(k.shape)} must share time and head dim (causal self-attention)")
    if v.dim() != 4 or v.shape[:3] != k.shape[:3]:
        _fail(op, f"v {tuple(v.shape)} must be [batch, kv_heads, time, D] matching k {tuple(k.shape)}")
    if fq.dim() != 4 or fq.shape[:3] != q.shape[:3]:
        _fail(op, f"fq {tuple(fq.shape)} must be [batch, heads, time, F] matching q {tuple(q.shape)}")
    if fk.dim() != 4 or fk.shape[:3] != k.shape[:3] or fk.shape[3] != fq.shape[3]:
        _fail(op, f"fk {tuple(fk.shape)} must be [batch, kv_heads, time, F] matching k {tuple(k.shape)} "
                  f"and fq's feature dim {fq.shape[3]}")
    if window < 1:
        _fail(op, f"window must be >= 1 (the softmax window includes the query's own key); got {window}")
    if mix.dim() != 1 or mix.shape[0] != q.shape[1]:
        _fail(op, f"mix must be [heads] = [{q.shape[1]}]; got {tuple(mix.shape)}")
    _check_mask(op, key_mask, q.shape[0], k.shape[2])


def _check_step(fq_t, fk_t, v_t, S, z) -> None:
    op = "linear_attention_step"
    _check_heads(op, fq_t, fk_t, "fq_t", "fk_t")
    if fq_t.shape[2] != 1 or fk_t.shape[2] != 1:
        _fail(op, f"fq_t and fk_t must hold one token ([batch, heads, 1, F]); got {tuple(fq_t.shape)} "
                  f"and {tuple(fk_t.shape)}")
    if v_t.dim() != 4 or v_t.shape[:3] != fk_t.shape[:3]:
        _fail(op, f"v_t {tuple(v_t.shape)} must be [batch, kv_heads, 1, D] matching fk_t {tuple(fk_t.shape)}")
    B, Hkv, _, F = fk_t.shape
    if fq_t.shape[3] != F:
        _fail(op, f"fq_t has feature dim {fq_t.shape[3]} but fk_t has {F}")
    if tuple(S.shape) != (B, Hkv, F, v_t.shape[3]):
        _fail(op, f"state_S must be [batch, kv_heads, F, D] = {[B, Hkv, F, v_t.shape[3]]}; got {tuple(S.shape)}")
    if tuple(z.shape) != (B, Hkv, F):
        _fail(op, f"state_z must be [batch, kv_heads, F] = {[B, Hkv, F]}; got {tuple(z.shape)}")


def _check_hybrid_step(q_t, k_t, v_t, fq_t, fk_t, S, z, k_win, v_win, fk_win, win_valid, position, mix,
                       token_valid) -> None:
    op = "hybrid_window_step"
    _check_heads(op, q_t, k_t, "q_t", "k_t")
    B, H = q_t.shape[:2]
    Hkv, Dk = k_t.shape[1], k_t.shape[3]
    for name, t in (("q_t", q_t), ("k_t", k_t), ("v_t", v_t), ("fq_t", fq_t), ("fk_t", fk_t)):
        if t.dim() != 4 or t.shape[2] != 1 or t.shape[0] != B:
            _fail(op, f"{name} must hold one token ([batch={B}, heads, 1, dim]); got {tuple(t.shape)}")
    if q_t.shape[3] != Dk:
        _fail(op, f"q_t has head dim {q_t.shape[3]} but k_t has {Dk}")
    D, F = v_t.shape[3], fk_t.shape[3]
    if v_t.shape[1] != Hkv or fk_t.shape[1] != Hkv or fq_t.shape[1] != H or fq_t.shape[3] != F:
        _fail(op, f"v_t {tuple(v_t.shape)} / fk_t {tuple(fk_t.shape)} must have the {Hkv} kv heads of "
                  f"k_t and fq_t {tuple(fq_t.shape)} the {H} heads of q_t and fk_t's feature dim {F}")
    if k_win.dim() != 4 or k_win.shape[2] < 1:
        _fail(op, f"k_win must be [batch, kv_heads, window >= 1, Dk]; got {tuple(k_win.shape)}")
    W = k_win.shape[2]
    want = {"state_S": (S, (B, Hkv, F, D)), "state_z": (z, (B, Hkv, F)), "k_win": (k_win, (B, Hkv, W, Dk)),
            "v_win": (v_win, (B, Hkv, W, D)), "fk_win": (fk_win, (B, Hkv, W, F)),
            "win_valid": (win_valid, (B, W)), "mix": (mix, (H,))}
    for name, (t, shape) in want.items():
        if tuple(t.shape) != shape:
            _fail(op, f"{name} must be {list(shape)}; got {tuple(t.shape)}")
    if win_valid.dtype != torch.bool:
        _fail(op, f"win_valid must be bool (True = the slot holds a real token); got {win_valid.dtype}")
    if position.dtype not in (torch.int64, torch.int32) or position.numel() != 1:
        _fail(op, f"position must be one int64 (or int32) index, the new token's; got {position.dtype} "
                  f"{tuple(position.shape)}")
    if token_valid is not None and (token_valid.dtype != torch.bool or tuple(token_valid.shape) != (B,)):
        _fail(op, f"token_valid must be bool [batch={B}]; got {token_valid.dtype} {tuple(token_valid.shape)}")


# --------------------------------------------------------------------------------------------
# custom ops
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("rewriter::linear_attention", mutates_args=())
def linear_attention(fq: Tensor, fk: Tensor, v: Tensor, key_mask: Tensor | None = None,
                     causal: bool = False, eps: float = 1e-6) -> Tensor:
    _check_linear_attention(fq, fk, v, key_mask, causal)
    return linear_attention_torch(fq, fk, v, key_mask, causal, eps)


@linear_attention.register_kernel("cuda")
def _(fq, fk, v, key_mask=None, causal=False, eps=1e-6):
    _check_linear_attention(fq, fk, v, key_mask, causal)
    if _triton is None:
        return linear_attention_torch(fq, fk, v, key_mask, causal, eps)
    return _triton.linear_attention(fq, fk, v, key_mask, causal, eps)


@linear_attention.register_fake
def _(fq, fk, v, key_mask=None, causal=False, eps=1e-6):
    _check_linear_attention(fq, fk, v, key_mask, causal)
    return fq.new_empty(fq.shape[0], fq.shape[1], fq.shape[2], v.shape[3], dtype=v.dtype)


@torch.library.custom_op("rewriter::hybrid_window_attention", mutates_args=())
def hybrid_window_attention(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, window: int,
                            scale: float, mix: Tensor, key_mask: Tensor | None = None,
                            eps: float = 1e-6) -> Tensor:
    _check_hybrid(q, k, v, fq, fk, window, mix, key_mask)
    return hybrid_window_attention_torch(q, k, v, fq, fk, window, scale, mix, key_mask, eps)


@hybrid_window_attention.register_kernel("cuda")
def _(q, k, v, fq, fk, window, scale, mix, key_mask=None, eps=1e-6):
    _check_hybrid(q, k, v, fq, fk, window, mix, key_mask)
    if _triton is None:
        return hybrid_window_attention_torch(q, k, v, fq, fk, window, scale, mix, key_mask, eps)
    return _triton.hybrid_window_attention(q, k, v, fq, fk, window, scale, mix, key_mask, eps)


@hybrid_window_attention.register_fake
def _(q, k, v, fq, fk, window, scale, mix, key_mask=None, eps=1e-6):
    _check_hybrid(q, k, v, fq, fk, window, mix, key_mask)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v.shape[3], dtype=v.dtype)


@torch.library.custom_op("rewriter::linear_attention_step", mutates_args=())
def linear_attention_step(fq_t: Tensor, fk_t: Tensor, v_t: Tensor, state_S: Tensor, state_z: Tensor,
                          eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    _check_step(fq_t, fk_t, v_t, state_S, state_z)
    return linear_attention_step_torch(fq_t, fk_t, v_t, state_S, state_z, eps)


@linear_attention_step.register_kernel("cuda")
def _(fq_t, fk_t, v_t, state_S, state_z, eps=1e-6):
    _check_step(fq_t, fk_t, v_t, state_S, state_z)
    if _triton is None:
        return linear_attention_step_torch(fq_t, fk_t, v_t, state_S, state_z, eps)
    return _triton.linear_attention_step(fq_t, fk_t, v_t, state_S, state_z, eps)


@linear_attention_step.register_fake
def _(fq_t, fk_t, v_t, state_S, state_z, eps=1e-6):
    _check_step(fq_t, fk_t, v_t, state_S, state_z)
    B, H = fq_t.shape[:2]
    return (fq_t.new_empty(B, H, 1, v_t.shape[3], dtype=v_t.dtype),
            state_S.new_empty(state_S.shape), state_z.new_empty(state_z.shape))


@torch.library.custom_op("rewriter::hybrid_window_step", mutates_args=())
def hybrid_window_step(q_t: Tensor, k_t: Tensor, v_t: Tensor, fq_t: Tensor, fk_t: Tensor, state_S: Tensor,
                       state_z: Tensor, k_win: Tensor, v_win: Tensor, fk_win: Tensor, win_valid: Tensor,
                       position: Tensor, scale: float, mix: Tensor, token_valid: Tensor | None = None,
                       eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = (q_t, k_t, v_t, fq_t, fk_t, state_S, state_z, k_win, v_win, fk_win, win_valid, position)
    _check_hybrid_step(*args, mix, token_valid)
    return hybrid_window_step_torch(*args, scale, mix, token_valid, eps)


@hybrid_window_step.register_kernel("cuda")
def _(q_t, k_t, v_t, fq_t, fk_t, state_S, state_z, k_win, v_win, fk_win, win_valid, position, scale, mix,
      token_valid=None, eps=1e-6):
    args = (q_t, k_t, v_t, fq_t, fk_t, state_S, state_z, k_win, v_win, fk_win, win_valid, position)
    _check_hybrid_step(*args, mix, token_valid)
    if _triton is None:
        return hybrid_window_step_torch(*args, scale, mix, token_valid, eps)
    return _triton.hybrid_window_step(*args, scale, mix, token_valid, eps)


@hybrid_window_step.register_fake
def _(q_t, k_t, v_t, fq_t, fk_t, state_S, state_z, k_win, v_win, fk_win, win_valid, position, scale, mix,
      token_valid=None, eps=1e-6):
    _check_hybrid_step(q_t, k_t, v_t, fq_t, fk_t, state_S, state_z, k_win, v_win, fk_win, win_valid, position,
                       mix, token_valid)
    B, H = q_t.shape[:2]
    return (q_t.new_empty(B, H, 1, v_t.shape[3], dtype=v_t.dtype), state_S.new_empty(state_S.shape),
            state_z.new_empty(state_z.shape), k_win.new_empty(k_win.shape), v_win.new_empty(v_win.shape),
            fk_win.new_empty(fk_win.shape), win_valid.new_empty(win_valid.shape))


# --------------------------------------------------------------------------------------------
# autograd: backward ops re-run the PyTorch math under autograd (one opaque op per backward)
# --------------------------------------------------------------------------------------------
def _vjp(fn, inputs: tuple[Tensor, ...], grads: tuple[Tensor | None, ...]) -> list[Tensor]:
    """Vector-Jacobian product of the PyTorch math. torch.func.vjp, not torch.autograd.grad:
    inside a custom op's kernel the autograd dispatch keys are excluded, so a plain autograd
    graph would not be recorded; functorch's transform records its own."""
    outs, pullback = torch.func.vjp(fn, *inputs)
    single = not isinstance(outs, tuple)
    outs = (outs,) if single else outs
    cot = tuple(torch.zeros_like(o) if g is None else g.to(o.dtype) for o, g in zip(outs, grads))
    gx = pullback(cot[0] if single else cot)
    # a custom op's outputs may not alias its inputs (the state gradient passes straight through)
    taken = {t.untyped_storage().data_ptr() for t in (*inputs, *grads) if t is not None}
    return [g.clone() if g.untyped_storage().data_ptr() in taken else g for g in gx]


@torch.library.custom_op("rewriter::linear_attention_backward", mutates_args=())
def linear_attention_backward(grad_out: Tensor, fq: Tensor, fk: Tensor, v: Tensor,
                              key_mask: Tensor | None, causal: bool, eps: float
                              ) -> tuple[Tensor, Tensor, Tensor]:
    fn = lambda a, b, c: linear_attention_torch(a, b, c, key_mask, causal, eps)
    return tuple(_vjp(fn, (fq, fk, v), (grad_out,)))


@linear_attention_backward.register_fake
def _(grad_out, fq, fk, v, key_mask, causal, eps):
    return torch.empty_like(fq), torch.empty_like(fk), torch.empty_like(v)


def _linear_attention_setup(ctx, inputs, output):
    fq, fk, v, key_mask, causal, eps = inputs
    ctx.save_for_backward(fq, fk, v, key_mask)
    ctx.causal, ctx.eps = causal, eps


def _linear_attention_bwd(ctx, grad):
    fq, fk, v, key_mask = ctx.saved_tensors
    dfq, dfk, dv = torch.ops.rewriter.linear_attention_backward(grad, fq, fk, v, key_mask, ctx.causal, ctx.eps)
    return dfq, dfk, dv, None, None, None


linear_attention.register_autograd(_linear_attention_bwd, setup_context=_linear_attention_setup)


@torch.library.custom_op("rewriter::hybrid_window_attention_backward", mutates_args=())
def hybrid_window_attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, fq: Tensor,
                                     fk: Tensor, window: int, scale: float, mix: Tensor,
                                     key_mask: Tensor | None, eps: float) -> list[Tensor]:
    fn = lambda q_, k_, v_, fq_, fk_, mix_: hybrid_window_attention_torch(
        q_, k_, v_, fq_, fk_, window, scale, mix_, key_mask, eps)
    return _vjp(fn, (q, k, v, fq, fk, mix), (grad_out,))


@hybrid_window_attention_backward.register_fake
def _(grad_out, q, k, v, fq, fk, window, scale, mix, key_mask, eps):
    return [torch.empty_like(x) for x in (q, k, v, fq, fk, mix)]


def _hybrid_setup(ctx, inputs, output):
    q, k, v, fq, fk, window, scale, mix, key_mask, eps = inputs
    ctx.save_for_backward(q, k, v, fq, fk, mix, key_mask)
    ctx.window, ctx.scale, ctx.eps = window, scale, eps


def _hybrid_bwd(ctx, grad):
    q, k, v, fq, fk, mix, key_mask = ctx.saved_tensors
    dq, dk, dv, dfq, dfk, dmix = torch.ops.rewriter.hybrid_window_attention_backward(
        grad, q, k, v, fq, fk, ctx.window, ctx.scale, mix, key_mask, ctx.eps)
    return dq, dk, dv, dfq, dfk, None, None, dmix, None, None


hybrid_window_attention.register_autograd(_hybrid_bwd, setup_context=_hybrid_setup)


@torch.library.custom_op("rewriter::linear_attention_step_backward", mutates_args=())
def linear_attention_step_backward(grad_o: Tensor, grad_S: Tensor, grad_z: Tensor, fq_t: Tensor,
                                   fk_t: Tensor, v_t: Tensor, state_S: Tensor, state_z: Tensor,
                                   eps: float) -> list[Tensor]:
    fn = lambda a, b, c, S, z: linear_attention_step_torch(a, b, c, S, z, eps)
    return _vjp(fn, (fq_t, fk_t, v_t, state_S, state_z), (grad_o, grad_S, grad_z))


@linear_attention_step_backward.register_fake
def _(grad_o, grad_S, grad_z, fq_t, fk_t, v_t, state_S, state_z, eps):
    return [torch.empty_like(x) for x in (fq_t, fk_t, v_t, state_S, state_z)]


def _step_setup(ctx, inputs, output):
    fq_t, fk_t, v_t, state_S, state_z, eps = inputs
    ctx.save_for_backward(fq_t, fk_t, v_t, state_S, state_z)
    ctx.eps = eps


def _step_bwd(ctx, grad_o, grad_S, grad_z):
    fq_t, fk_t, v_t, state_S, state_z = ctx.saved_tensors
    grads = torch.ops.rewriter.linear_attention_step_backward(
        grad_o, grad_S, grad_z, fq_t, fk_t, v_t, state_S, state_z, ctx.eps)
    return (*grads, None)


linear_attention_step.register_autograd(_step_bwd, setup_context=_step_setup)


try:
    from .onnx import translations as _onnx_translations
    for _op, _fn in _onnx_translations().items():
        register_onnx(_op, _fn)
except ImportError:            # onnxscript is an optional dependency (the `onnx` extra)
    pass
