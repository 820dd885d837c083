"""Agent attention in three Triton kernels; never an N × N (or even n × N) matrix in memory.

Han et al., "Agent Attention", ECCV 2024, arXiv:2312.08874.

  1. `agent_attention_agents_fwd_kernel`  V_A partials: n agent queries × one split of the N
     keys per program (split-K over N, FlashAttention-2 decode style), online softmax inside
     the split; writes unnormalized (acc, m, l) per split.
     Traffic: read n·D agents + N·(D + Dv) of K/V once per agent block; write S·n·(Dv + 2).
  2. `agent_attention_merge_fwd_kernel`  merges the S splits by the log-sum-exp rule
     m = max m_s, l = Σ l_s·2^(m_s − m), acc = Σ acc_s·2^(m_s − m); V_A = acc / l (0 if l = 0).
  3. `agent_attention_fwd_kernel`  O: BLOCK_N queries × all n agents, the whole score row in
     one tile when n ≤ 256 (one loop iteration), online softmax over agent tiles beyond that;
     adds the shortcut c·V. Traffic: read N·(D + Dv) of Q/V and n·(D + Dv) per query block.

Scores live in base 2 (scale · log2 e, exp2), as in the Triton fused-attention tutorial.
Biases B₁ [(B,) H, n, N] / B₂ [(B,) H, N, n] are supported (any strides, so broadcast
views work; −inf entries mask agents in stage 2 as long as agent 0 stays finite); per-head temperatures and shortcut are read from [H] tensors.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def agent_attention_agents_fwd_kernel(
    a, k, v, key_mask, bias1, scale1, ws_acc, ws_m, ws_l,
    s_ab, s_ah, s_an, s_ad,
    s_kb, s_kh, s_kt, s_kd,
    s_vb, s_vh, s_vt, s_vd,
    s_mb, s_mt,
    s_bb, s_bh, s_ba, s_bt,
    N, N_AG, SPLIT_LEN,
    H: tl.constexpr, GROUP: tl.constexpr, NUM_SPLITS: tl.constexpr,
    BLOCK_A: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    i_ab, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_hkv = i_h // GROUP

    o_a = i_ab * BLOCK_A + tl.arange(0, BLOCK_A)                 # agent rows
    o_d = tl.arange(0, D_PAD)
    o_dv = tl.arange(0, DV_PAD)
    m_a = o_a < N_AG
    m_d = o_d < D
    m_dv = o_dv < DV

    p_a = a + i_b * s_ab + i_h * s_ah + o_a[:, None].to(tl.int64) * s_an + o_d[None, :] * s_ad
    b_a = tl.load(p_a, mask=m_a[:, None] & m_d[None, :], other=0.0)       # [BLOCK_A, D_PAD]
    if DOT_F32:
        b_a = b_a.to(tl.float32)
    b_scale = tl.load(scale1 + i_h).to(tl.float32) * 1.4426950408889634

    b_m = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_A], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_A, DV_PAD], dtype=tl.float32)

    lo = i_s * SPLIT_LEN
    hi = tl.minimum(lo + SPLIT_LEN, N)
    for start in range(lo, hi, BLOCK_N):
        o_n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)      # key positions
        m_n = o_n < hi
        if HAS_KEY_MASK:
            b_km = tl.load(key_mask + i_b * s_mb + o_n * s_mt, mask=m_n, other=0)
            m_n = m_n & (b_km != 0)
        p_k = k + i_b * s_kb + i_hkv * s_kh + o_n[:, None] * s_kt + o_d[None, :] * s_kd
        p_v = v + i_b * s_vb + i_hkv * s_vh + o_n[:, None] * s_vt + o_dv[None, :] * s_vd
        b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0)   # [BLOCK_N, D_PAD]
        b_v = tl.load(p_v, mask=m_n[:, None] & m_dv[None, :], other=0.0)  # [BLOCK_N, DV_PAD]
        if DOT_F32:
            b_k = b_k.to(tl.float32)
            b_v = b_v.to(tl.float32)

        b_s = tl.dot(b_a, tl.trans(b_k), input_precision=DOT_PRECISION) * b_scale   # [BLOCK_A, BLOCK_N]
        if HAS_BIAS:
            p_b = bias1 + i_b * s_bb + i_h * s_bh + o_a[:, None].to(tl.int64) * s_ba + o_n[None, :] * s_bt
            b_s += tl.load(p_b, mask=m_a[:, None] & m_n[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
        b_s = tl.where(m_n[None, :], b_s, float("-inf"))

        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)   # rows with no valid key yet
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_p = tl.exp2(b_s - b_m_safe[:, None])                          # [BLOCK_A, BLOCK_N]
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
        b_m = b_m_new

    # workspace: ws_acc [B·H, NUM_SPLITS, N_AG, DV_PAD], ws_m / ws_l [B·H, NUM_SPLITS, N_AG]
    o_row = (i_bh.to(tl.int64) * NUM_SPLITS + i_s) * N_AG + o_a
    tl.store(ws_m + o_row, b_m, mask=m_a)
    tl.store(ws_l + o_row, b_l, mask=m_a)
    tl.store(ws_acc + o_row[:, None] * DV_PAD + o_dv[None, :], b_acc, mask=m_a[:, None])


@triton.jit
def agent_attention_merge_fwd_kernel(
    ws_acc, ws_m, ws_l, v_agents,
    N_AG,
    NUM_SPLITS: tl.constexpr, BLOCK_A: tl.constexpr, DV_PAD: tl.constexpr,
):
    i_ab, i_bh = tl.program_id(0), tl.program_id(1)
    o_a = i_ab * BLOCK_A + tl.arange(0, BLOCK_A)
    o_dv = tl.arange(0, DV_PAD)
    m_a = o_a < N_AG

    b_m = tl.full([BLOCK_A], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_A], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_A, DV_PAD], dtype=tl.float32)
    for i_s in range(0, NUM_SPLITS):
        o_row = (i_bh.to(tl.int64) * NUM_SPLITS + i_s) * N_AG + o_a
        b_ms = tl.load(ws_m + o_row, mask=m_a, other=float("-inf"))          # [BLOCK_A]
        b_ls = tl.load(ws_l + o_row, mask=m_a, other=0.0)
        b_as = tl.load(ws_acc + o_row[:, None] * DV_PAD + o_dv[None, :], mask=m_a[:, None], other=0.0)
        b_m_new = tl.maximum(b_m, b_ms)
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        b_alpha = tl.exp2(b_m - b_m_safe)
        b_beta = tl.exp2(b_ms - b_m_safe)
        b_l = b_l * b_alpha + b_ls * b_beta
        b_acc = b_acc * b_alpha[:, None] + b_as * b_beta[:, None]
        b_m = b_m_new
    m_seen = b_l > 0                                                      # an agent with no valid key -> 0
    b_va = tl.where(m_seen[:, None], b_acc / tl.where(m_seen, b_l, 1.0)[:, None], 0.0)   # [BLOCK_A, DV_PAD]
    o_row = i_bh.to(tl.int64) * N_AG + o_a
    tl.store(v_agents + o_row[:, None] * DV_PAD + o_dv[None, :], b_va, mask=m_a[:, None])


@triton.jit
def agent_attention_fwd_kernel(
    q, a, v_agents, v, bias2, scale2, shortcut, o,
    s_qb, s_qh, s_qt, s_qd,
    s_ab, s_ah, s_an, s_ad,
    s_vb, s_vh, s_vt, s_vd,
    s_bb, s_bh, s_bt, s_ba,
    s_ob, s_oh, s_ot, s_od,
    N, N_AG,
    H: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_A: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    i_n, i_bh = tl.program_id(0), tl.program_id(1)
    i_b = (i_bh // H).to(tl.int64)
    i_h = (i_bh % H).to(tl.int64)
    i_hkv = i_h // GROUP

    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)   # query positions
    o_d = tl.arange(0, D_PAD)
    o_dv = tl.arange(0, DV_PAD)
    m_n = o_n < N
    m_d = o_d < D
    m_dv = o_dv < DV

    p_q = q + i_b * s_qb + i_h * s_qh + o_n[:, None] * s_qt + o_d[None, :] * s_qd
    b_q = tl.load(p_q, mask=m_n[:, None] & m_d[None, :], other=0.0)       # [BLOCK_N, D_PAD]
    if DOT_F32:
        b_q = b_q.to(tl.float32)
    b_scale = tl.load(scale2 + i_h).to(tl.float32) * 1.4426950408889634

    b_m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_N], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_N, DV_PAD], dtype=tl.float32)
    for a0 in range(0, N_AG, BLOCK_A):                          # one iteration when n ≤ BLOCK_A
        o_a = (a0 + tl.arange(0, BLOCK_A)).to(tl.int64)
        m_a = o_a < N_AG
        p_a = a + i_b * s_ab + i_h * s_ah + o_a[:, None] * s_an + o_d[None, :] * s_ad
        b_a = tl.load(p_a, mask=m_a[:, None] & m_d[None, :], other=0.0)   # [BLOCK_A, D_PAD]
        p_va = v_agents + (i_bh.to(tl.int64) * N_AG + o_a[:, None]) * DV_PAD + o_dv[None, :]
        b_va = tl.load(p_va, mask=m_a[:, None], other=0.0)                 # [BLOCK_A, DV_PAD] fp32
        if DOT_F32:
            b_a = b_a.to(tl.float32)
        else:
            b_va = b_va.to(b_q.dtype)

        b_s = tl.dot(b_q, tl.trans(b_a), input_precision=DOT_PRECISION) * b_scale   # [BLOCK_N, BLOCK_A]
        if HAS_BIAS:
            p_b = bias2 + i_b * s_bb + i_h * s_bh + o_n[:, None] * s_bt + o_a[None, :] * s_ba
            b_s += tl.load(p_b, mask=m_n[:, None] & m_a[None, :], other=0.0).to(tl.float32) * 1.4426950408889634
        b_s = tl.where(m_a[None, :], b_s, float("-inf"))

        b_m_new = tl.maximum(b_m, tl.max(b_s, 1))               # finite: agent 0 is never masked
        b_alpha = tl.exp2(b_m - b_m_new)
        b_p = tl.exp2(b_s - b_m_new[:, None])
        b_l = b_l * b_alpha + tl.sum(b_p, 1)
        b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_va.dtype), b_va, input_precision=DOT_PRECISION)
        b_m = b_m_new

    p_v = v + i_b * s_vb + i_hkv * s_vh + o_n[:, None] * s_vt + o_dv[None, :] * s_vd
    b_v = tl.load(p_v, mask=m_n[:, None] & m_dv[None, :], other=0.0).to(tl.float32)   # [BLOCK_N, DV_PAD]
    b_c = tl.load(shortcut + i_h).to(tl.float32)
    b_o = b_acc / b_l[:, None] + b_c * b_v
    p_o = o + i_b * s_ob + i_h * s_oh + o_n[:, None] * s_ot + o_dv[None, :] * s_od
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_n[:, None] & m_dv[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_f32(dtype: torch.dtype) -> bool:
    """Triton 3.9's interpreter multiplies bf16/fp16 tl.dot operands as their raw uint16 bits
    (interpreter.py create_dot), so under TRITON_INTERPRET=1 half-precision operands are
    upcast to fp32 first. Numerically the GPU path's equal: bf16×bf16 products are exact in
    fp32 and the GPU accumulates in fp32 too. Compiled kernels keep native half dots."""
    return _interpreting() and dtype in (torch.bfloat16, torch.float16)


def _batched_bias(bias: torch.Tensor, batch: int) -> torch.Tensor:
    """A [H, ·, ·] (shared) or [1 | B, H, ·, ·] bias as a [B, H, ·, ·] view: stride 0 over the batch
    when shared, so the kernels index every bias the same way."""
    return (bias[None] if bias.dim() == 3 else bias).expand(batch, *bias.shape[-3:])


def _pad(x: int) -> int:
    return max(16, triton.next_power_of_2(x))          # 16: tl.dot's smallest tile side


def agent_attention_triton(
    q: torch.Tensor,                    # [B, H, N, D]
    k: torch.Tensor,                    # [B, Hkv, N, D]
    v: torch.Tensor,                    # [B, Hkv, N, Dv]
    agents: torch.Tensor,               # [B, H, n, D]
    key_mask: torch.Tensor | None,      # bool [B, N]
    scale1: torch.Tensor,               # [H]
    scale2: torch.Tensor,               # [H]
    bias1: torch.Tensor | None,         # [(B,) H, n, N]
    bias2: torch.Tensor | None,         # [(B,) H, N, n]
    shortcut: torch.Tensor,             # [H]
    *,
    num_splits: int | None = None,
    block_n: int = 64,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Host wrapper. Runs on CUDA tensors, or CPU tensors when TRITON_INTERPRET=1 (tests).
    `num_splits` overrides the split-K count of stage 1 and `block_n` its key tile (tests use
    small ones to exercise the split merge at small N); `out` may be pre-allocated (tests
    pass a NaN-filled one so unwritten elements show)."""
    if not q.is_cuda and not _interpreting():
        raise RuntimeError(f"agent_attention_triton: tensors are on {q.device}; the Triton kernels need "
                           "CUDA tensors or TRITON_INTERPRET=1")
    B, H, N, D = q.shape
    h_kv, d_v, n_ag = k.shape[1], v.shape[-1], agents.shape[2]
    d_pad, dv_pad = _pad(D), _pad(d_v)
    dev = q.device
    f32 = torch.float32
    common = dict(DOT_PRECISION="ieee" if q.dtype == f32 else "tf32",   # fp32: no TF32 rounding
                  DOT_F32=dot_f32(q.dtype))
    scale1, scale2, shortcut = (t.to(f32).contiguous() for t in (scale1, scale2, shortcut))
    has_mask = key_mask is not None
    key_mask = key_mask.to(torch.uint8) if has_mask else q               # q: never read
    s_m = key_mask.stride() if has_mask else (0, 0)

    # stage 1 tiles: 64-key tiles (block_n default) and ≤ 64-agent blocks, chosen for
    # interpreter-mode tests (few, large programs); retune on GPU.
    block_a1, block_n1 = min(64, _pad(n_ag)), _pad(block_n)
    n_ablocks = triton.cdiv(n_ag, block_a1)
    if num_splits is None:
        # enough programs for ~2 waves on a 132-SM GPU, each split ≥ 4 key tiles: a heuristic,
        # not a measurement; retune on GPU
        num_splits = max(1, min(triton.cdiv(N, 4 * block_n1), triton.cdiv(264, B * H * n_ablocks)))
    split_len = triton.cdiv(triton.cdiv(N, num_splits), block_n1) * block_n1
    num_splits = triton.cdiv(N, split_len)
    ws_acc = torch.empty(B * H, num_splits, n_ag, dv_pad, dtype=f32, device=dev)
    ws_m = torch.empty(B * H, num_splits, n_ag, dtype=f32, device=dev)
    ws_l = torch.empty(B * H, num_splits, n_ag, dtype=f32, device=dev)
    b1 = _batched_bias(bias1, B) if bias1 is not None else q
    s_b1 = b1.stride() if bias1 is not None else (0, 0, 0, 0)
    agent_attention_agents_fwd_kernel[(n_ablocks, num_splits, B * H)](
        agents, k, v, key_mask, b1, scale1, ws_acc, ws_m, ws_l,
        *agents.stride(), *k.stride(), *v.stride(), *s_m, *s_b1,
        N, n_ag, split_len,
        H=H, GROUP=H // h_kv, NUM_SPLITS=num_splits, BLOCK_A=block_a1, BLOCK_N=block_n1,
        D=D, D_PAD=d_pad, DV=d_v, DV_PAD=dv_pad, HAS_KEY_MASK=has_mask, HAS_BIAS=bias1 is not None,
        **common,
    )
    v_agents = torch.empty(B * H, n_ag, dv_pad, dtype=f32, device=dev)
    agent_attention_merge_fwd_kernel[(n_ablocks, B * H)](
        ws_acc, ws_m, ws_l, v_agents, n_ag, NUM_SPLITS=num_splits, BLOCK_A=block_a1, DV_PAD=dv_pad,
    )

    # stage 2: the whole agent row in one tile up to n = 256 (the paper's n ≤ 256 regime);
    # beyond that 128-agent tiles. 64-query blocks (32 for wide rows, to bound the
    # [BLOCK_N, BLOCK_A] fp32 score tile): chosen for interpreter-mode tests; retune on GPU.
    block_a2 = _pad(n_ag) if n_ag <= 256 else 128
    block_n2 = 64 if block_a2 <= 128 else 32
    if out is None:
        out = torch.empty(B, H, N, d_v, dtype=q.dtype, device=dev)
    b2 = _batched_bias(bias2, B) if bias2 is not None else q
    s_b2 = b2.stride() if bias2 is not None else (0, 0, 0, 0)
    agent_attention_fwd_kernel[(triton.cdiv(N, block_n2), B * H)](
        q, agents, v_agents, v, b2, scale2, shortcut, out,
        *q.stride(), *agents.stride(), *v.stride(), *s_b2, *out.stride(),
        N, n_ag,
        H=H, GROUP=H // h_kv, BLOCK_N=block_n2, BLOCK_A=block_a2,
        D=D, D_PAD=d_pad, DV=d_v, DV_PAD=dv_pad, HAS_BIAS=bias2 is not None, **common,
    )
    return out
