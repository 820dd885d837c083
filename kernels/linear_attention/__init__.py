"""Linear attention custom ops: `rewriter::linear_attention`, `rewriter::hybrid_window_attention`,
`rewriter::linear_attention_step`.

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

key_mask is bool, True = real token; padded keys contribute nothing. Outputs take v's dtype
(the step's new state takes the state's dtype; keep the state in fp32). Computation is fp32.

Implementations: the default (CPU and any device) is the chunked PyTorch math below; CUDA runs
the Triton kernels of triton.py when triton is installed. Gradients (for attention-transfer
calibration) come from the `*_backward` ops, which re-run the PyTorch math under autograd:
opaque to torch.compile / export, so compiled training treats them as one op each.
"""
from __future__ import annotations


import torch
from torch import Tensor

from .. import register_onnx
from . import reference

try:
    from . import triton as _triton
except ImportError:            # triton is an optional dependency; CUDA then uses the torch math
    _triton = None

CHUNK = 64   # CPU chunk length: balances the intra-chunk C² term against the F·D state term
             # (F = D = 64 makes both ~equal); chosen by reasoning, not a sweep


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


# --------------------------------------------------------------------------------------------
# efficient PyTorch math (CPU impl, and what the backward ops differentiate)
# --------------------------------------------------------------------------------------------
def _acc(x: Tensor) -> Tensor:
    """Accumulation dtype: fp32 for half types, else unchanged (float64 stays float64 for gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _mask_keys(fk: Tensor, v: Tensor, key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    if key_mask is None:
        return fk, v
    real = key_mask[:, None, :, None]                                   # [B, 1, Tk, 1]
    return fk.masked_fill(~real, 0.0), v.masked_fill(~real, 0.0)


def _fold_groups(x: Tensor, n: int, C: int) -> Tensor:
    """[B, Hkv, G, n·C, X] -> [B, Hkv, n, G·C, X]: a chunk's G query heads stacked as rows, so
    every product below has equal batch dims (a broadcast matmul would copy K/V/S G times)."""
    B, Hkv, G, _, X = x.shape
    return x.reshape(B, Hkv, G, n, C, X).transpose(2, 3).reshape(B, Hkv, n, G * C, X)


def _unfold_groups(x: Tensor, G: int, T: int) -> Tensor:
    """[B, Hkv, n, G·C, X] -> [B, Hkv, G, T, X] (inverse of _fold_groups, padding dropped)."""
    B, Hkv, n, GC, X = x.shape
    return x.reshape(B, Hkv, n, G, GC // G, X).transpose(2, 3).reshape(B, Hkv, G, -1, X)[:, :, :, :T]


def _causal_linear_terms(fq: Tensor, fk: Tensor, v: Tensor, shift: int = 0) -> tuple[Tensor, Tensor]:
    """Σ_{j ≤ i−shift} (φq_i·φk_j) v_j and Σ_{j ≤ i−shift} φq_i·φk_j, chunked.

    fq [B, Hkv, G, T, F], fk [B, Hkv, T, F], v [B, Hkv, T, D] (padded keys already zeroed) ->
    numerator [B, Hkv, G, T, D], denominator [B, Hkv, G, T]. Within a chunk tril(φQ φKᵀ) V;
    across chunks φQ·S with S the exclusive prefix sum of per-chunk φKᵀV.
    """
    B, Hkv, G, T, F = fq.shape
    D = v.shape[-1]
    if shift >= T:
        return fq.new_zeros(B, Hkv, G, T, D), fq.new_zeros(B, Hkv, G, T)
    if shift > 0:                                      # key j' = j + shift: j ≤ i − shift ⟺ j' ≤ i
        fk = torch.nn.functional.pad(fk[:, :, :T - shift], (0, 0, shift, 0))
        v = torch.nn.functional.pad(v[:, :, :T - shift], (0, 0, shift, 0))
    C = min(CHUNK, T)
    n = -(-T // C)
    pad = n * C - T
    fq = torch.nn.functional.pad(fq, (0, 0, 0, pad))
    q = _fold_groups(fq, n, C)                                          # [B, Hkv, n, G·C, F]
    k = torch.nn.functional.pad(fk, (0, 0, 0, pad)).reshape(B, Hkv, n, C, F)
    vv = torch.nn.functional.pad(v, (0, 0, 0, pad)).reshape(B, Hkv, n, C, D)
    r = torch.arange(G * C, device=fq.device)[:, None] % C              # query offset in chunk
    tril = r >= torch.arange(C, device=fq.device)[None, :]              # [G·C, C]
    A = (q @ k.transpose(-1, -2)).masked_fill_(~tril, 0.0)             # [B, Hkv, n, G·C, C]
    num = A @ vv                                                        # [B, Hkv, n, G·C, D]
    den = A.sum(-1, keepdim=True)                                       # [B, Hkv, n, G·C, 1]
    if n > 1:
        kv = k.transpose(-1, -2) @ vv                                   # [B, Hkv, n, F, D]
        S = torch.cumsum(kv, dim=2) - kv                                # Σ over chunks < c
        ksum = k.sum(-2, keepdim=True)                                  # [B, Hkv, n, 1, F]
        z = torch.cumsum(ksum, dim=2) - ksum
        num = num + q @ S
        den = den + q @ z.transpose(-1, -2)
    return _unfold_groups(num, G, T), _unfold_groups(den, G, T)[..., 0]


def linear_attention_torch(fq: Tensor, fk: Tensor, v: Tensor, key_mask: Tensor | None = None,
                           causal: bool = False, eps: float = 1e-6) -> Tensor:
    """Efficient PyTorch form of `rewriter::linear_attention` (two GEMMs, or chunked if causal)."""
    B, H, Tq, F = fq.shape
    Hkv, D = fk.shape[1], v.shape[-1]
    G = H // Hkv
    out_dtype = v.dtype
    fq, fk, v = _acc(fq), _acc(fk), _acc(v)
    fk, v = _mask_keys(fk, v, key_mask)
    if causal:
        num, den = _causal_linear_terms(fq.reshape(B, Hkv, G, Tq, F), fk, v)
        out = num / (den[..., None] + eps)                              # [B, Hkv, G, T, D]
    else:
        S = fk.transpose(-1, -2) @ v                                    # [B, Hkv, F, D]
        z = fk.sum(-2)                                                  # [B, Hkv, F]
        q = fq.reshape(B, Hkv, G * Tq, F)                               # head h = hkv·G + g
        out = (q @ S) / ((q @ z[..., None]) + eps)                      # [B, Hkv, G·T, D]
    return out.reshape(B, H, Tq, D).to(out_dtype)


def _window_terms(q: Tensor, k: Tensor, v: Tensor, window: int, scale: float,
                  key_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Σ_{j∈W(i)} e^{s_ij − m_i} v_j and Σ_{j∈W(i)} e^{s_ij − m_i}, m_i the max over the window.

    q [B, Hkv, G, T, Dk], k [B, Hkv, T, Dk], v [B, Hkv, T, D]. Banded: with chunks of C ≥ window,
    the window of a query in chunk c lies in chunks c−1 and c, so each chunk scores 2C keys.
    """
    B, Hkv, G, T, Dk = q.shape
    C = min(max(window, CHUNK), T)
    n = -(-T // C)
    pad = n * C - T
    real = torch.ones(B, T, dtype=torch.bool, device=q.device) if key_mask is None else key_mask
    q = _fold_groups(torch.nn.functional.pad(q, (0, 0, 0, pad)), n, C)   # [B, Hkv, n, G·C, Dk]
    real = torch.nn.functional.pad(real, (0, pad), value=False).reshape(B, 1, n, 1, C)
    k = torch.nn.functional.pad(k, (0, 0, 0, pad)).reshape(B, Hkv, n, C, Dk)
    v = torch.nn.functional.pad(v, (0, 0, 0, pad)).reshape(B, Hkv, n, C, -1)
    prev = lambda x: torch.nn.functional.pad(x[:, :, :-1], (0, 0) * (x.dim() - 3) + (1, 0))  # chunk c−1
    k2 = torch.cat([prev(k), k], dim=3)                                 # [B, Hkv, n, 2C, Dk]
    v2 = torch.cat([prev(v), v], dim=3)                                 # [B, Hkv, n, 2C, D]
    real2 = torch.cat([prev(real), real], dim=4)                        # [B, 1, n, 1, 2C]
    r = torch.arange(G * C, device=q.device)[:, None] % C               # query offset in chunk
    rk = torch.arange(2 * C, device=q.device)[None, :] - C              # key offset from chunk start
    allowed = (rk <= r) & (rk > r - window) & real2                     # [B, 1, n, G·C, 2C]
    s = (q @ k2.transpose(-1, -2)).mul_(scale)                          # [B, Hkv, n, G·C, 2C]
    s = s.masked_fill_(~allowed, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))          # empty window: m = 0
    p = torch.exp(s - m)
    num, den = p @ v2, p.sum(-1, keepdim=True)
    return _unfold_groups(num, G, T), _unfold_groups(den, G, T)[..., 0]


def hybrid_window_attention_torch(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, window: int,
                                  scale: float, mix: Tensor, key_mask: Tensor | None = None,
                                  eps: float = 1e-6) -> Tensor:
    """Efficient PyTorch form of `rewriter::hybrid_window_attention` (banded softmax + chunked linear)."""
    B, H, T, Dk = q.shape
    Hkv, F, D = k.shape[1], fq.shape[-1], v.shape[-1]
    G = H // Hkv
    out_dtype = v.dtype
    q, k, v, fq, fk = map(_acc, (q, k, v, fq, fk))
    k, v = _mask_keys(k, v, key_mask)             # padded slots may hold anything, even NaN
    fk, _ = _mask_keys(fk, v, key_mask)
    num_w, den_w = _window_terms(q.reshape(B, Hkv, G, T, Dk), k, v, window, scale, key_mask)
    num_l, den_l = _causal_linear_terms(fq.reshape(B, Hkv, G, T, F), fk, v, shift=window)
    w = mix.to(num_l.dtype).reshape(1, Hkv, G, 1)
    out = (num_w + w[..., None] * num_l) / (den_w + w * den_l + eps)[..., None]
    return out.reshape(B, H, T, D).to(out_dtype)


def linear_attention_step_torch(fq_t: Tensor, fk_t: Tensor, v_t: Tensor, state_S: Tensor,
                                state_z: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """PyTorch form of `rewriter::linear_attention_step` (grouped, no repeated state)."""
    B, H, _, F = fq_t.shape
    Hkv, D = fk_t.shape[1], v_t.shape[-1]
    fk = _acc(fk_t)[:, :, 0]                                            # [B, Hkv, F]
    S_new = _acc(state_S) + fk[..., None] * _acc(v_t)[:, :, 0, None, :]  # [B, Hkv, F, D]
    z_new = _acc(state_z) + fk
    q = _acc(fq_t).reshape(B, Hkv, H // Hkv, F)                         # [B, Hkv, G, F]
    num = q @ S_new                                                     # [B, Hkv, G, D]
    den = q @ z_new[..., None]                                          # [B, Hkv, G, 1]
    o = (num / (den + eps)).reshape(B, H, 1, D)
    return o.to(v_t.dtype), S_new.to(state_S.dtype), z_new.to(state_z.dtype)


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


# --------------------------------------------------------------------------------------------
# ONNX (opset 18): the expanded O(T²) form of reference.py, exact rather than fast
# --------------------------------------------------------------------------------------------
def _onnx_translations():
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


try:
    for _op, _fn in _onnx_translations().items():
        register_onnx(_op, _fn)
except ImportError:            # onnxscript is an optional dependency (the `onnx` extra)
    pass

__all__ = ["linear_attention", "hybrid_window_attention", "linear_attention_step", "reference",
           "linear_attention_torch", "hybrid_window_attention_torch", "linear_attention_step_torch"]
