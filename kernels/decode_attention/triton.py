"""Lean Attention for decode: stream-K over the KV length, then an exact log-sum-exp merge.

Sanovar et al., "Lean Attention: Hardware-Aware Scalable Attention Mechanism for the Decode-Phase
of Transformers", arXiv:2405.10480. At decode a (batch, kv head) pair has only G·T_q query rows
(G = Hq / Hkv), so one program per pair leaves most of a GPU idle at small batch, and a fixed
split per pair (FlashDecoding) leaves programs idle whenever the pairs do not divide the grid.
Lean Attention cuts the whole problem into equal pieces instead:

    tiles        every (batch b, kv head, KV block of BLOCK_N slots): TOTAL = B·Hkv·N_BLK tiles,
                 a pair's N_BLK tiles forming one "segment" s = b·Hkv + hkv
    stream-K     program p of N_PROG takes the contiguous tiles [p·TOTAL/N_PROG, (p+1)·TOTAL/N_PROG)
                 (floors), which may end inside one segment and continue in the next: every
                 program gets the same number of tiles ±1, whatever B, Hkv and L are
    partials     `decode_attention_partial_kernel`: for each segment it touches, a program runs
                 the online softmax (FlashAttention, arXiv:2205.14135) of the segment's G·T_q rows
                 over its tiles and stores the partial (m, ℓ, acc) = (max score, Σ e^{s−m},
                 Σ e^{s−m} v), unnormalized, in fp32
    merge        `decode_attention_merge_kernel`: one program per segment combines the partials of
                 the programs that touched it, M = max m_p, ℓ = Σ ℓ_p e^{m_p−M},
                 O = Σ acc_p e^{m_p−M} / ℓ: associative and exact (only fp32 summation order
                 differs from one softmax); a row with ℓ = 0 (nothing visible) writes 0

The programs touching segment s are p_first(s) … p_last(s), p_first(s) = the program holding the
segment's first tile = ((s·N_BLK + 1)·N_PROG − 1) // TOTAL; a partial is stored at split index
p − p_first(s), so the merge finds it without a table. Scores are kept in base 2
(scale·log2 e folded into the scale, exp2), as in FlashAttention-2.

GQA: the G query heads of a kv head (and their T_q tokens) are the rows of one tile, so each K/V
block is read once for all of them, never through a repeated copy. Masks: slot j is visible to
row (g, i) iff j ≤ cache_position[b, i] and key_valid[b, j]; K/V loads are masked by the same
validity and by j ≤ max_i cache_position[b, i], so garbage (even NaN) in unused slots is never
read, and tiles wholly after the last position are skipped (their programs' share is then idle:
size the cache to the prompt plus the new tokens).

Host wrapper: CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 (the tests). Blocks and the
program count default to values chosen by reasoning, not tuned on a GPU (none was available).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
BLOCK_N = 64                # KV slots per tile (FlashDecoding/Lean use 64-256 on A100/H100)
MAX_ROWS = 128              # G·T_q rows per tile; larger (long prefill chunks) goes to SDPA


@triton.jit
def decode_attention_partial_kernel(
    q, k, v, pos, valid, part_m, part_l, part_acc,
    s_qb, s_qh, s_qt, s_kb, s_kh, s_kt, s_vb, s_vh, s_vt, s_pb, s_pt, s_mb,
    L, N_BLK, TOTAL, N_PROG, HKV, MAX_SPLITS,
    qk_scale_log2,
    TQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    D: tl.constexpr, D_PAD: tl.constexpr, DV: tl.constexpr, DV_PAD: tl.constexpr,
    HAS_VALID: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
):
    i_p = tl.program_id(0).to(tl.int64)
    t0 = i_p * TOTAL // N_PROG                                   # this program's tiles [t0, t1)
    t1 = (i_p + 1) * TOTAL // N_PROG
    o_r = tl.arange(0, BLOCK_R)                                  # row r = g·TQ + i
    m_r = o_r < GROUP * TQ
    o_g = o_r // TQ
    o_i = o_r % TQ
    o_n = tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D_PAD)
    o_dv = tl.arange(0, DV_PAD)
    m_d = o_d < D
    m_dv = o_dv < DV

    for s in range(t0 // N_BLK, (t1 - 1) // N_BLK + 1):         # the segments this program touches
        i_b = s // HKV
        i_hkv = s % HKV
        lo = tl.maximum(t0, s * N_BLK)
        hi = tl.minimum(t1, (s + 1) * N_BLK)
        b_pos = tl.load(pos + i_b * s_pb + o_i * s_pt, mask=m_r, other=-1).to(tl.int64)   # [BLOCK_R]
        pos_max = tl.max(b_pos, 0)
        p_q = q + i_b * s_qb + (i_hkv * GROUP + o_g)[:, None] * s_qh + o_i[:, None] * s_qt + o_d[None, :]
        b_q = tl.load(p_q, mask=m_r[:, None] & m_d[None, :], other=0.0)           # [BLOCK_R, D_PAD]
        if DOT_F32:
            b_q = b_q.to(tl.float32)
        b_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        b_l = tl.zeros([BLOCK_R], dtype=tl.float32)
        b_acc = tl.zeros([BLOCK_R, DV_PAD], dtype=tl.float32)
        for tile in range(lo, hi):
            j0 = (tile - s * N_BLK) * BLOCK_N
            if j0 <= pos_max:                                    # a tile after every query: skipped
                o_j = j0 + o_n
                m_j = (o_j < L) & (o_j <= pos_max)
                if HAS_VALID:
                    m_j = m_j & (tl.load(valid + i_b * s_mb + o_j, mask=m_j, other=0) != 0)
                p_k = k + i_b * s_kb + i_hkv * s_kh + o_j[:, None] * s_kt + o_d[None, :]
                p_v = v + i_b * s_vb + i_hkv * s_vh + o_j[:, None] * s_vt + o_dv[None, :]
                b_k = tl.load(p_k, mask=m_j[:, None] & m_d[None, :], other=0.0)   # [BLOCK_N, D_PAD]
                b_v = tl.load(p_v, mask=m_j[:, None] & m_dv[None, :], other=0.0)  # [BLOCK_N, DV_PAD]
                if DOT_F32:
                    b_k = b_k.to(tl.float32)
                    b_v = b_v.to(tl.float32)
                b_s = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * qk_scale_log2
                m_s = m_j[None, :] & (o_j[None, :] <= b_pos[:, None])           # [BLOCK_R, BLOCK_N]
                b_s = tl.where(m_s, b_s, float("-inf"))
                b_m_new = tl.maximum(b_m, tl.max(b_s, 1))
                b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)     # nothing seen yet
                b_alpha = tl.exp2(b_m - b_m_safe)
                b_p = tl.exp2(b_s - b_m_safe[:, None])
                b_l = b_l * b_alpha + tl.sum(b_p, 1)
                b_pv = tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
                b_acc = b_acc * b_alpha[:, None] + b_pv
                b_m = b_m_new
        i_split = i_p - ((s * N_BLK + 1) * N_PROG - 1) // TOTAL
        o_part = (s * MAX_SPLITS + i_split) * BLOCK_R + o_r                      # [BLOCK_R]
        tl.store(part_m + o_part, b_m)
        tl.store(part_l + o_part, b_l)
        tl.store(part_acc + o_part[:, None] * DV_PAD + o_dv[None, :], b_acc)


@triton.jit
def decode_attention_merge_kernel(
    part_m, part_l, part_acc, o,
    s_ob, s_oh, s_ot,
    N_BLK, TOTAL, N_PROG, HKV, MAX_SPLITS,
    TQ: tl.constexpr, GROUP: tl.constexpr, BLOCK_R: tl.constexpr,
    DV: tl.constexpr, DV_PAD: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    i_b = s // HKV
    i_hkv = s % HKV
    o_r = tl.arange(0, BLOCK_R)
    o_dv = tl.arange(0, DV_PAD)
    p_first = ((s * N_BLK + 1) * N_PROG - 1) // TOTAL
    p_last = ((s + 1) * N_BLK * N_PROG - 1) // TOTAL

    b_m = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_R], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_R, DV_PAD], dtype=tl.float32)
    for i_split in range(0, p_last - p_first + 1):
        o_part = (s * MAX_SPLITS + i_split) * BLOCK_R + o_r
        m_p = tl.load(part_m + o_part)
        l_p = tl.load(part_l + o_part)
        acc_p = tl.load(part_acc + o_part[:, None] * DV_PAD + o_dv[None, :])
        b_m_new = tl.maximum(b_m, m_p)
        b_m_safe = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)
        w_old = tl.exp2(b_m - b_m_safe)
        w_new = tl.exp2(m_p - b_m_safe)
        b_l = b_l * w_old + l_p * w_new
        b_acc = b_acc * w_old[:, None] + acc_p * w_new[:, None]
        b_m = b_m_new

    m_seen = b_l > 0
    b_o = tl.where(m_seen[:, None], b_acc / tl.where(m_seen, b_l, 1.0)[:, None], 0.0)
    o_g = o_r // TQ
    o_i = o_r % TQ
    p_o = o + i_b * s_ob + (i_hkv * GROUP + o_g)[:, None] * s_oh + o_i[:, None] * s_ot + o_dv[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=(o_r < GROUP * TQ)[:, None] & (o_dv < DV)[None, :])


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pad(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def default_num_programs(device: torch.device) -> int:
    """Two programs per SM on CUDA (a guess at occupancy, untuned); 4 in the interpreter."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def stream_k_splits(total: int, n_blk: int, n_prog: int) -> int:
    """The most programs that touch one segment of n_blk tiles when `total` tiles are dealt to
    n_prog programs in contiguous ranges of ⌊total/n_prog⌋ or ⌈total/n_prog⌉ tiles."""
    per = total // n_prog                                  # ≥ 1: n_prog ≤ total
    return -(-n_blk // per) + 1


def decode_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_position: Tensor,
                            key_valid: Tensor | None = None, scale: float | None = None, *,
                            block_n: int = BLOCK_N, num_programs: int | None = None,
                            out: Tensor | None = None) -> Tensor:
    """Host wrapper of `rewriter::decode_attention` (shapes checked by the op): Lean Attention's
    stream-K partials, then the merge. Returns out [B, Hq, T_q, Dv] in q.dtype.

    block_n: KV slots per tile; num_programs: the stream-K grid (default `default_num_programs`).
    cache_position values must lie in [0, L) (the op checks on the CPU path; the kernel trusts them).
    """
    if not q.is_cuda and not _interpreting():
        raise RuntimeError(f"decode_attention_triton: tensors are on {q.device}; the Triton kernels need "
                           "CUDA tensors or TRITON_INTERPRET=1 (set before triton is imported)")
    B, H, Tq, D = q.shape
    Hkv, L, Dv = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    G = H // Hkv
    if G * Tq > MAX_ROWS:
        raise ValueError(f"decode_attention_triton: {G}·{Tq} query rows per kv head exceed {MAX_ROWS}; "
                         "the op runs SDPA for such prefill chunks")
    q, k_cache, v_cache = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k_cache, v_cache))
    pos = cache_position if cache_position.dim() == 2 else cache_position[None]
    s_pb = pos.stride(0) if pos.shape[0] > 1 else 0
    if key_valid is not None:
        valid = key_valid.to(torch.uint8)
        s_mb = valid.stride(0)
    else:
        valid, s_mb = pos, 0                               # never read: HAS_VALID is False
    if out is None:
        out = torch.empty(B, H, Tq, Dv, dtype=q.dtype, device=q.device)

    n_blk = triton.cdiv(L, block_n)
    total = B * Hkv * n_blk
    n_prog = max(1, min(num_programs or default_num_programs(q.device), total))
    splits = stream_k_splits(total, n_blk, n_prog)
    block_r, dv_pad = _pad(G * Tq), _pad(Dv)
    part_m = torch.empty(B * Hkv * splits * block_r, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(B * Hkv * splits * block_r * dv_pad, dtype=torch.float32, device=q.device)
    scale = D ** -0.5 if scale is None else float(scale)
    dot_f32 = _interpreting() and q.dtype in (torch.bfloat16, torch.float16)   # see block_sparse dot_f32
    decode_attention_partial_kernel[(n_prog,)](
        q, k_cache, v_cache, pos, valid, part_m, part_l, part_acc,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), s_pb, pos.stride(1), s_mb,
        L, n_blk, total, n_prog, Hkv, splits, scale * LOG2E,
        TQ=Tq, GROUP=G, BLOCK_R=block_r, BLOCK_N=block_n, D=D, D_PAD=_pad(D), DV=Dv, DV_PAD=dv_pad,
        HAS_VALID=key_valid is not None,
        # fp32: exact fp32 products (TF32 would miss the fp32 tolerance); bf16/fp16: native dots
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", DOT_F32=dot_f32,
    )
    decode_attention_merge_kernel[(B * Hkv,)](
        part_m, part_l, part_acc, out, out.stride(0), out.stride(1), out.stride(2),
        n_blk, total, n_prog, Hkv, splits,
        TQ=Tq, GROUP=G, BLOCK_R=block_r, DV=Dv, DV_PAD=dv_pad,
    )
    return out
