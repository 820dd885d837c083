"""FLOP formulas of the linear attention ops (kernels/flops.py states the convention: tensors come
as shapes, one multiply-add = 2). They follow cpu.py's math: the non-causal op is two GEMMs per
kv head (S = φKᵀV, then φQ·S), the causal one is chunked (CHUNK queries at a time: an intra-chunk
C×C product plus the carried state), the hybrid adds a banded softmax over 2·max(W, CHUNK) keys.
Katharopoulos et al. 2020, arXiv:2006.16236; LoLCATs, arXiv:2410.10254."""
from __future__ import annotations

import sympy

from ..flops import SOFTMAX
from .cpu import CHUNK


def _state(B, Hkv, T, F, D):
    """Σ φK·Vᵀ and Σ φK over T keys: 2·F·D + F per key and kv head."""
    return B * Hkv * T * (2 * F * D + F)


def _read(B, H, T, F, D):
    """φQ·S, φQ·z and the division: 2·F·D + 2·F + 2·D per query and head."""
    return B * H * T * (2 * F * D + 2 * F + 2 * D)


def _causal_terms(B, H, Hkv, T, F, D):
    """The chunked causal form: per query a C-key intra-chunk product (2·C·(F + D) and the tril
    mask), plus the chunk states (as the non-causal op) read by every query."""
    C = sympy.Min(CHUNK, T)
    return B * H * T * C * (2 * F + 2 * D + 2) + _state(B, Hkv, T, F, D) + _read(B, H, T, F, D)


def linear_attention(fq, fk, v, key_mask=None, causal=False, eps=1e-6, **_):
    B, H, T, F = fq
    Hkv, Tk, D = fk[1], fk[2], v[3]
    masking = 0 if key_mask is None else B * Hkv * Tk * (F + D)
    if causal:
        return _causal_terms(B, H, Hkv, T, F, D) + masking
    return _state(B, Hkv, Tk, F, D) + _read(B, H, T, F, D) + masking


def hybrid_window_attention(q, k, v, fq, fk, window, scale, mix, key_mask=None, eps=1e-6, **_):
    B, H, T, Dk = q
    Hkv, D, F = k[1], v[3], fq[3]
    keys = 2 * sympy.Min(sympy.Max(window, CHUNK), T)          # chunk c−1 and c: 2C keys per query
    window_part = B * H * T * keys * (2 * Dk + 2 * D + SOFTMAX + 2)   # + scale and band mask
    return window_part + _causal_terms(B, H, Hkv, T, F, D) + B * H * T * 4 * D   # the mix


def linear_attention_step(fq_t, fk_t, v_t, state_S, state_z, eps=1e-6, **_):
    B, H, _, F = fq_t
    Hkv, D = fk_t[1], v_t[3]
    return _state(B, Hkv, 1, F, D) + _read(B, H, 1, F, D)


def hybrid_window_step(q_t, k_t, v_t, fq_t, fk_t, state_S, state_z, k_win, v_win, fk_win, win_valid,
                       position, scale, mix, token_valid=None, eps=1e-6, **_):
    B, H, _, Dk = q_t
    Hkv, W, D, F = k_win[1], k_win[2], v_win[3], fq_t[3]
    return (B * H * W * (2 * Dk + 2 * D + SOFTMAX + 2) + _state(B, Hkv, 1, F, D) + _read(B, H, 1, F, D)
            + B * H * 4 * D)


# the backward ops (attention-transfer calibration): a vector-Jacobian product is ≈ 2× its forward
def linear_attention_backward(grad_out, fq, fk, v, key_mask, causal, eps, **_):
    return 2 * linear_attention(fq, fk, v, key_mask, causal, eps)


def hybrid_window_attention_backward(grad_out, q, k, v, fq, fk, window, scale, mix, key_mask, eps, **_):
    return 2 * hybrid_window_attention(q, k, v, fq, fk, window, scale, mix, key_mask, eps)


def linear_attention_step_backward(grad_o, grad_S, grad_z, fq_t, fk_t, v_t, state_S, state_z, eps, **_):
    return 2 * linear_attention_step(fq_t, fk_t, v_t, state_S, state_z, eps)


FLOPS = {"linear_attention": linear_attention, "hybrid_window_attention": hybrid_window_attention,
         "linear_attention_step": linear_attention_step, "hybrid_window_step": hybrid_window_step,
         "linear_attention_backward": linear_attention_backward,
         "hybrid_window_attention_backward": hybrid_window_attention_backward,
         "linear_attention_step_backward": linear_attention_step_backward}
