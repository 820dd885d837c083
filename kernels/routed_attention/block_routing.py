"""BiFormer bi-level routing at run time (Zhu et al., CVPR 2023, arXiv:2303.08125): score the key
blocks for each query block, keep the forced blocks (own, sinks) and the best-scoring others
within a budget, and attend exactly to the listed blocks with `rewriter::block_sparse_attention`.

Scores: "means" (BiFormer's region affinity of block-mean q and k), "pooled" (attention mass under
the block's mean query: FlexPrefill arXiv:2502.20766, MInference arXiv:2407.02490), "sampled"
(value-aware output shares of exact sampled query rows: XAttention arXiv:2503.16428, Guo et al.
arXiv:2406.12335). Budgets: a top-k, a fraction of the blocks resolved at run time from each
sample's real length, or calibrated per-head row counts (also per sample).

Padding never changes a real row's output: samples are routed left-aligned (masks.py), fractions
are resolved on the sample's real blocks, and sampled rows never read a padded query.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .masks import NEG_INF, alignment, along_tokens


def _slot_ok(t: int, block_size: int, key_mask: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """bool [B, n_blocks, block_size]: the slot holds a real token (padding and the ragged tail excluded)."""
    n_blocks = (t + block_size - 1) // block_size
    ok = torch.arange(n_blocks * block_size, device=device) < t
    if key_mask is None:
        ok = ok.expand(batch, -1)
    else:
        ok = ok & F.pad(key_mask.bool(), (0, n_blocks * block_size - t))
    return ok.view(batch, n_blocks, block_size)


def block_means(x: torch.Tensor, block_size: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of x [B, H, T, D] over the valid tokens of each block of `block_size` tokens
    (padding from key_mask [B, T] and the ragged tail excluded) -> [B, H, ceil(T/bs), D] in
    x.dtype; a block with no valid token gets zeros. BiFormer's region-level queries/keys."""
    B, H, t, D = x.shape
    ok = _slot_ok(t, block_size, key_mask, B, x.device)                           # [B, nb, bs]
    counts, n_blocks = ok.sum(-1).float(), ok.shape[1]                            # [B, nb]
    xp = F.pad(x.float(), (0, 0, 0, n_blocks * block_size - t))
    xp = xp.view(B, H, n_blocks, block_size, D) * ok[:, None, :, :, None]
    return (xp.sum(3) / counts.clamp(min=1)[:, None, :, None]).to(x.dtype)


def _valid_blocks(t: int, block_size: int, key_mask: torch.Tensor | None, batch: int, device) -> torch.Tensor:
    """bool [B, n_blocks]: the block holds at least one real key (ragged tail excluded)."""
    return _slot_ok(t, block_size, key_mask, batch, device).any(-1)


def _pooled_mass(q_r: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, *, block_size: int,
                 causal: bool, scale: float) -> torch.Tensor:
    """Estimated attention mass of each key block for each query block, fp32 [B, H, nb, nb]:
    the block's mean query attends (softmax, the site's scale) to EVERY key it may see, and the
    probabilities are summed per key block (the pooled-query estimate of training-free sparse
    prefill attention: FlexPrefill arXiv:2502.20766, MInference arXiv:2407.02490). It sees a
    block holding one strongly attended key, which the block-mean key of `means` averages away.
    Causal: query block i sees keys before the end of block i. Cost nb·T·d per head."""
    B, H, nb, D = q_r.shape
    t, h_kv = k.shape[2], k.shape[1]
    pad = nb * block_size - t
    s = (q_r.reshape(B, h_kv, (H // h_kv) * nb, D) @ k.float().transpose(-1, -2)) * scale      # [B, Hkv, G·nb, T]
    s = s.view(B, H, nb, t)
    pos = torch.arange(t, device=q_r.device)
    vis = torch.ones(B, 1, 1, t, dtype=torch.bool, device=q_r.device) if key_mask is None \
        else key_mask.bool().view(B, 1, 1, t)
    if causal:
        end = (torch.arange(nb, device=q_r.device) + 1) * block_size
        vis = vis & (pos.view(1, 1, 1, t) < end.view(1, 1, nb, 1))
    p = torch.softmax(s.masked_fill(~vis, NEG_INF), dim=-1).nan_to_num(0.0)                # no visible key: 0
    return F.pad(p, (0, pad)).view(B, H, nb, nb, block_size).sum(-1)


def sample_positions(t: int, block_size: int, samples: int, device) -> torch.Tensor:
    """Query positions sampled in each block, int64 [n_blocks · samples]: the last query of each
    of the block's `samples` equal parts (the block's last query among them), clamped to t − 1."""
    n_b = (t + block_size - 1) // block_size
    step = max(1, block_size // samples)
    offs = torch.arange(1, samples + 1, device=device) * step - 1                 # [S]
    pos = torch.arange(n_b, device=device).view(-1, 1) * block_size + offs.clamp(max=block_size - 1)
    return pos.reshape(-1).clamp(max=t - 1)


def pick_sample_rows(q: torch.Tensor, key_mask: torch.Tensor | None, *, block_size: int, samples: int,
                     how: str = "mixed") -> torch.Tensor:
    """Query positions each block samples, per head, int64 [B, H, n_blocks · samples] (block-major).

    "strided": `sample_positions`, the same rows for every head. "largest_q": the block's
    `samples` real queries of largest ‖q‖ in that head. "mixed": ⌈samples/2⌉ strided rows plus the
    ⌊samples/2⌋ other real queries of largest ‖q‖. The logit scale of a query grows with ‖q‖, so
    the large-norm rows are the sharp ones, where a block left out costs most; the strided rows
    keep the block's whole span in view. With samples ≥ block_size every row is sampled. A pick
    beyond the sequence or on padding becomes the sample's last real query, as a pick beyond the
    end does in the sample alone: padding never adds a sampled row."""
    B, H, t, _ = q.shape
    n_b = (t + block_size - 1) // block_size
    if how not in ("strided", "largest_q", "mixed"):
        raise ValueError(f"pick_sample_rows: how must be 'strided', 'largest_q' or 'mixed', got {how!r}")
    n_norm = 0 if how == "strided" or samples >= block_size else samples // 2 if how == "mixed" else samples
    n_str = samples - n_norm
    parts = []
    if n_str:
        parts.append(sample_positions(t, block_size, n_str, q.device).view(1, 1, n_b, n_str).expand(B, H, n_b, n_str))
    if n_norm:
        pad = n_b * block_size - t
        norm = q.float().norm(dim=-1)                                                 # [B, H, T]
        if key_mask is not None:
            norm = norm.masked_fill(~key_mask.bool().view(B, 1, t), -1.0)            # padding: only if room is left
        norm = F.pad(norm, (0, pad), value=-2.0).view(B, H, n_b, block_size)
        if n_str:                                                                     # no row twice
            offs = sample_positions(block_size, block_size, n_str, q.device)
            norm = norm.index_fill(-1, offs, -3.0)
        base = torch.arange(n_b, device=q.device).view(1, 1, n_b, 1) * block_size
        parts.append((norm.topk(n_norm, dim=-1).indices + base).clamp(max=t - 1))
    pos = torch.cat(parts, dim=-1).reshape(B, H, n_b * samples)
    if key_mask is not None:
        real = key_mask.bool()
        last = torch.where(real, torch.arange(t, device=q.device), -1).amax(-1).clamp(min=0)      # [B]
        ok = real.gather(1, pos.reshape(B, -1)).view(B, H, -1)
        pos = torch.where(ok, pos, last.view(B, 1, 1))
    return pos


def _sampled_contribution(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, *,
                          block_size: int, samples: int, causal: bool, scale: float,
                          sample_rows: str = "mixed") -> torch.Tensor:
    """Value-aware key-block scores from sampled query rows, fp32 [B, H, nb, nb]
    (`_sampled_contribution_dense` states them). Eager calls stream them per key block
    (`_sampled_contribution_streamed`); a traced call (torch.export / compile / fx, symbolic sizes)
    records the one-shot form, whose graph has no loop over the sequence."""
    how = dict(block_size=block_size, samples=samples, causal=causal, scale=scale, sample_rows=sample_rows)
    if _eager(q, k, v, key_mask):
        return _sampled_contribution_streamed(q, k, v, key_mask, **how)
    return _sampled_contribution_dense(q, k, v, key_mask, **how)


def _eager(*xs) -> bool:
    """Plain tensors with concrete sizes, not under a tracer: a Python loop over blocks is fine."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    return all(x is None or (type(x) is torch.Tensor and not any(isinstance(d, torch.SymInt) for d in x.shape))
               for x in xs)


_KEY_CHUNK = 4          # key blocks per streamed step (fixed, so chunk edges never depend on the batch)
_ROW_TILE = 1 << 20     # score elements per (row tile × key chunk) step: a few MiB, reused from the pool


@torch.no_grad()
def _sampled_contribution_streamed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   key_mask: torch.Tensor | None, *, block_size: int, samples: int,
                                   causal: bool, scale: float, sample_rows: str = "mixed") -> torch.Tensor:
    """`_sampled_contribution_dense` without its [H, nb·S, T] score and probability tensors: the
    sampled rows meet the keys `_KEY_CHUNK` blocks at a time (a causal chunk only the query blocks
    at or after it), each step keeping, per row, its log-sum-exp so far and, per key block, the log
    of the unnormalized share ‖Σ_{i∈j} e^{s_i − m} v_i‖ + m (m the step's row max); the end
    divides by the row's total: c_j = exp(log share_j − lse). Online softmax (Milakov & Gimelshein,
    arXiv:1805.02867) applied to the block shares. Same function; memory O(rows × chunk), and
    without padding the causal blocks a row cannot see are never scored (half the dense form's work)."""
    B, H, t, D = q.shape
    h_kv, d_v = k.shape[1], v.shape[-1]
    g, bs = H // h_kv, block_size
    n_b = (t + bs - 1) // bs
    pad = n_b * bs - t
    pos = pick_sample_rows(q, key_mask, block_size=bs, samples=samples, how=sample_rows)      # [B, H, nb·S]
    S = pos.shape[-1] // n_b
    gs = g * S
    # rows grouped by query block: [B, Hkv, nb, G·S, ·] (head-major within a block), so that the rows of
    # the query blocks at or after a key chunk are one slice
    qs = q.gather(2, pos.unsqueeze(-1).expand(B, H, n_b * S, D)).float() * scale
    qs = qs.view(B, h_kv, g, n_b, S, D).transpose(2, 3).reshape(B, h_kv, n_b, gs, D)
    qpos = pos.view(B, h_kv, g, n_b, S).transpose(2, 3).reshape(B, h_kv, n_b, gs, 1)
    kb = F.pad(k.float(), (0, 0, 0, pad)).view(B, h_kv, n_b, bs, D)
    vb = F.pad(v.float(), (0, 0, 0, pad)).view(B, h_kv, n_b, bs, d_v)
    ok = torch.arange(n_b * bs, device=q.device) < t
    ok = ok.expand(B, -1) if key_mask is None else ok & F.pad(key_mask.bool(), (0, pad))
    ok = ok.view(B, 1, 1, n_b * bs)
    lse = torch.full((B, h_kv, n_b, gs), NEG_INF, device=q.device)
    share = torch.full((B, h_kv, n_b, gs, n_b), NEG_INF, device=q.device)          # log shares
    tile = max(1, _ROW_TILE // max(1, B * h_kv * gs * _KEY_CHUNK * bs))              # query blocks per tile
    # causal: a query block's sampled rows lie in it, so they see no later key chunk; with padding a pick
    # on a padded query reads the sample's last real row (pick_sample_rows), which may lie further on
    skip = causal and key_mask is None
    for j0 in range(0, n_b, _KEY_CHUNK):
        j1 = min(n_b, j0 + _KEY_CHUNK)
        nk = j1 - j0
        k_c = kb[:, :, j0:j1].reshape(B, h_kv, nk * bs, D).transpose(-1, -2)
        v_c = vb[:, :, j0:j1]                                                        # [B, Hkv, nk, bs, Dv]
        keys = torch.arange(j0 * bs, j1 * bs, device=q.device)
        for i0 in range(j0 if skip else 0, n_b, tile):
            i1 = min(n_b, i0 + tile)
            rows = (i1 - i0) * gs
            sc = qs[:, :, i0:i1].reshape(B, h_kv, rows, D) @ k_c                     # [B, Hkv, rows, nk·bs]
            vis = ok[..., j0 * bs:j1 * bs]
            if causal:
                vis = vis & (keys <= qpos[:, :, i0:i1].reshape(B, h_kv, rows, 1))
            sc.masked_fill_(~vis, NEG_INF)
            m = sc.amax(-1, keepdim=True)
            m = torch.where(m > NEG_INF, m, 0.0)                                     # nothing visible: m = 0
            p = sc.sub_(m).exp_()                                                    # in place: fresh GEMM output
            step = m[..., 0] + p.sum(-1).log()                                       # [B, Hkv, rows]
            u = p.view(B, h_kv, rows, nk, bs).transpose(2, 3) @ v_c                  # [B, Hkv, nk, rows, Dv]
            log_u = u.norm(dim=-1).log_().add_(m[..., 0].unsqueeze(2))               # [B, Hkv, nk, rows]
            share[:, :, i0:i1, :, j0:j1] = log_u.view(B, h_kv, nk, i1 - i0, gs).permute(0, 1, 3, 4, 2)
            blk = lse[:, :, i0:i1]
            blk.copy_(torch.logaddexp(blk, step.view(B, h_kv, i1 - i0, gs)))
    c = torch.exp(share - lse[..., None]).nan_to_num_(0.0)                           # a row that saw nothing: 0
    c = c.view(B, h_kv, n_b, g, S, n_b).amax(4)                                      # max over the samples
    return c.permute(0, 1, 3, 2, 4).reshape(B, H, n_b, n_b)


def _sampled_contribution_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                key_mask: torch.Tensor | None, *, block_size: int, samples: int, causal: bool,
                                scale: float, sample_rows: str = "mixed") -> torch.Tensor:
    """Value-aware key-block scores from sampled queries, fp32 [B, H, nb, nb]: `samples` queries
    of each query block (`pick_sample_rows`, chosen by `sample_rows`) attend exactly, softmax over every key
    they may see, and key block j scores max over the samples of ‖Σ_{i ∈ j} p_i v_i‖, the norm of
    the block's share of the sample's output. Sampled rows are exact, so scores compare across rows
    and heads (the mean query of `pooled` is not: under RoPE it loses the position-sensitive
    part of q); the value norm discounts mass parked on a sink whose value is near zero (value
    matters beside the attention score: Guo et al., EMNLP 2024, arXiv:2406.12335). Strided
    sampled rows as the importance proxy: XAttention, Xu et al., arXiv:2503.16428.
    Cost per head: (samples / b)·T²·(d + d_v), i.e. samples/b of dense attention.

    This is the readable one-shot form, which traced graphs (export, compile, ONNX) record; eager
    runs take `_sampled_contribution_streamed`, the same function a key block at a time."""
    B, H, t, D = q.shape
    h_kv, d_v = k.shape[1], v.shape[-1]
    g = H // h_kv
    n_b = (t + block_size - 1) // block_size
    pad = n_b * block_size - t
    pos = pick_sample_rows(q, key_mask, block_size=block_size, samples=samples, how=sample_rows)   # [B, H, nb·S]
    n_s = pos.shape[-1]
    qs = q.gather(2, pos.unsqueeze(-1).expand(B, H, n_s, D)).float().reshape(B, h_kv, g * n_s, D)
    tp = n_b * block_size                                  # keys padded to whole blocks (masked below)
    s = (qs * scale) @ F.pad(k.float(), (0, 0, 0, pad)).transpose(-1, -2)          # [B, Hkv, G·nb·S, tp]
    keys = torch.arange(tp, device=q.device).view(1, 1, 1, tp)
    vis = keys < t
    if key_mask is not None:
        vis = vis & F.pad(key_mask.bool(), (0, pad)).view(B, 1, 1, tp)
    if causal:
        vis = vis & (keys <= pos.unsqueeze(-1))
    # in place: s is a fresh GEMM output (out-of-place copies of this [nb·S, T] score were 4× slower on CPU)
    s.view(B, H, n_s, tp).masked_fill_(~vis, NEG_INF)
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)
    p = p.view(B, h_kv, g * n_s, n_b, block_size).transpose(2, 3)
    vb = F.pad(v.float(), (0, 0, 0, pad)).view(B, h_kv, n_b, block_size, d_v)
    c = (p @ vb).norm(dim=-1).transpose(2, 3)                                      # [B, Hkv, G·nb·S, nb]
    return c.reshape(B, H, n_b, n_s // n_b, n_b).amax(3)


def default_sinks(causal: bool) -> tuple[str, ...]:
    """Causal (LLM) sites: the first block (attention sink, BOS) and the previous block (local
    context); encoders: the first and the last real token's blocks (CLS, SEP)."""
    return ("first", "previous") if causal else ("first", "last")


def block_scores(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, *, block_size: int,
                 causal: bool, sinks: tuple[str, ...], route_by: str, affinity: str = "means",
                 scale: float | None = None, v: torch.Tensor | None = None, samples: int = 16,
                 sample_rows: str = "mixed"):
    """Routing scores of key blocks for each query block, with forced blocks at +inf and
    disallowed ones at −inf: (score fp32 [B, H, nb, nb], n_forced [B, 1, nb, 1]).

    `affinity="means"`: BiFormer region affinity Qʳ·Kʳᵀ of block means (padding excluded);
    `"pooled"`: the estimated attention mass of each key block under the block's mean query
    (`_pooled_mass`; `scale` defaults to 1/√d); `"sampled"`: value-aware scores of `samples`
    exact query rows per block (`_sampled_contribution`, needs `v`; `route_by` does not apply).
    Forced: the query block's own block and the sink blocks holding the first and/or the last
    real key (CLS / BOS, and SEP for right-padded BERT inputs; per sample, from key_mask), and
    with "previous" the block just before the query block (local context).
    Allowed: blocks holding a real key, and for causal sites key block ≤ query block.
    `route_by="previous"` routes query block i by the mean query of block i−1, so no token's key
    set depends on later queries (strictly causal routing; block 0 sees only itself anyway)."""
    B, H, t, _ = q.shape
    n_b = (t + block_size - 1) // block_size
    if affinity != "sampled":
        q_r = block_means(q, block_size, key_mask).float()                         # [B, H, nb, D]
        if route_by == "previous":
            q_r = torch.cat([q_r[:, :, :1], q_r[:, :, :-1]], dim=2)
    if affinity == "sampled":
        if v is None:
            raise ValueError("block_scores: affinity 'sampled' needs the values v")
        affinity = _sampled_contribution(q, k, v, key_mask, block_size=block_size, samples=samples,
                                         sample_rows=sample_rows, causal=causal,
                                         scale=q.shape[-1] ** -0.5 if scale is None else scale)
    elif affinity == "pooled":
        affinity = _pooled_mass(q_r, k, key_mask, block_size=block_size, causal=causal,
                                scale=q.shape[-1] ** -0.5 if scale is None else scale)
    elif affinity == "means":
        k_r = block_means(k, block_size, key_mask).float()
        if k.shape[1] != H:
            k_r = k_r.repeat_interleave(H // k.shape[1], dim=1)
        affinity = q_r @ k_r.transpose(-1, -2)                                     # [B, H, nb, nb]
    else:
        raise ValueError(f"block_scores: affinity must be 'means', 'pooled' or 'sampled', got {affinity!r}")

    blocks = torch.arange(n_b, device=q.device)
    qb, kb = blocks.view(1, 1, -1, 1), blocks.view(1, 1, 1, -1)
    forced = (kb == qb).expand(B, 1, n_b, n_b)
    real = torch.ones(B, t, dtype=torch.bool, device=q.device) if key_mask is None else key_mask.bool()
    pos = torch.arange(t, device=q.device)
    if "first" in sinks:
        first = torch.where(real, pos, t).amin(-1).clamp(max=t - 1) // block_size   # [B]
        forced = forced | (kb == first.view(B, 1, 1, 1))
    if "last" in sinks:
        last = torch.where(real, pos, -1).amax(-1).clamp(min=0) // block_size
        forced = forced | (kb == last.view(B, 1, 1, 1))
    if "previous" in sinks:                     # the block just before: every token keeps ≥ b tokens of local context
        forced = forced | (kb == qb - 1)
    allowed = _valid_blocks(t, block_size, key_mask, B, q.device).view(B, 1, 1, n_b)
    if causal:
        allowed = allowed & (kb <= qb)
    forced = forced & allowed
    score = torch.where(forced, float("inf"), affinity).masked_fill(~allowed, NEG_INF)
    return score, forced.sum(-1, keepdim=True)


def causal_row_permille(keep_permille: int) -> int:
    """Blocks per row (per mille of the row count n) that keep `keep_permille` of a causal
    triangle's (query, key) pairs when every query block lists the same number K of blocks:
    K²/2 + (n − K)·K ≈ keep·n²/2  ⇒  K = n·(1 − √(1 − keep))."""
    return round(1000 * (1 - (1 - keep_permille / 1000) ** 0.5))


def real_blocks(score: torch.Tensor) -> torch.Tensor:
    """int64 [B, 1, 1, 1]: each sample's real length in blocks, the key blocks some query block may
    see (`block_scores`' score > −inf). For a left-aligned sample of L real keys: ⌈L/b⌉."""
    return (score[:, :1] > NEG_INF).any(-2).sum(-1).view(-1, 1, 1, 1)


def uniform_rows(n_b, n_forced: torch.Tensor, *, topk: int | None, keep_permille: int | None, causal: bool,
                 n_sinks: int, n_real: torch.Tensor | None = None):
    """The uniform budget: (table width, blocks each query block lists [B, 1, nb, 1], before
    clipping to the allowed ones): forced + `topk`, or ⌈n·keep⌉ in all with n the sample's real
    length in blocks, `n_real` [B, 1, 1, 1] (default n_b; causal: the per-row count that keeps
    `keep` of the causal pairs, `causal_row_permille`). Resolving `keep` per sample on its real
    length, not on the padded n_b, is what keeps a sample's rows independent of its batch; the
    width is the padded length's budget, the most any sample lists."""
    if topk is not None:
        return torch.sym_min(n_b, topk + 1 + n_sinks), n_forced + topk
    per_row = causal_row_permille(keep_permille) if causal else keep_permille
    width = torch.sym_min(n_b, torch.sym_max(torch.sym_max((n_b * per_row + 999) // 1000, 1), 1 + n_sinks))
    if n_real is None:
        return width, n_forced.clamp(min=torch.sym_max((n_b * per_row + 999) // 1000, 1))
    return width, torch.maximum(n_forced, ((n_real * per_row + 999) // 1000).clamp(min=1))


def route_blocks(q: torch.Tensor, k: torch.Tensor, key_mask: torch.Tensor | None, *, block_size: int,
                 topk: int | None = None, keep_permille: int | None = None, causal: bool = False,
                 sinks: tuple[str, ...] = ("first", "last"), route_by: str = "own", affinity: str = "means",
                 scale: float | None = None, v: torch.Tensor | None = None, samples: int = 16,
                 sample_rows: str = "mixed", head_rows: torch.Tensor | None = None,
                 max_row_permille: int | None = None) -> torch.Tensor:
    """BiFormer bi-level routing table, int32 [B, H, n_blocks, width] (-1 padded, ascending):
    each query block lists its forced blocks (see `block_scores`) plus either `topk` further
    blocks of highest score, or as many as make the row hold ⌈keep·n⌉ blocks in all, n the
    sample's real length in blocks (resolved at run time per sample; keep = keep_permille/1000).
    Causal sites: `keep` is the fraction of the causal (query, key) pairs, so every row holds
    ⌈n·(1 − √(1 − keep))⌉ blocks (rows near the start hold all they may see). Only allowed blocks
    are listed. Per-head budgets: `head_rows` (int [H], per mille of the blocks, calibrated) gives
    head h's rows round(n·head_rows[h]/1000) blocks each (at least the forced ones);
    `max_row_permille` = max(head_rows), static, sizes the table. Blocks count from position 0:
    callers with left padding align first (`block_routed_attention` does)."""
    score, n_forced = block_scores(q, k, key_mask, block_size=block_size, causal=causal, sinks=sinks,
                                   route_by=route_by, affinity=affinity, scale=scale, v=v, samples=samples,
                                   sample_rows=sample_rows)
    return select_blocks(score, n_forced, topk=topk, keep_permille=keep_permille, causal=causal,
                         n_sinks=len(sinks), head_rows=head_rows, max_row_permille=max_row_permille)


def select_blocks(score: torch.Tensor, n_forced: torch.Tensor, *, topk: int | None, keep_permille: int | None,
                  causal: bool, n_sinks: int, head_rows: torch.Tensor | None = None,
                  max_row_permille: int | None = None) -> torch.Tensor:
    """The routing table from `block_scores`' output (see `route_blocks` for the budgets; fractions
    resolve on each sample's real blocks, `real_blocks`)."""
    n_b = score.shape[-1]
    n_real = real_blocks(score)                                                    # [B, 1, 1, 1]
    if head_rows is not None:
        width = torch.sym_min(n_b, torch.sym_max((n_b * max_row_permille + 500) // 1000, 1 + n_sinks))
        per_head = ((n_real * head_rows.long().view(1, -1, 1, 1) + 500) // 1000).clamp(min=1)   # [B, H, 1, 1]
        count = torch.maximum(n_forced, per_head)
    else:
        width, count = uniform_rows(n_b, n_forced, topk=topk, keep_permille=keep_permille, causal=causal,
                                    n_sinks=n_sinks, n_real=n_real)
    top = score.topk(width, dim=-1)                                                # forced ones first
    keep = (torch.arange(width, device=score.device) < count) & (top.values > NEG_INF)
    table = torch.where(keep, top.indices, n_b).sort(dim=-1).values                # ascending, unused last
    table = torch.where(table == n_b, -1, table)
    return table.to(torch.int32).contiguous()


def block_routed_attention(q, k, v, key_mask, head_rows=None, *, block_size: int, topk: int | None,
                           keep_permille: int | None, causal: bool, sinks: tuple[str, ...], route_by: str,
                           scale: float, affinity: str = "means", samples: int = 16, sample_rows: str = "mixed",
                           max_row_permille: int | None = None) -> torch.Tensor:
    """Routing table from q/k (and v for `sampled`), then exact attention over the listed blocks (the
    custom op). With a key mask, each sample is routed left-aligned (its first real token at
    position 0, masks.py) and the output rotated back, so left padding moves no block boundary."""
    back = None
    if key_mask is not None and _eager(key_mask) and bool(key_mask.all()):
        key_mask = None            # no padding in this batch: no rotation, no masks (the same function)
    if key_mask is not None:
        to, back = alignment(key_mask)
        q, k, v, key_mask = (along_tokens(x, to) for x in (q, k, v, key_mask))
    table = route_blocks(q, k, key_mask, block_size=block_size, topk=topk, keep_permille=keep_permille,
                         causal=causal, sinks=sinks, route_by=route_by, affinity=affinity, scale=scale,
                         v=v, samples=samples, sample_rows=sample_rows, head_rows=head_rows,
                         max_row_permille=max_row_permille)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()   # the op's CPU path views its inputs
    out = torch.ops.rewriter.block_sparse_attention(q, k, v, table, block_size, causal, key_mask, scale)
    return out if back is None else along_tokens(out, back)

