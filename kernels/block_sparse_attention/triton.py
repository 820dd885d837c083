"""Block-sparse flash attention driven by a per-query-block table of key blocks.

BiFormer bi-level routing (arXiv:2303.08125) / Routing Transformer (arXiv:2003.05997): each
program owns one query block of one head, walks `block_table[b, h, qblock, :]` and loads
each listed K/V block straight from K and V by pointer (no gathered copies), merging the
blocks with the online-softmax (m, l, acc) rule of FlashAttention (arXiv:2205.14135).
Causal masking compares ORIGINAL token positions; padded keys are excluded; a row that sees
no key writes 0 (and lse = -inf), never NaN.

Memory traffic per (query block, head): read BLOCK·D of Q once, BLOCK·(D + Dv) of K/V per
listed block; write BLOCK·Dv of O and BLOCK of lse. Never T_q × T_k.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def block_sparse_attention_fwd_kernel(
    q, k, v, table, key_mask, o, lse,
    s_qb, s_qh, s_qt, s_qd,
    s_kb, s_kh, s_kt, s_kd,
    s_vb, s_vh, s_vt, s_vd,
    s_tb, s_th, s_tq, s_tk,
    s_mb, s_mt,
    s_ob, s_oh, s_ot, s_od,
    T_Q, T_K, MAX_KBLOCKS,
    qk_scale_log2,                    # softmax scale · log2(e): scores live in base 2
    H: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,         # the routing block size (tokens per block)
    BLOCK: tl.constexpr,              # next power of two ≥ max(BLOCK_SIZE, 16), the tile
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_KEY_MASK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    DOT_F32: tl.constexpr,            # upcast tl.dot operands (interpreter: its bf16 dot is wrong)
):
    i_qb = tl.program_id(0)
    i_bh = tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_hkv = i_h // GROUP

    o_blk = tl.arange(0, BLOCK)                                  # [BLOCK]
    o_d = tl.arange(0, D_PAD)
    o_dv = tl.arange(0, DV_PAD)
    m_d = o_d < D
    m_dv = o_dv < DV
    o_m = i_qb.to(tl.int64) * BLOCK_SIZE + o_blk                 # original query positions
    m_m = (o_blk < BLOCK_SIZE) & (o_m < T_Q)

    p_q = q + i_b * s_qb + i_h * s_qh + o_m[:, None] * s_qt + o_d[None, :] * s_qd
    b_q = tl.load(p_q, mask=m_m[:, None] & m_d[None, :], other=0.0)       # [BLOCK, D_PAD]
    if DOT_F32:
        b_q = b_q.to(tl.float32)

    b_m = tl.full([BLOCK], float("-inf"), dtype=tl.float32)     # running max (base 2)
    b_l = tl.zeros([BLOCK], dtype=tl.float32)                    # running sum
    b_acc = tl.zeros([BLOCK, DV_PAD], dtype=tl.float32)         # running Σ p·v

    p_table = table + i_b * s_tb + i_h * s_th + i_qb.to(tl.int64) * s_tq
    for j in range(0, MAX_KBLOCKS):
        i_kb = tl.load(p_table + j * s_tk).to(tl.int64)
        visible = i_kb >= 0
        if CAUSAL:
            visible = visible & (i_kb <= i_qb)                   # later blocks hold only future keys
        if visible:
            o_n = i_kb * BLOCK_SIZE + o_blk                      # original key positions
            m_n = (o_blk < BLOCK_SIZE) & (o_n < T_K)
            if HAS_KEY_MASK:
                b_km = tl.load(key_mask + i_b * s_mb + o_n * s_mt, mask=m_n, other=0)
                m_n = m_n & (b_km != 0)
            p_k = k + i_b * s_kb + i_hkv * s_kh + o_n[:, None] * s_kt + o_d[None, :] * s_kd
            p_v = v + i_b * s_vb + i_hkv * s_vh + o_n[:, None] * s_vt + o_dv[None, :] * s_vd
            b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)    # [BLOCK, D_PAD]
            b_v = tl.load(p_v, mask=m_n[:, None] & m_dv[None, :], other=0.0)   # [BLOCK, DV_PAD]
            if DOT_F32:
                b_k = b_k.to(tl.float32)
                b_v = b_v.to(tl.float32)

            b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale_log2  # [BLOCK, BLOCK]
            m_s = m_n[None, :]
            if CAUSAL:
                m_s = m_s & (o_m[:, None] >= o_n[None, :])
            b_s = tl.where(m_s, b_s, float("-inf"))

            b_m_new = tl.maximum(b_m, tl.max(b_s, 1))            # [BLOCK]
            b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)   # all-masked rows stay finite
            b_alpha = tl.exp2(b_m - b_m_safe)
            b_p = tl.exp2(b_s - b_m_safe[:, None])               # [BLOCK, BLOCK]
            b_l = b_l * b_alpha + tl.sum(b_p, 1)
            b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
            b_m = b_m_new

    m_seen = b_l > 0
    b_o = tl.where(m_seen[:, None], b_acc / tl.where(m_seen, b_l, 1.0)[:, None], 0.0)
    p_o = o + i_b * s_ob + i_h * s_oh + o_m[:, None] * s_ot + o_dv[None, :] * s_od
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_m[:, None] & m_dv[None, :])
    # natural-log lse: (m + log2 l) · ln 2; -inf where nothing was visible
    b_lse = tl.where(m_seen, (b_m + tl.log2(tl.where(m_seen, b_l, 1.0))) / 1.4426950408889634, float("-inf"))
    p_lse = lse + (i_b * H + i_h) * T_Q + o_m
    tl.store(p_lse, b_lse, mask=m_m)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_f32(dtype: torch.dtype) -> bool:
    """Triton 3.9's interpreter multiplies bf16/fp16 tl.dot operands as their raw uint16 bits
    (interpreter.py create_dot), so under TRITON_INTERPRET=1 half-precision operands are
    upcast to fp32 first. That matches the GPU numerically: a bf16×bf16 product is exact in
    fp32 and the GPU accumulates in fp32 too. Compiled kernels keep native half dots."""
    return _interpreting() and dtype in (torch.bfloat16, torch.float16)


def block_sparse_attention_triton(
    q: torch.Tensor,                 # [B, H, T_q, D]
    k: torch.Tensor,                 # [B, Hkv, T_k, D]
    v: torch.Tensor,                 # [B, Hkv, T_k, Dv]
    block_table: torch.Tensor,       # int32 [B, H, ceil(T_q / block_size), max_kblocks]
    block_size: int,
    causal: bool,
    key_mask: torch.Tensor | None,   # bool [B, T_k]
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host wrapper: returns (out [B, H, T_q, Dv] in q.dtype, lse fp32 [B, H, T_q]).

    Runs on CUDA tensors, or on CPU tensors when TRITON_INTERPRET=1 (tests). `out` may be
    passed pre-allocated (tests pass a NaN-filled one so unwritten elements show)."""
    if not q.is_cuda and not _interpreting():
        raise RuntimeError("block_sparse_attention_triton: tensors are on "
                           f"{q.device}; the Triton kernel needs CUDA tensors or TRITON_INTERPRET=1")
    B, H, t_q, D = q.shape
    h_kv, t_k, d_v = k.shape[1], k.shape[2], v.shape[-1]
    n_qblocks = -(-t_q // block_size)
    if block_table.shape[:3] != (B, H, n_qblocks):
        raise ValueError(f"block_sparse_attention_triton: block_table has shape {tuple(block_table.shape)}, "
                         f"expected [{B}, {H}, {n_qblocks}, max_kblocks]")
    if out is None:
        out = torch.empty(B, H, t_q, d_v, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, t_q, dtype=torch.float32, device=q.device)
    has_key_mask = key_mask is not None
    if has_key_mask:
        key_mask = key_mask.to(torch.uint8)
        s_mb, s_mt = key_mask.stride()
    else:
        key_mask, s_mb, s_mt = q, 0, 0          # never read: HAS_KEY_MASK is False
    # tile = the routing block rounded up to a power of two; 16 is tl.dot's minimum
    block = max(16, triton.next_power_of_2(block_size))
    grid = (n_qblocks, B * H)
    block_sparse_attention_fwd_kernel[grid](
        q, k, v, block_table, key_mask, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *block_table.stride(), s_mb, s_mt, *out.stride(),
        t_q, t_k, block_table.shape[-1], scale * LOG2E,
        H=H, GROUP=H // h_kv, BLOCK_SIZE=block_size, BLOCK=block,
        D=D, D_PAD=max(16, triton.next_power_of_2(D)), DV=d_v, DV_PAD=max(16, triton.next_power_of_2(d_v)),
        CAUSAL=causal, HAS_KEY_MASK=has_key_mask,
        # fp32 inputs: exact fp32 products (TF32 would miss the fp32 tolerance); bf16: native
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        DOT_F32=dot_f32(q.dtype),
        # 4 warps / 2 stages: Triton's defaults, chosen for interpreter-mode tests; retune on GPU
        num_warps=4, num_stages=2,
    )
    return out, lse
