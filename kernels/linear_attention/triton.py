"""Triton kernels for linear attention and the LoLCATs sliding-window hybrid.

Katharopoulos et al. 2020 (arXiv:2006.16236): O_i = φ(Q_i)ᵀ S_i / (φ(Q_i)ᵀ z_i + eps),
S = Σ_j φ(K_j) V_jᵀ, z = Σ_j φ(K_j). Three forms, as in flash-linear-attention's `chunk` /
`fused_recurrent` split:

  non-causal   two GEMMs: `linear_attention_kv_fwd_kernel` builds S, z per (batch, kv head);
               `linear_attention_fwd_kernel` computes φQ S / (φQ z + eps) per query block.
  causal       `linear_attention_chunk_fwd_kernel`: one program per (batch, query head, D slice)
               walks the sequence in chunks of BLOCK_T, carrying S, z in registers:
               within a chunk tril(φQ φKᵀ) V, across chunks φQ S.
  decode       `linear_attention_step_fwd_kernel`: S += φk vᵀ, z += φk, o = φq S / (φq z + eps).
  hybrid step  `hybrid_window_step_fwd_kernel` (LoLCATs decode): one program per (D slice, batch,
               kv head) folds the token leaving the W-slot ring buffer into S, z, writes the new
               token into its slot while streaming the W slots through an online softmax (the
               kv head's G query heads as rows), and adds φq S; the buffers are copied once.

`hybrid_window_attention_fwd_kernel` (LoLCATs, arXiv:2410.10254) adds exact softmax terms over
the last `window` keys (online softmax, FlashAttention-style) to the linear terms of the keys
before the window, sharing one normalizer; the linear state S, z is carried across query blocks
so the cost is O(T·(window + BLOCK_T)·D + T·F·D), linear in T. The softmax max m_i is taken over
the window scores only and does not scale the linear terms (see reference.py for why).

Layout: fq [B, H, T, F], fk [B, Hkv, T, F], v [B, Hkv, T, D] (q, k likewise with Dk); GQA reads
kv head h // (H // Hkv) through pointer arithmetic, never a repeated copy. The last dimension
must be contiguous; F, D and Dk are padded to powers of two (at least 16, tl.dot's minimum)
inside the kernels with masks. Accumulation is fp32; outputs take v's dtype.

Host wrappers run on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 (the tests use
this to run the real kernels without a GPU).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Block sizes: chosen for interpreter-mode tests (small tiles keep the CPU interpreter fast and
# make T=63 span several chunks, so the carried state is exercised); retune on GPU (fla uses
# BT=64 with BK=BV=64 for chunked linear attention on A100/H100).
BLOCK_T = 16
BLOCK_D_MAX = 64   # the V dimension is split into slices of at most this width per program


# Triton decides interpreter mode when a kernel is decorated, i.e. when this module is imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dot(a, b, DOT_UPCAST: tl.constexpr):
    """a @ b with fp32 accumulation. fp32 operands get true fp32 products ("ieee", not tf32: the
    fp32 tolerance needs it); bf16/fp16 operands use the tensor cores. DOT_UPCAST (interpreter
    only): Triton 3.9's interpreter multiplies the raw uint16 storage of bf16 operands, so they
    are upcast first; the operands are already rounded to bf16, so the products are the same."""
    if DOT_UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def _tile(p_bh, o_rows, s_row, o_cols, m_rows, m_cols):
    """Load the [rows, cols] tile p_bh[o_rows * s_row + o_cols] (last dim contiguous), 0 outside the masks."""
    return tl.load(p_bh + o_rows[:, None] * s_row + o_cols[None, :],
                   mask=m_rows[:, None] & m_cols[None, :], other=0.0)


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _check_device(*xs: Tensor) -> None:
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    for x in xs:
        if x is not None and not (x.is_cuda or interpret):
            raise RuntimeError(
                f"rewriter.kernels.linear_attention.triton: got a {x.device} tensor; the Triton "
                "kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is imported, "
                "to run them on the CPU in interpreter mode)")


def _lastdim_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _mask_u8(key_mask: Tensor | None, like: Tensor) -> Tensor:
    if key_mask is None:
        return torch.zeros(1, 1, dtype=torch.uint8, device=like.device)   # never read
    return key_mask.to(torch.uint8).contiguous()


# --------------------------------------------------------------------------------------------
# non-causal: S = Σ_j φK_j V_jᵀ, z = Σ_j φK_j, then O = φQ S / (φQ z + eps)
# --------------------------------------------------------------------------------------------
@triton.jit
def linear_attention_kv_fwd_kernel(
    p_fk, p_v, p_mask, p_S, p_z,
    s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_mb,
    T, HKV, F, D,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    i_d = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // HKV
    i_hkv = i_bh % HKV
    o_t = tl.arange(0, BLOCK_T)
    o_f = tl.arange(0, BLOCK_F)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_f = o_f < F
    m_d = o_d < D
    p_fk_bh = p_fk + i_b * s_kb + i_hkv * s_kh
    p_v_bh = p_v + i_b * s_vb + i_hkv * s_vh

    b_S = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)       # [BLOCK_F, BLOCK_D]
    b_z = tl.zeros([BLOCK_F], dtype=tl.float32)                # [BLOCK_F]
    for i_t in range(0, tl.cdiv(T, BLOCK_T)):
        o_j = (i_t * BLOCK_T + o_t).to(tl.int64)
        m_j = o_j < T
        if HAS_MASK:
            m_j = m_j & (tl.load(p_mask + i_b * s_mb + o_j, mask=m_j, other=0) != 0)
        b_fk = _tile(p_fk_bh, o_j, s_kt, o_f, m_j, m_f)  # [BLOCK_T, BLOCK_F]
        b_v = _tile(p_v_bh, o_j, s_vt, o_d, m_j, m_d)  # [BLOCK_T, BLOCK_D]
        b_S += _dot(tl.trans(b_fk), b_v, DOT_UPCAST)
        b_z += tl.sum(b_fk.to(tl.float32), 0)

    # S, z scratch: [B*Hkv, F, D] and [B*Hkv, F], fp32, contiguous
    p_S_bh = p_S + i_bh * F * D
    tl.store(p_S_bh + o_f[:, None] * D + o_d[None, :], b_S, mask=m_f[:, None] & m_d[None, :])
    if i_d == 0:                                                # one D slice writes z
        tl.store(p_z + i_bh * F + o_f, b_z, mask=m_f)


@triton.jit
def linear_attention_fwd_kernel(
    p_fq, p_S, p_z, p_o,
    s_qb, s_qh, s_qt, s_ob, s_oh, s_ot,
    T, H, G, F, D, eps,
    BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    i_t = tl.program_id(0)
    i_d = tl.program_id(1)
    i_bh = tl.program_id(2).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_bhkv = i_b * (H // G) + i_h // G
    o_i = (i_t * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    o_f = tl.arange(0, BLOCK_F)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_i = o_i < T
    m_f = o_f < F
    m_d = o_d < D

    b_fq = tl.load(p_fq + i_b * s_qb + i_h * s_qh + o_i[:, None] * s_qt + o_f[None, :],
                   mask=m_i[:, None] & m_f[None, :], other=0.0).to(tl.float32)   # [BLOCK_T, BLOCK_F]
    b_S = tl.load(p_S + i_bhkv * F * D + o_f[:, None] * D + o_d[None, :],
                  mask=m_f[:, None] & m_d[None, :], other=0.0)                   # [BLOCK_F, BLOCK_D]
    b_z = tl.load(p_z + i_bhkv * F + o_f, mask=m_f, other=0.0)                   # [BLOCK_F]
    b_num = _dot(b_fq, b_S, DOT_UPCAST)                            # [BLOCK_T, BLOCK_D]
    b_den = tl.sum(b_fq * b_z[None, :], 1)                                       # [BLOCK_T]
    b_o = b_num / (b_den[:, None] + eps)
    tl.store(p_o + i_b * s_ob + i_h * s_oh + o_i[:, None] * s_ot + o_d[None, :],
             b_o.to(p_o.dtype.element_ty), mask=m_i[:, None] & m_d[None, :])


# --------------------------------------------------------------------------------------------
# causal, chunked: within a chunk tril(φQ φKᵀ) V, across chunks φQ S carried
# --------------------------------------------------------------------------------------------
@triton.jit
def linear_attention_chunk_fwd_kernel(
    p_fq, p_fk, p_v, p_mask, p_o,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_ob, s_oh, s_ot, s_mb,
    T, H, G, F, D, eps,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_UPCAST: tl.constexpr,
):
    i_d = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hkv = i_h // G
    o_t = tl.arange(0, BLOCK_T)
    o_f = tl.arange(0, BLOCK_F)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_f = o_f < F
    m_d = o_d < D
    m_tril = o_t[:, None] >= o_t[None, :]                      # [BLOCK_T, BLOCK_T]  j ≤ i
    p_fq_bh = p_fq + i_b * s_qb + i_h * s_qh
    p_fk_bh = p_fk + i_b * s_kb + i_hkv * s_kh
    p_v_bh = p_v + i_b * s_vb + i_hkv * s_vh
    p_o_bh = p_o + i_b * s_ob + i_h * s_oh

    b_S = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)       # Σ_{j < chunk start} φK_j V_jᵀ
    b_z = tl.zeros([BLOCK_F], dtype=tl.float32)                # Σ_{j < chunk start} φK_j
    for i_t in range(0, tl.cdiv(T, BLOCK_T)):
        o_i = (i_t * BLOCK_T + o_t).to(tl.int64)
        m_i = o_i < T
        m_j = m_i
        if HAS_MASK:
            m_j = m_j & (tl.load(p_mask + i_b * s_mb + o_i, mask=m_i, other=0) != 0)
        b_fq = _tile(p_fq_bh, o_i, s_qt, o_f, m_i, m_f)  # [BLOCK_T, BLOCK_F]
        b_fk = _tile(p_fk_bh, o_i, s_kt, o_f, m_j, m_f)  # [BLOCK_T, BLOCK_F]
        b_v = _tile(p_v_bh, o_i, s_vt, o_d, m_j, m_d)  # [BLOCK_T, BLOCK_D]

        b_A = _dot(b_fq, tl.trans(b_fk), DOT_UPCAST)        # [BLOCK_T, BLOCK_T]
        b_A = tl.where(m_tril, b_A, 0.0)
        b_num = _dot(b_A.to(b_v.dtype), b_v, DOT_UPCAST)   # [BLOCK_T, BLOCK_D]
        b_num += _dot(b_fq, b_S.to(b_fq.dtype), DOT_UPCAST)
        b_den = tl.sum(b_A, 1) + tl.sum(b_fq.to(tl.float32) * b_z[None, :], 1)   # [BLOCK_T]
        b_o = b_num / (b_den[:, None] + eps)
        tl.store(p_o_bh + o_i[:, None] * s_ot + o_d[None, :], b_o.to(p_o.dtype.element_ty),
                 mask=m_i[:, None] & m_d[None, :])

        b_S += _dot(tl.trans(b_fk), b_v, DOT_UPCAST)        # [BLOCK_F, BLOCK_D]
        b_z += tl.sum(b_fk.to(tl.float32), 0)


def linear_attention(fq: Tensor, fk: Tensor, v: Tensor, key_mask: Tensor | None = None,
                     causal: bool = False, eps: float = 1e-6, *, out: Tensor | None = None) -> Tensor:
    """Host wrapper for `rewriter::linear_attention` (shapes checked by the op). Returns `out`."""
    _check_device(fq, fk, v, key_mask)
    fq, fk, v = map(_lastdim_contiguous, (fq, fk, v))
    B, H, Tq, F = fq.shape
    Hkv, Tk, D = fk.shape[1], fk.shape[2], v.shape[3]
    G = H // Hkv
    if out is None:
        out = torch.empty(B, H, Tq, D, dtype=v.dtype, device=v.device)
    mask = _mask_u8(key_mask, fq)
    BLOCK_F, BLOCK_D = _pow2(F), min(_pow2(D), BLOCK_D_MAX)
    n_d = triton.cdiv(D, BLOCK_D)
    if causal:
        linear_attention_chunk_fwd_kernel[(n_d, B * H)](
            fq, fk, v, mask, out,
            fq.stride(0), fq.stride(1), fq.stride(2), fk.stride(0), fk.stride(1), fk.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            mask.stride(0), Tq, H, G, F, D, eps,
            HAS_MASK=key_mask is not None, BLOCK_T=BLOCK_T, BLOCK_F=BLOCK_F, BLOCK_D=BLOCK_D, DOT_UPCAST=_INTERPRET)
        return out
    S = torch.empty(B * Hkv, F, D, dtype=torch.float32, device=v.device)
    z = torch.empty(B * Hkv, F, dtype=torch.float32, device=v.device)
    linear_attention_kv_fwd_kernel[(n_d, B * Hkv)](
        fk, v, mask, S, z,
        fk.stride(0), fk.stride(1), fk.stride(2), v.stride(0), v.stride(1), v.stride(2),
        mask.stride(0), Tk, Hkv, F, D,
        HAS_MASK=key_mask is not None, BLOCK_T=BLOCK_T, BLOCK_F=BLOCK_F, BLOCK_D=BLOCK_D, DOT_UPCAST=_INTERPRET)
    linear_attention_fwd_kernel[(triton.cdiv(Tq, BLOCK_T), n_d, B * H)](
        fq, S, z, out,
        fq.stride(0), fq.stride(1), fq.stride(2), out.stride(0), out.stride(1), out.stride(2),
        Tq, H, G, F, D, eps,
        BLOCK_T=BLOCK_T, BLOCK_F=BLOCK_F, BLOCK_D=BLOCK_D, DOT_UPCAST=_INTERPRET)
    return out


# --------------------------------------------------------------------------------------------
# LoLCATs hybrid: softmax over (i − window, i], mix·linear over j ≤ i − window, one normalizer
# --------------------------------------------------------------------------------------------
@triton.jit
def hybrid_window_attention_fwd_kernel(
    p_q, p_k, p_v, p_fq, p_fk, p_mix, p_mask, p_o,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt,
    s_fqb, s_fqh, s_fqt, s_fkb, s_fkh, s_fkt, s_ob, s_oh, s_ot, s_mb,
    T, H, G, DK, F, D, window, scale, eps,
    HAS_MASK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    i_d = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hkv = i_h // G
    o_t = tl.arange(0, BLOCK_T)
    o_k = tl.arange(0, BLOCK_K)
    o_f = tl.arange(0, BLOCK_F)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_k = o_k < DK
    m_f = o_f < F
    m_d = o_d < D
    p_q_bh = p_q + i_b * s_qb + i_h * s_qh
    p_fq_bh = p_fq + i_b * s_fqb + i_h * s_fqh
    p_k_bh = p_k + i_b * s_kb + i_hkv * s_kh
    p_fk_bh = p_fk + i_b * s_fkb + i_hkv * s_fkh
    p_v_bh = p_v + i_b * s_vb + i_hkv * s_vh
    p_o_bh = p_o + i_b * s_ob + i_h * s_oh
    b_mix = tl.load(p_mix + i_h).to(tl.float32)

    b_S = tl.zeros([BLOCK_F, BLOCK_D], dtype=tl.float32)       # Σ_{j ≤ i0 − window} φK_j V_jᵀ
    b_z = tl.zeros([BLOCK_F], dtype=tl.float32)                # Σ_{j ≤ i0 − window} φK_j
    for i_t in range(0, tl.cdiv(T, BLOCK_T)):
        i0 = i_t * BLOCK_T
        o_i = (i0 + o_t).to(tl.int64)
        m_i = o_i < T
        b_q = _tile(p_q_bh, o_i, s_qt, o_k, m_i, m_k)  # [BLOCK_T, BLOCK_K]
        b_fq = _tile(p_fq_bh, o_i, s_fqt, o_f, m_i, m_f)  # [BLOCK_T, BLOCK_F]

        # keys j ≤ i0 − window are linear for every query of the block: the carried state
        b_num_lin = _dot(b_fq, b_S.to(b_fq.dtype), DOT_UPCAST)   # [BLOCK_T, BLOCK_D]
        b_den_lin = tl.sum(b_fq.to(tl.float32) * b_z[None, :], 1)             # [BLOCK_T]
        # keys in [i0 − window + 1, i0 + BLOCK_T − 1]: window (softmax) or linear, per query
        b_m = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BLOCK_T], dtype=tl.float32)
        b_acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
        for j0 in range(i0 - window + 1, i0 + BLOCK_T, BLOCK_T):
            o_j = (j0 + o_t).to(tl.int64)
            m_j = (o_j >= 0) & (o_j < T)
            if HAS_MASK:
                m_j = m_j & (tl.load(p_mask + i_b * s_mb + o_j, mask=m_j, other=0) != 0)
            b_k = _tile(p_k_bh, o_j, s_kt, o_k, m_j, m_k)  # [BLOCK_T, BLOCK_K]
            b_fk = _tile(p_fk_bh, o_j, s_fkt, o_f, m_j, m_f)  # [BLOCK_T, BLOCK_F]
            b_v = _tile(p_v_bh, o_j, s_vt, o_d, m_j, m_d)  # [BLOCK_T, BLOCK_D]
            m_win = m_j[None, :] & (o_j[None, :] <= o_i[:, None]) & (o_j[None, :] > o_i[:, None] - window)
            m_lin = m_j[None, :] & (o_j[None, :] <= o_i[:, None] - window)

            b_s = _dot(b_q, tl.trans(b_k), DOT_UPCAST) * scale   # [BLOCK_T, BLOCK_T]
            b_s = tl.where(m_win, b_s, float("-inf"))
            b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
            b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)      # no window key yet
            b_alpha = tl.exp(b_m - b_m_safe)
            b_p = tl.exp(b_s - b_m_safe[:, None])                            # [BLOCK_T, BLOCK_T]
            b_l = b_l * b_alpha + tl.sum(b_p, 1)
            b_acc = b_acc * b_alpha[:, None] + _dot(b_p.to(b_v.dtype), b_v, DOT_UPCAST)
            b_m = b_m_new

            b_a = _dot(b_fq, tl.trans(b_fk), DOT_UPCAST)       # [BLOCK_T, BLOCK_T]
            b_a = tl.where(m_lin, b_a, 0.0)
            b_num_lin += _dot(b_a.to(b_v.dtype), b_v, DOT_UPCAST)
            b_den_lin += tl.sum(b_a, 1)

        # b_acc, b_l are relative to m_i = max over the window (0 if empty); the linear terms
        # are not rescaled by it (LoLCATs' hybrid_attention_quadratic)
        b_o = (b_acc + b_mix * b_num_lin) / (b_l + b_mix * b_den_lin + eps)[:, None]
        tl.store(p_o_bh + o_i[:, None] * s_ot + o_d[None, :], b_o.to(p_o.dtype.element_ty),
                 mask=m_i[:, None] & m_d[None, :])

        # advance the state to the next block: add keys (i0 − window, i0 + BLOCK_T − window]
        o_j = (i0 - window + 1 + o_t).to(tl.int64)
        m_j = (o_j >= 0) & (o_j < T)
        if HAS_MASK:
            m_j = m_j & (tl.load(p_mask + i_b * s_mb + o_j, mask=m_j, other=0) != 0)
        b_fk = _tile(p_fk_bh, o_j, s_fkt, o_f, m_j, m_f)  # [BLOCK_T, BLOCK_F]
        b_v = _tile(p_v_bh, o_j, s_vt, o_d, m_j, m_d)  # [BLOCK_T, BLOCK_D]
        b_S += _dot(tl.trans(b_fk), b_v, DOT_UPCAST)
        b_z += tl.sum(b_fk.to(tl.float32), 0)


def hybrid_window_attention(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, window: int,
                            scale: float, mix: Tensor, key_mask: Tensor | None = None,
                            eps: float = 1e-6, *, out: Tensor | None = None) -> Tensor:
    """Host wrapper for `rewriter::hybrid_window_attention` (shapes checked by the op)."""
    _check_device(q, k, v, fq, fk, mix, key_mask)
    q, k, v, fq, fk = map(_lastdim_contiguous, (q, k, v, fq, fk))
    B, H, T, DK = q.shape
    Hkv, F, D = k.shape[1], fq.shape[3], v.shape[3]
    if out is None:
        out = torch.empty(B, H, T, D, dtype=v.dtype, device=v.device)
    mask = _mask_u8(key_mask, q)
    mix = mix.to(torch.float32).contiguous()
    BLOCK_D = min(_pow2(D), BLOCK_D_MAX)
    hybrid_window_attention_fwd_kernel[(triton.cdiv(D, BLOCK_D), B * H)](
        q, k, v, fq, fk, mix, mask, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), fq.stride(0), fq.stride(1), fq.stride(2),
        fk.stride(0), fk.stride(1), fk.stride(2), out.stride(0), out.stride(1), out.stride(2),
        mask.stride(0), T, H, H // Hkv, DK, F, D, int(window), float(scale), eps,
        HAS_MASK=key_mask is not None, BLOCK_T=BLOCK_T, BLOCK_K=_pow2(DK), BLOCK_F=_pow2(F),
        BLOCK_D=BLOCK_D, DOT_UPCAST=_INTERPRET)
    return out


# --------------------------------------------------------------------------------------------
# decode: one token, state in, state out
# --------------------------------------------------------------------------------------------
@triton.jit
def linear_attention_step_fwd_kernel(
    p_fq, p_fk, p_v, p_S, p_z, p_o, p_S_new, p_z_new,
    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_Sb, s_Sh, s_Sf, s_zb, s_zh, s_ob, s_oh,
    H, G, F, D, eps,
    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (D slice, batch, kv head): the state is updated once, then read by the
    # kv head's G query heads
    i_d = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    HKV = H // G
    i_b = i_bh // HKV
    i_hkv = i_bh % HKV
    o_f = tl.arange(0, BLOCK_F)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_f = o_f < F
    m_d = o_d < D
    m_fd = m_f[:, None] & m_d[None, :]

    b_fk = tl.load(p_fk + i_b * s_kb + i_hkv * s_kh + o_f, mask=m_f, other=0.0).to(tl.float32)  # [BLOCK_F]
    b_v = tl.load(p_v + i_b * s_vb + i_hkv * s_vh + o_d, mask=m_d, other=0.0).to(tl.float32)    # [BLOCK_D]
    p_S_bh = p_S + i_b * s_Sb + i_hkv * s_Sh + o_f[:, None] * s_Sf + o_d[None, :]
    b_S = tl.load(p_S_bh, mask=m_fd, other=0.0).to(tl.float32)                                 # [BLOCK_F, BLOCK_D]
    b_z = tl.load(p_z + i_b * s_zb + i_hkv * s_zh + o_f, mask=m_f, other=0.0).to(tl.float32)    # [BLOCK_F]
    b_S += b_fk[:, None] * b_v[None, :]
    b_z += b_fk
    # S_new, z_new: contiguous [B, Hkv, F, D] / [B, Hkv, F]
    tl.store(p_S_new + i_bh * F * D + o_f[:, None] * D + o_d[None, :],
             b_S.to(p_S_new.dtype.element_ty), mask=m_fd)
    if i_d == 0:                                                # one D slice writes z
        tl.store(p_z_new + i_bh * F + o_f, b_z.to(p_z_new.dtype.element_ty), mask=m_f)

    for g in range(0, G):
        i_h = i_hkv * G + g
        b_fq = tl.load(p_fq + i_b * s_qb + i_h * s_qh + o_f, mask=m_f, other=0.0).to(tl.float32)  # [BLOCK_F]
        b_num = tl.sum(b_fq[:, None] * b_S, 0)                                                   # [BLOCK_D]
        b_den = tl.sum(b_fq * b_z, 0)
        tl.store(p_o + i_b * s_ob + i_h * s_oh + o_d, (b_num / (b_den + eps)).to(p_o.dtype.element_ty),
                 mask=m_d)


def linear_attention_step(fq_t: Tensor, fk_t: Tensor, v_t: Tensor, state_S: Tensor, state_z: Tensor,
                          eps: float = 1e-6, *, out: tuple[Tensor, Tensor, Tensor] | None = None
                          ) -> tuple[Tensor, Tensor, Tensor]:
    """Host wrapper for `rewriter::linear_attention_step`: returns (o_t, S_new, z_new)."""
    _check_device(fq_t, fk_t, v_t, state_S, state_z)
    fq_t, fk_t, v_t, state_S, state_z = map(_lastdim_contiguous, (fq_t, fk_t, v_t, state_S, state_z))
    B, H, _, F = fq_t.shape
    Hkv, D = fk_t.shape[1], v_t.shape[3]
    if out is None:
        out = (torch.empty(B, H, 1, D, dtype=v_t.dtype, device=v_t.device),
               torch.empty(B, Hkv, F, D, dtype=state_S.dtype, device=state_S.device),
               torch.empty(B, Hkv, F, dtype=state_z.dtype, device=state_z.device))
    o, S_new, z_new = out
    assert S_new.is_contiguous() and z_new.is_contiguous() and o.stride(-1) == 1
    BLOCK_D = min(_pow2(D), BLOCK_D_MAX)
    linear_attention_step_fwd_kernel[(triton.cdiv(D, BLOCK_D), B * Hkv)](
        fq_t, fk_t, v_t, state_S, state_z, o, S_new, z_new,
        fq_t.stride(0), fq_t.stride(1), fk_t.stride(0), fk_t.stride(1), v_t.stride(0), v_t.stride(1),
        state_S.stride(0), state_S.stride(1), state_S.stride(2), state_z.stride(0), state_z.stride(1),
        o.stride(0), o.stride(1), H, H // Hkv, F, D, eps,
        BLOCK_F=_pow2(F), BLOCK_D=BLOCK_D)
    return o, S_new, z_new


# --------------------------------------------------------------------------------------------
# LoLCATs decode: fold the leaving token into (S, z), ring-buffer write, W-slot softmax + φq S
# --------------------------------------------------------------------------------------------
@triton.jit
def hybrid_window_step_fwd_kernel(
    p_q, p_k, p_v, p_fq, p_fk, p_S, p_z, p_kw, p_vw, p_fw, p_valid, p_pos, p_mix, p_tv,
    p_o, p_S_new, p_z_new, p_kw_new, p_vw_new, p_fw_new, p_valid_new,
    s_qb, s_qh, s_kb, s_kh, s_vb, s_vh, s_fqb, s_fqh, s_fkb, s_fkh, s_Sb, s_Sh, s_Sf, s_zb, s_zh,
    s_kwb, s_kwh, s_kwt, s_vwb, s_vwh, s_vwt, s_fwb, s_fwh, s_fwt, s_mb, s_ob, s_oh,
    H, G, DK, F, D, W, scale, eps,
    HAS_TV: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # one program per (D slice, batch, kv head): the kv head's G query heads are the rows of its
    # tiles; slice 0 also writes the K / φK ring buffers (and kv head 0 the shared win_valid)
    i_d = tl.program_id(0)
    i_bh = tl.program_id(1).to(tl.int64)
    HKV = H // G
    i_b = i_bh // HKV
    i_hkv = i_bh % HKV
    o_g = tl.arange(0, BLOCK_G)
    o_k = tl.arange(0, BLOCK_K)
    o_f = tl.arange(0, BLOCK_F)
    o_d = i_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_g = o_g < G
    m_k = o_k < DK
    m_f = o_f < F
    m_d = o_d < D
    slot = tl.load(p_pos).to(tl.int64) % W
    real = True
    if HAS_TV:
        real = tl.load(p_tv + i_b) != 0

    # 1. fold the token leaving the window (slot `slot`, if it holds a real one) into S, z
    leave = tl.load(p_valid + i_b * s_mb + slot) != 0
    p_fw_bh = p_fw + i_b * s_fwb + i_hkv * s_fwh
    p_vw_bh = p_vw + i_b * s_vwb + i_hkv * s_vwh
    b_fl = tl.load(p_fw_bh + slot * s_fwt + o_f, mask=m_f, other=0.0).to(tl.float32)          # [BLOCK_F]
    b_vl = tl.load(p_vw_bh + slot * s_vwt + o_d, mask=m_d, other=0.0).to(tl.float32)          # [BLOCK_D]
    b_fl = tl.where(leave, b_fl, 0.0)
    b_vl = tl.where(leave, b_vl, 0.0)
    m_fd = m_f[:, None] & m_d[None, :]
    b_S = tl.load(p_S + i_b * s_Sb + i_hkv * s_Sh + o_f[:, None] * s_Sf + o_d[None, :], mask=m_fd,
                  other=0.0).to(tl.float32) + b_fl[:, None] * b_vl[None, :]          # [BLOCK_F, BLOCK_D]
    b_z = tl.load(p_z + i_b * s_zb + i_hkv * s_zh + o_f, mask=m_f, other=0.0).to(tl.float32) + b_fl
    tl.store(p_S_new + i_bh * F * D + o_f[:, None] * D + o_d[None, :], b_S.to(p_S_new.dtype.element_ty),
             mask=m_fd)
    if i_d == 0:
        tl.store(p_z_new + i_bh * F + o_f, b_z.to(p_z_new.dtype.element_ty), mask=m_f)

    # 2. the new token (zeros if it is padding)
    b_kn = tl.load(p_k + i_b * s_kb + i_hkv * s_kh + o_k, mask=m_k, other=0.0).to(tl.float32)
    b_vn = tl.load(p_v + i_b * s_vb + i_hkv * s_vh + o_d, mask=m_d, other=0.0).to(tl.float32)
    b_fn = tl.load(p_fk + i_b * s_fkb + i_hkv * s_fkh + o_f, mask=m_f, other=0.0).to(tl.float32)
    b_kn = tl.where(real, b_kn, 0.0)
    b_vn = tl.where(real, b_vn, 0.0)
    b_fn = tl.where(real, b_fn, 0.0)

    # 3. softmax over the W slots (online over BLOCK_W tiles), the new token in its slot
    b_q = tl.load(p_q + i_b * s_qb + (i_hkv * G + o_g)[:, None] * s_qh + o_k[None, :],
                  mask=m_g[:, None] & m_k[None, :], other=0.0).to(tl.float32)        # [BLOCK_G, BLOCK_K]
    b_m = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_G], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    p_kw_bh = p_kw + i_b * s_kwb + i_hkv * s_kwh
    for w0 in range(0, W, BLOCK_W):
        o_w = (w0 + tl.arange(0, BLOCK_W)).to(tl.int64)
        m_w = o_w < W
        here = (o_w == slot)[:, None]
        b_val = tl.load(p_valid + i_b * s_mb + o_w, mask=m_w, other=0) != 0
        b_val = tl.where(o_w == slot, real, b_val) & m_w                                        # [BLOCK_W]
        b_kt = tl.load(p_kw_bh + o_w[:, None] * s_kwt + o_k[None, :], mask=m_w[:, None] & m_k[None, :],
                       other=0.0)
        b_kt = tl.where(here, b_kn[None, :], b_kt.to(tl.float32))                     # [BLOCK_W, BLOCK_K]
        b_vt = tl.load(p_vw_bh + o_w[:, None] * s_vwt + o_d[None, :], mask=m_w[:, None] & m_d[None, :],
                       other=0.0)
        b_vt = tl.where(here, b_vn[None, :], b_vt.to(tl.float32))                     # [BLOCK_W, BLOCK_D]
        tl.store(p_vw_new + i_bh * W * D + o_w[:, None] * D + o_d[None, :],
                 b_vt.to(p_vw_new.dtype.element_ty), mask=m_w[:, None] & m_d[None, :])
        if i_d == 0:
            tl.store(p_kw_new + i_bh * W * DK + o_w[:, None] * DK + o_k[None, :],
                     b_kt.to(p_kw_new.dtype.element_ty), mask=m_w[:, None] & m_k[None, :])
            b_ft = tl.load(p_fw_bh + o_w[:, None] * s_fwt + o_f[None, :], mask=m_w[:, None] & m_f[None, :],
                           other=0.0)
            b_ft = tl.where(here, b_fn[None, :], b_ft.to(tl.float32))
            tl.store(p_fw_new + i_bh * W * F + o_w[:, None] * F + o_f[None, :],
                     b_ft.to(p_fw_new.dtype.element_ty), mask=m_w[:, None] & m_f[None, :])
            if i_hkv == 0:
                tl.store(p_valid_new + i_b * W + o_w, b_val.to(tl.uint8), mask=m_w)
        b_vt = tl.where(b_val[:, None], b_vt, 0.0)                    # garbage in unused slots stays out
        b_s = tl.dot(b_q, tl.trans(b_kt), input_precision="ieee") * scale             # [BLOCK_G, BLOCK_W]
        b_s = tl.where(b_val[None, :], b_s, float("-inf"))
        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp(b_m - b_m_safe)
        b_p = tl.exp(b_s - b_m_safe[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p, b_vt, input_precision="ieee")
        b_m = b_m_new

    # 4. beside the linear state; the softmax terms are relative to m (0 if the window is empty)
    b_fq = tl.load(p_fq + i_b * s_fqb + (i_hkv * G + o_g)[:, None] * s_fqh + o_f[None, :],
                   mask=m_g[:, None] & m_f[None, :], other=0.0).to(tl.float32)       # [BLOCK_G, BLOCK_F]
    b_mix = tl.load(p_mix + i_hkv * G + o_g, mask=m_g, other=0.0)                             # [BLOCK_G]
    b_num = b_acc + b_mix[:, None] * tl.dot(b_fq, b_S, input_precision="ieee")
    b_den = b_l + b_mix * tl.sum(b_fq * b_z[None, :], 1) + eps
    tl.store(p_o + i_b * s_ob + (i_hkv * G + o_g)[:, None] * s_oh + o_d[None, :],
             (b_num / b_den[:, None]).to(p_o.dtype.element_ty), mask=m_g[:, None] & m_d[None, :])


def hybrid_window_step(q_t: Tensor, k_t: Tensor, v_t: Tensor, fq_t: Tensor, fk_t: Tensor, state_S: Tensor,
                       state_z: Tensor, k_win: Tensor, v_win: Tensor, fk_win: Tensor, win_valid: Tensor,
                       position: Tensor, scale: float, mix: Tensor, token_valid: Tensor | None = None,
                       eps: float = 1e-6, *, out: tuple[Tensor, ...] | None = None) -> tuple[Tensor, ...]:
    """Host wrapper for `rewriter::hybrid_window_step` (shapes checked by the op): returns
    (o_t, S, z, k_win, v_win, fk_win, win_valid), new tensors (`out` may pre-allocate them, contiguous)."""
    _check_device(q_t, k_t, v_t, fq_t, fk_t, state_S, state_z, k_win, v_win, fk_win, win_valid, position)
    q_t, k_t, v_t, fq_t, fk_t, state_S, state_z, k_win, v_win, fk_win = map(
        _lastdim_contiguous, (q_t, k_t, v_t, fq_t, fk_t, state_S, state_z, k_win, v_win, fk_win))
    B, H, _, DK = q_t.shape
    Hkv, W, D, F = k_win.shape[1], k_win.shape[2], v_win.shape[3], fq_t.shape[3]
    if out is None:
        out = (torch.empty(B, H, 1, D, dtype=v_t.dtype, device=v_t.device),
               torch.empty(B, Hkv, F, D, dtype=state_S.dtype, device=state_S.device),
               torch.empty(B, Hkv, F, dtype=state_z.dtype, device=state_z.device),
               torch.empty_like(k_win, memory_format=torch.contiguous_format),
               torch.empty_like(v_win, memory_format=torch.contiguous_format),
               torch.empty_like(fk_win, memory_format=torch.contiguous_format),
               torch.empty(B, W, dtype=torch.bool, device=win_valid.device))
    o, S_new, z_new, kw_new, vw_new, fw_new, valid_new = out
    assert all(t.is_contiguous() for t in out[1:]) and o.stride(-1) == 1
    valid = win_valid.to(torch.uint8).contiguous()
    valid_u8 = valid_new.view(torch.uint8) if valid_new.dtype == torch.bool else valid_new
    tv = token_valid.to(torch.uint8).contiguous() if token_valid is not None else valid   # never read if None
    pos = position.reshape(1).to(torch.int64)
    BLOCK_D = min(_pow2(D), BLOCK_D_MAX)
    hybrid_window_step_fwd_kernel[(triton.cdiv(D, BLOCK_D), B * Hkv)](
        q_t, k_t, v_t, fq_t, fk_t, state_S, state_z, k_win, v_win, fk_win, valid, pos,
        mix.to(torch.float32).contiguous(), tv, o, S_new, z_new, kw_new, vw_new, fw_new, valid_u8,
        q_t.stride(0), q_t.stride(1), k_t.stride(0), k_t.stride(1), v_t.stride(0), v_t.stride(1),
        fq_t.stride(0), fq_t.stride(1), fk_t.stride(0), fk_t.stride(1),
        state_S.stride(0), state_S.stride(1), state_S.stride(2), state_z.stride(0), state_z.stride(1),
        k_win.stride(0), k_win.stride(1), k_win.stride(2), v_win.stride(0), v_win.stride(1), v_win.stride(2),
        fk_win.stride(0), fk_win.stride(1), fk_win.stride(2), valid.stride(0), o.stride(0), o.stride(1),
        H, H // Hkv, DK, F, D, W, float(scale), eps,
        HAS_TV=token_valid is not None, BLOCK_G=_pow2(H // Hkv), BLOCK_W=min(_pow2(W), 64),
        BLOCK_K=_pow2(DK), BLOCK_F=_pow2(F), BLOCK_D=BLOCK_D)
    return o, S_new, z_new, kw_new, vw_new, fw_new, valid_new
