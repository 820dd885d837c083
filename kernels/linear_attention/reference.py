"""Linear attention, written the way the papers write it: the fp32 ground truth.

Katharopoulos et al., "Transformers are RNNs: Fast Autoregressive Transformers with Linear
Attention", ICML 2020, arXiv:2006.16236, eqs. (4)-(6) and (9)-(12):

    O_i = φ(Q_i)ᵀ S_i / (φ(Q_i)ᵀ z_i + eps),   S_i = Σ_j φ(K_j) V_jᵀ,   z_i = Σ_j φ(K_j)

with the sums over all keys (non-causal) or over j ≤ i (causal). Expanding S_i, the numerator is
Σ_j (φ(Q_i)·φ(K_j)) V_j: a row of "attention weights" A_ij = φ(Q_i)·φ(K_j) normalized by its
own sum. The references below compute that expanded form, which is O(T²) but shares no code
and no summation order with the chunked fast paths, so it is an independent check of them.

The hybrid is LoLCATs' sliding window + linear attention (Zhang et al., "LoLCATs: On Low-Rank
Linearizing of Large Language Models", arXiv:2410.10254, §3.2 eq. 6):

    O_i = (Σ_{j∈W(i)} e^{s_ij − m_i} V_j + mix_h Σ_{j∈L(i)} φ(Q_i)·φ(K_j) V_j)
          / (Σ_{j∈W(i)} e^{s_ij − m_i}     + mix_h Σ_{j∈L(i)} φ(Q_i)·φ(K_j) + eps)

    s_ij = scale · Q_i·K_j,  W(i) = {j : i − window < j ≤ i},  L(i) = {j : j ≤ i − window},
    m_i  = max_{j∈W(i)} s_ij   (the max over the WINDOW scores only).

The max m_i is not a mere stabilizer here: the linear terms are not divided by e^{m_i}, so the
effective weight of the linear part relative to the softmax part is mix_h·e^{m_i}. LoLCATs'
code does exactly this (`a_sm_max` over the window-masked scores, `a_ln` added unscaled) and
its feature maps are trained against it; we follow it so that attention transfer calibrates φ
and mix for the same function the kernels compute. LoLCATs weights the two parts by
(window_factor, linear_factor); dividing numerator and denominator by window_factor shows this
is our form with mix = linear_factor / window_factor. A query whose window holds no real key
(all padded) takes m_i = 0 and gets no softmax terms.

Padded keys (key_mask False) contribute nothing to any sum. A query row with nothing to
attend to outputs 0 (its numerator is 0; eps keeps the division finite).

Shapes: fq/q [B, H, T, F]/[B, H, T, Dk]; fk/k [B, Hkv, T, F]/[B, Hkv, T, Dk]; v [B, Hkv, Tk, D];
H a multiple of Hkv, query head h reading key/value head h // (H // Hkv) (SDPA's enable_gqa).
"""
from __future__ import annotations

import torch
from torch import Tensor


def repeat_kv(x: Tensor, heads: int) -> Tensor:
    """[B, Hkv, T, X] -> [B, H, T, X], query head h reads kv head h // (H // Hkv)."""
    return x.repeat_interleave(heads // x.shape[1], dim=1)


def linear_attention_weights(fq: Tensor, fk: Tensor, key_mask: Tensor | None = None,
                             causal: bool = False, eps: float = 1e-6) -> Tensor:
    """The rows of weights Â_ij = A_ij / (Σ_j A_ij + eps), A_ij = φ(Q_i)·φ(K_j) over the allowed j:
    [B, H, Tq, Tk] fp32 (GQA keys repeated)."""
    H, Tq, Tk = fq.shape[1], fq.shape[2], fk.shape[2]
    fq, fk = fq.float(), repeat_kv(fk.float(), H)
    A = fq @ fk.transpose(-1, -2)                                       # [B, H, Tq, Tk]
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=fq.device)
    if causal:
        allowed = allowed.tril()                                        # j ≤ i
    allowed = allowed[None, None]
    if key_mask is not None:
        allowed = allowed & key_mask[:, None, None, :].bool()           # [B, 1, Tq, Tk]
    A = A.masked_fill(~allowed, 0.0)
    return A / (A.sum(-1, keepdim=True) + eps)


def linear_attention(fq: Tensor, fk: Tensor, v: Tensor, key_mask: Tensor | None = None,
                     causal: bool = False, eps: float = 1e-6) -> Tensor:
    """O_i = Σ_j Â_ij V_j (`linear_attention_weights`). fp32 out."""
    return linear_attention_weights(fq, fk, key_mask, causal, eps) @ repeat_kv(v.float(), fq.shape[1])


def hybrid_window_weights(q: Tensor, k: Tensor, fq: Tensor, fk: Tensor, window: int, scale: float,
                          mix: Tensor, key_mask: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """The LoLCATs hybrid's rows of weights (module docstring): [B, H, T, T] fp32, each row
    e^{s_ij − m_i} over W(i) and mix_h·φ(Q_i)·φ(K_j) over L(i), divided by its sum + eps."""
    H, T = q.shape[1], q.shape[2]
    q, k = q.float(), repeat_kv(k.float(), H)
    fq, fk = fq.float(), repeat_kv(fk.float(), H)
    i = torch.arange(T, device=q.device)[:, None]
    j = torch.arange(T, device=q.device)[None, :]
    in_window = (j <= i) & (j > i - window)                             # [T, T]  W(i)
    in_linear = j <= i - window                                         # [T, T]  L(i)
    real = torch.ones(q.shape[0], 1, 1, T, dtype=torch.bool, device=q.device)
    if key_mask is not None:
        real = key_mask[:, None, None, :].bool()                        # [B, 1, 1, T]
    in_window, in_linear = in_window & real, in_linear & real           # [B, 1, T, T]

    s = scale * (q @ k.transpose(-1, -2))                               # [B, H, T, T]
    s = s.masked_fill(~in_window, float("-inf"))
    m = s.amax(-1, keepdim=True)                                        # max over the window only
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))          # empty window: m = 0
    a_win = torch.exp(s - m)                                            # 0 outside the window

    a_lin = (fq @ fk.transpose(-1, -2)).masked_fill(~in_linear, 0.0)    # [B, H, T, T]
    a_lin = mix.float()[None, :, None, None] * a_lin

    a = a_win + a_lin
    return a / (a.sum(-1, keepdim=True) + eps)


def hybrid_window_attention(q: Tensor, k: Tensor, v: Tensor, fq: Tensor, fk: Tensor, window: int,
                            scale: float, mix: Tensor, key_mask: Tensor | None = None,
                            eps: float = 1e-6) -> Tensor:
    """LoLCATs causal hybrid: exact softmax over the last `window` keys, mix_h·linear terms before."""
    a = hybrid_window_weights(q, k, fq, fk, window, scale, mix, key_mask, eps)
    return a @ repeat_kv(v.float(), q.shape[1])                         # [B, H, T, D]


def linear_attention_step(fq_t: Tensor, fk_t: Tensor, v_t: Tensor, state_S: Tensor,
                          state_z: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """One causal decoding step (Katharopoulos et al. 2020, eqs. 18-20, the RNN view).

    S_t = S_{t−1} + φ(K_t) V_tᵀ,  z_t = z_{t−1} + φ(K_t),  o_t = φ(Q_t)ᵀ S_t / (φ(Q_t)ᵀ z_t + eps).
    fq_t [B, H, 1, F], fk_t [B, Hkv, 1, F], v_t [B, Hkv, 1, D], S [B, Hkv, F, D], z [B, Hkv, F].
    """
    H = fq_t.shape[1]
    S_new = state_S.float() + fk_t.float()[:, :, 0, :, None] * v_t.float()[:, :, 0, None, :]
    z_new = state_z.float() + fk_t.float()[:, :, 0, :]
    S, z = repeat_kv(S_new, H), repeat_kv(z_new[..., None], H)[..., 0]  # [B, H, F, D], [B, H, F]
    phi_q = fq_t.float()[:, :, 0, :]                                    # [B, H, F]
    num = torch.einsum("bhf,bhfd->bhd", phi_q, S)
    den = torch.einsum("bhf,bhf->bh", phi_q, z)[..., None]
    return (num / (den + eps))[:, :, None, :], S_new, z_new


def hybrid_window_step(q_t: Tensor, k_t: Tensor, v_t: Tensor, fq_t: Tensor, fk_t: Tensor,
                       state_S: Tensor, state_z: Tensor, k_win: Tensor, v_win: Tensor, fk_win: Tensor,
                       win_valid: Tensor, position: Tensor, scale: float, mix: Tensor,
                       token_valid: Tensor | None = None, eps: float = 1e-6) -> tuple[Tensor, ...]:
    """One decoding step of the LoLCATs hybrid (arXiv:2410.10254), the recurrent form of
    `hybrid_window_attention` at query index t = position.

    State after the tokens 0..t−1 (window W = k_win.shape[2]): S = Σ_{j ≤ t−1−W} φ(K_j) V_jᵀ,
    z = Σ_{j ≤ t−1−W} φ(K_j) over real j, and a ring buffer whose slot j mod W holds K_j, V_j, φ(K_j)
    of the last W tokens (win_valid False for padded or never-filled slots). The step

      1. folds the token leaving the window, t − W (slot t mod W, if valid), into S and z,
      2. writes token t into slot t mod W (win_valid = token_valid),
      3. returns o_t = (Σ_slots e^{s−m} V + mix_h φ(Q_t)ᵀ S) / (Σ e^{s−m} + mix_h φ(Q_t)ᵀ z + eps),
         s = scale·Q_t·K over the valid slots, m their max (0 if none): the module docstring's O_t.

    Returns (o_t fp32 [B, H, 1, D], S, z (fp32), k_win, v_win, fk_win, win_valid) — the new state.
    """
    B, H = q_t.shape[:2]
    W = k_win.shape[2]
    slot = int(position.reshape(-1)[0]) % W
    real = torch.ones(B, dtype=torch.bool, device=q_t.device) if token_valid is None else token_valid.bool()
    leave = win_valid[:, slot].bool()[:, None, None]                     # [B, 1, 1]
    fk_leave = torch.where(leave, fk_win[:, :, slot].float(), 0.0)       # [B, Hkv, F]
    v_leave = torch.where(leave, v_win[:, :, slot].float(), 0.0)         # [B, Hkv, D]
    S = state_S.float() + fk_leave[..., :, None] * v_leave[..., None, :]
    z = state_z.float() + fk_leave

    k_win, v_win, fk_win, win_valid = k_win.clone(), v_win.clone(), fk_win.clone(), win_valid.clone()
    for buf, new in ((k_win, k_t), (v_win, v_t), (fk_win, fk_t)):
        buf[:, :, slot] = torch.where(real[:, None, None], new[:, :, 0].to(buf.dtype), 0.0)
    win_valid[:, slot] = real

    valid = win_valid[:, None, None, :]                                  # [B, 1, 1, W]
    s = scale * (q_t.float() @ repeat_kv(k_win.float(), H).transpose(-1, -2))   # [B, H, 1, W]
    s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a_win = torch.exp(s - m)                                             # 0 at invalid slots
    vv = repeat_kv(v_win.float(), H).masked_fill(~win_valid[:, None, :, None], 0.0)
    fq = fq_t.float()
    mixh = mix.float()[None, :, None, None]
    num = a_win @ vv + mixh * (fq @ repeat_kv(S, H))                     # [B, H, 1, D]
    den = a_win.sum(-1, keepdim=True) + mixh * (fq @ repeat_kv(z[..., None], H)) + eps
    return num / den, S, z, k_win, v_win, fk_win, win_valid
