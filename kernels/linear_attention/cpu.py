"""Linear attention in PyTorch, the efficient form: the CPU impl of the ops, and what their
backward ops differentiate (torch.func.vjp through these functions).

    non-causal   two GEMMs: S = φKᵀV, z = Σ φK, then φQ S / (φQ z + eps)
    causal       chunks of CHUNK tokens: tril(φQ φKᵀ) V within a chunk, φQ·S across chunks with S
                 the exclusive prefix sum of the per-chunk φKᵀV
    hybrid       LoLCATs: banded exact softmax over the last `window` keys + the chunked linear
                 terms of the keys before it, one normalizer (reference.py states the math)
    step         S += φk vᵀ, z += φk, o = φq S / (φq z + eps)
    hybrid step  LoLCATs decode: fold the token leaving the W-slot ring buffer into (S, z), write
                 the new token into its slot, softmax over the W slots beside φq·S
    prefill      `linear_attention_prefill_state`, `hybrid_window_prefill_state`: the step state
                 after a prefill, so that prefill + steps reproduces the full-sequence ops

GQA without repeated K/V or state: a kv head's G query heads are stacked as rows of one GEMM.
Accumulation is fp32 for half types (float64 stays float64 for gradcheck); outputs take v's
dtype, the step's new state the state's dtype.
"""
from __future__ import annotations

import torch
from torch import Tensor

CHUNK = 64   # CPU chunk length: balances the intra-chunk C² term against the F·D state term
             # (F = D = 64 makes both ~equal); chosen by reasoning, not a sweep


def _acc(x: Tensor) -> Tensor:
    """Accumulation dtype: fp32 for half types, else unchanged (float64 stays float64 for gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _padding(key_mask: Tensor | None) -> Tensor | None:
    """key_mask, or None when every key is real (a batch without padding): one O(B·T) read that
    spares the masked copies of k, v and φk and the window's validity masks."""
    if key_mask is None or torch.compiler.is_compiling() or not bool(key_mask.all()):
        return key_mask
    return None


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


def _pad_tail(x: Tensor, pad: int) -> Tensor:
    """x [..., T, X] with `pad` zero rows appended along T; x itself when pad = 0 (F.pad copies)."""
    return x if pad == 0 else torch.nn.functional.pad(x, (0, 0, 0, pad))


def _exclusive_prefix(x: Tensor) -> Tensor:
    """Σ_{c' < c} x[:, :, c'] along dim 2 (the chunks), as a running sum: torch.cumsum along a
    non-innermost dim was ~10× slower on the CPU (SmolLM2's [1, 9, 64, 128, 64] states at 4096
    tokens: 90 ms against ~8 ms). Differentiable (out-of-place steps)."""
    acc = [torch.zeros_like(x[:, :, 0])]
    for c in range(1, x.shape[2]):
        acc.append(acc[-1] + x[:, :, c - 1])
    return torch.stack(acc, dim=2)


def _add_inter_chunk(q: Tensor, k: Tensor, v: Tensor, num: Tensor, den: Tensor) -> None:
    """num[c] += φQ_c S_c, den[c] += φQ_c z_c in place, S_c = Σ_{c' < c} φK_{c'}ᵀ V_{c'} carried as
    one running [F, D] state per head (the RNN view of Katharopoulos et al., §3.4, a chunk at a
    time; the chunked form of flash-linear-attention): no [n, F, D] tensor of per-chunk states and
    no prefix pass over it, the state stays in cache. q [B, Hkv, n, G·C, F], k [B, Hkv, n, C, F],
    v [B, Hkv, n, C, D], num [B, Hkv, n, G·C, D], den [B, Hkv, n, G·C, 1]. No-grad path only."""
    B, Hkv, n, GC, F = q.shape
    C, D = k.shape[3], v.shape[-1]
    q, k, v = (x.reshape(B * Hkv, n, x.shape[3], x.shape[4]) for x in (q, k, v))
    num, den = num.view(B * Hkv, n, GC, D), den.view(B * Hkv, n, GC, 1)
    S = q.new_zeros(B * Hkv, F, D)
    z = q.new_zeros(B * Hkv, F, 1)
    for c in range(1, n):
        kc = k[:, c - 1].transpose(-1, -2)                              # [BH, F, C]
        S.baddbmm_(kc, v[:, c - 1])
        z.add_(kc.sum(-1, keepdim=True))
        num[:, c].baddbmm_(q[:, c], S)
        den[:, c].baddbmm_(q[:, c], z)


def _inplace_ok(*xs: Tensor) -> bool:
    """Whether temporaries may be overwritten: no autograd graph is being recorded through them."""
    return not (torch.is_grad_enabled() and any(x.requires_grad for x in xs))


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
    fq = _pad_tail(fq, pad)
    q = _fold_groups(fq, n, C)                                          # [B, Hkv, n, G·C, F]
    k = _pad_tail(fk, pad).reshape(B, Hkv, n, C, F)
    vv = _pad_tail(v, pad).reshape(B, Hkv, n, C, D)
    r = torch.arange(G * C, device=fq.device)[:, None] % C              # query offset in chunk
    tril = r >= torch.arange(C, device=fq.device)[None, :]              # [G·C, C]
    A = (q @ k.transpose(-1, -2)).masked_fill_(~tril, 0.0)             # [B, Hkv, n, G·C, C]
    num = A @ vv                                                        # [B, Hkv, n, G·C, D]
    den = A.sum(-1, keepdim=True)                                       # [B, Hkv, n, G·C, 1]
    if n > 1 and _inplace_ok(fq, fk, v):
        _add_inter_chunk(q, k, vv, num, den)
    elif n > 1:
        kv = k.transpose(-1, -2) @ vv                                   # [B, Hkv, n, F, D]
        S = _exclusive_prefix(kv)                                       # Σ over chunks < c
        z = _exclusive_prefix(k.sum(-2, keepdim=True))                  # [B, Hkv, n, 1, F]
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
    fk, v = _mask_keys(fk, v, _padding(key_mask))
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
    q = _fold_groups(_pad_tail(q, pad), n, C)                          # [B, Hkv, n, G·C, Dk]
    real = torch.nn.functional.pad(real, (0, pad), value=False).reshape(B, 1, n, 1, C)
    k = _pad_tail(k, pad).reshape(B, Hkv, n, C, Dk)
    v = _pad_tail(v, pad).reshape(B, Hkv, n, C, -1)
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
    p = s.sub_(m).exp_() if _inplace_ok(q, k) else torch.exp(s - m)     # in place: one [.., G·C, 2C] less
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
    key_mask = _padding(key_mask)
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



def hybrid_window_step_torch(q_t: Tensor, k_t: Tensor, v_t: Tensor, fq_t: Tensor, fk_t: Tensor,
                             state_S: Tensor, state_z: Tensor, k_win: Tensor, v_win: Tensor, fk_win: Tensor,
                             win_valid: Tensor, position: Tensor, scale: float, mix: Tensor,
                             token_valid: Tensor | None = None, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """PyTorch form of `rewriter::hybrid_window_step` (reference.py states the math): fold the
    leaving token, write the new one into slot position mod W, then one W-key softmax beside
    φq·S. Grouped (no repeated K/V or state); the ring slot is a tensor index, so the step traces
    without a host sync. Returns (o_t, S, z, k_win, v_win, fk_win, win_valid), new tensors."""
    B, H, _, Dk = q_t.shape
    Hkv, W, D = k_win.shape[1], k_win.shape[2], v_win.shape[3]
    G, F = H // Hkv, fq_t.shape[3]
    slot = position.reshape(1).long() % W                               # [1]
    leave = win_valid.index_select(1, slot)[:, :, None]                 # [B, 1, 1]
    fk_leave = _acc(fk_win.index_select(2, slot))[:, :, 0].masked_fill(~leave, 0.0)   # [B, Hkv, F]
    v_leave = _acc(v_win.index_select(2, slot))[:, :, 0].masked_fill(~leave, 0.0)     # [B, Hkv, D]
    S = _acc(state_S) + fk_leave[..., :, None] * v_leave[..., None, :]  # [B, Hkv, F, D]
    z = _acc(state_z) + fk_leave                                        # [B, Hkv, F]

    real = torch.ones(B, dtype=torch.bool, device=q_t.device) if token_valid is None else token_valid
    padding = ~real[:, None, None, None]
    put = lambda buf, new: buf.index_copy(2, slot, new.to(buf.dtype).masked_fill(padding, 0.0))   # noqa: E731
    k_win, v_win, fk_win = put(k_win, k_t), put(v_win, v_t), put(fk_win, fk_t)
    win_valid = win_valid.index_copy(1, slot, real[:, None])

    q = _acc(q_t).reshape(B, Hkv, G, Dk)
    s = (q @ _acc(k_win).transpose(-1, -2)).mul_(scale)                 # [B, Hkv, G, W]
    s = s.masked_fill_(~win_valid[:, None, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))          # empty window: m = 0
    p = torch.exp(s - m)
    num = p @ _acc(v_win).masked_fill(~win_valid[:, None, :, None], 0.0)   # [B, Hkv, G, D]
    den = p.sum(-1)                                                     # [B, Hkv, G]
    fq = _acc(fq_t).reshape(B, Hkv, G, F)
    w = mix.to(num.dtype).reshape(1, Hkv, G)
    num = num + w[..., None] * (fq @ S)
    den = den + w * (fq @ z[..., None])[..., 0] + eps
    o = (num / den[..., None]).reshape(B, H, 1, D)
    return (o.to(v_t.dtype), S.to(state_S.dtype), z.to(state_z.dtype), k_win, v_win, fk_win, win_valid)


def linear_attention_prefill_state(fk: Tensor, v: Tensor,
                                   key_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The state (S [B, Hkv, F, D], z [B, Hkv, F]) that `linear_attention_step` carries after the
    tokens fk, v [B, Hkv, T0, ·]: S = Σ_j φK_j V_jᵀ, z = Σ_j φK_j over the real (key_mask) tokens.
    fp32 (float64 stays float64)."""
    state = lambda x: x if x.dtype == torch.float64 else x.float()      # noqa: E731
    fk, v = _mask_keys(state(fk), state(v), key_mask)
    return fk.transpose(-1, -2) @ v, fk.sum(2)


def hybrid_window_prefill_state(k: Tensor, v: Tensor, fk: Tensor, window: int,
                                key_mask: Tensor | None = None) -> tuple[Tensor, ...]:
    """The state `hybrid_window_step` carries after the T0 tokens k, v, fk [B, Hkv, T0, ·] of a
    prefill (T0 ≥ 0), as `hybrid_window_attention(..., window)` saw them:

        S, z        Σ over the real tokens j < T0 − window (fp32; float64 stays float64)
        k_win, v_win, fk_win  [B, Hkv, window, ·]: token j of the last `window` in ring slot j mod window
        win_valid   bool [B, window]: the slot holds a real token (False: padding, or T0 < window)

    Written without host syncs or branches on T0, so it traces with a dynamic prefill length."""
    B, Hkv, T0, _ = k.shape
    W = int(window)
    real = torch.ones(B, T0, dtype=torch.bool, device=k.device) if key_mask is None else key_mask
    lin = real & (torch.arange(T0, device=k.device) < T0 - W)[None, :]  # [B, T0]
    S, z = linear_attention_prefill_state(fk, v, lin)
    idx = torch.remainder(torch.arange(W, device=k.device) - T0, W)     # slot w ← the ((w − T0) mod W)-th
                                                                        # of the last W tokens
    last = lambda x: torch.nn.functional.pad(x, (0, 0, W, 0)).narrow(2, T0, W).index_select(2, idx)
    win_valid = torch.nn.functional.pad(real, (W, 0), value=False).narrow(1, T0, W).index_select(1, idx)
    hide = ~win_valid[:, None, :, None]
    return (S, z, last(k).masked_fill(hide, 0.0), last(v).masked_fill(hide, 0.0),
            last(fk).masked_fill(hide, 0.0), win_valid)
