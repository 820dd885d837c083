"""Block routing at decode: the KV cache plus per-block key summaries, one routed step per token.

The full-sequence op (block_routing.py) lists, for each query block, its forced blocks (own, first,
previous) and the best-scoring others within a per-head budget, then attends exactly to them. A
decode step is the last query of a sequence that ends at the new token, so its step does the same
for that one query:

    forced   the block being filled (the new token's, "own" and "last"), the first real token's
             block ("first": attention sink / BOS) and the one before the current ("previous")
    budget   resolved on the blocks seen so far, n = the blocks holding a real key up to the new
             token, as the full-sequence op resolves it on a sequence of that length: per-head
             `head_rows` (per mille, calibrated) → max(forced, round(n·rows/1000)) blocks; `topk` →
             forced + topk; `keep` → max(forced, ⌈n·(1 − √(1 − keep))⌉) (causal_row_permille)
    ranking  Quest's bound (Tang et al., arXiv:2406.10774): per block the elementwise min and max of
             its keys; query q scores block j by u_j = Σ_d max(q_d·min_jd, q_d·max_jd) ≥ max_{i∈j} q·k_i
    groups   one selection per kv head (GQA group), so its blocks are gathered once for its G query
             heads: each head's bounds, times the site's scale, are taken as the logits of a softmax
             over the blocks it may see (its estimated share of attention per block, summing to 1 per
             head, so heads of different logit scales weigh the same), and a block ranks by the sum
             of its shares over the group's heads (log-sum-exp of the log shares); head h attends
             to the first count_h blocks of its group's ranking (forced ones first), count_h its own
             budget
    attend   exact softmax over the gathered blocks' real keys (gather + SDPA, q at kv-heads width:
             the G heads of a kv head are the G rows of one SDPA head, no repeat_kv copy)

Why Quest's bound and not the prefill op's scores: the causal default ranks by exact sampled rows'
output shares, which for the one decode query is its exact attention over every key (as costly as
dense decode); `pooled` and `means` need the block's mean query, and a decode query's block has
only the queries before it. Quest's bound reads two vectors per block (2/b of the keys) and ranks
by what drives the attention mass: the largest logit a block can give the query.

Blocks count from each row's first real key (the full-sequence op's left alignment, masks.py), so
a left-padded row routes as it does alone. The cache keeps slot = position (a KV cache, written at
cache_position); block j of row b holds slots first_b + j·b … first_b + (j+1)·b − 1. The summaries
are fp32-compared in the cache dtype, +inf / −inf for a block with no real key yet.

With budgets that keep every block (keep 1, or head_rows 1000), a step is exact causal attention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .block_routing import causal_row_permille
from .masks import NEG_INF, alignment, along_tokens

POS_INF = float("inf")


def block_summaries(k: torch.Tensor, key_mask: torch.Tensor | None, block_size: int):
    """(k_min, k_max) [B, Hkv, ⌈T/b⌉, D] in k.dtype: the elementwise min and max of the real keys
    (key_mask [B, T], None = all real) of each block of b tokens counted from the row's first real
    key; a block with no real key gets +inf / −inf. Quest's per-page metadata."""
    B, H, t, D = k.shape
    if key_mask is not None:
        to, _ = alignment(key_mask)
        k, key_mask = along_tokens(k, to), along_tokens(key_mask, to)
    n_b = (t + block_size - 1) // block_size
    pad = n_b * block_size - t
    ok = torch.arange(n_b * block_size, device=k.device) < t
    ok = ok.expand(B, -1) if key_mask is None else ok & F.pad(key_mask.bool(), (0, pad))
    hide = ~ok.view(B, 1, n_b, block_size, 1)
    kb = F.pad(k, (0, 0, 0, pad)).view(B, H, n_b, block_size, D)
    return kb.masked_fill(hide, POS_INF).amin(3), kb.masked_fill(hide, NEG_INF).amax(3)


def block_routing_prefill_state(k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, *,
                                block_size: int):
    """The decode state after a prompt: (k, v, k_min, k_max), the prompt's keys and values as a KV
    cache (slot = position; the lowering pads them to the cache length) and their block summaries
    (`block_summaries`). No host sync: traces with a dynamic prompt length."""
    k_min, k_max = block_summaries(k, key_mask, block_size)
    return k, v, k_min, k_max


def quest_bound(q: torch.Tensor, k_min: torch.Tensor, k_max: torch.Tensor) -> torch.Tensor:
    """Quest's upper bound of q·k over each block, fp32 [B, H, nb]: Σ_d max(q_d·min_d, q_d·max_d),
    q [B, H, D] against the summaries [B, Hkv, nb, D] of its kv head (head h reads kv head h // G).
    Meaningless (±inf, or NaN where q_d = 0) for a block with no key yet; callers mask those."""
    B, H, D = q.shape
    h_kv, n_b = k_min.shape[1], k_min.shape[2]
    qg = q.float().reshape(B, h_kv, H // h_kv, 1, D)
    lo, hi = k_min.float().unsqueeze(2), k_max.float().unsqueeze(2)           # [B, Hkv, 1, nb, D]
    return torch.maximum(qg * lo, qg * hi).sum(-1).view(B, H, n_b)


def first_slots(key_valid: torch.Tensor) -> torch.Tensor:
    """int64 [B]: each row's first real slot (L when it has none)."""
    L = key_valid.shape[1]
    return torch.where(key_valid, torch.arange(L, device=key_valid.device), L).amin(-1)


def decode_width(n_b: int, *, topk: int | None, keep_permille: int | None, n_sinks: int,
                 max_row_permille: int | None = None) -> int:
    """Blocks a step gathers per kv head, from the summaries' block count n_b (the cache's, a
    static shape): the most any row's budget can list, as the full-sequence op sizes its table
    (`select_blocks`). Fixed per cache, so the step has no host sync and one shape for compile."""
    if max_row_permille is not None:
        w = max((n_b * max_row_permille + 500) // 1000, 1 + n_sinks)
    elif topk is not None:
        w = topk + 1 + n_sinks
    else:
        w = max((n_b * causal_row_permille(keep_permille) + 999) // 1000, 1, 1 + n_sinks)
    return max(1, min(n_b, w))


def decode_selection(q: torch.Tensor, k_min: torch.Tensor, k_max: torch.Tensor, key_valid: torch.Tensor,
                     position: torch.Tensor, head_rows: torch.Tensor | None = None, *, block_size: int,
                     topk: int | None, keep_permille: int | None, sinks: tuple[str, ...], scale: float,
                     max_row_permille: int | None = None, first: torch.Tensor | None = None):
    """The blocks one decode step attends to. q [B, H, D] the new token's queries at slot
    `position` (int64 [1]), k_min / k_max [B, Hkv, nb, D] the summaries with the new token already
    in, key_valid [B, L] the real slots (the new one included where it is real). Returns
    (blocks int64 [B, Hkv, W], −1 where unused: each kv head's ranking, forced blocks first, W =
    `decode_width`; count int64 [B, H]: head h attends to blocks[b, h // G, :count[b, h]]).
    `first`: the rows' `first_slots`, if the caller has them. Module docstring."""
    B, H, _ = q.shape
    h_kv, n_b = k_min.shape[1], k_min.shape[2]
    dev = q.device
    position = position.reshape(1)
    first = first_slots(key_valid) if first is None else first                   # [B]
    cur = torch.div(position - first, block_size, rounding_mode="floor")          # [B]; < 0: nothing real yet
    blocks = torch.arange(n_b, device=dev)
    has_key = k_min[:, 0, :, 0] <= k_max[:, 0, :, 0]                  # [B, nb]; no key yet: +inf > −inf
    allowed = has_key & (blocks <= cur[:, None])
    forced = blocks == cur[:, None]
    if "first" in sinks:
        forced = forced | (blocks == 0)
    if "previous" in sinks:
        forced = forced | (blocks == cur[:, None] - 1)
    if "last" in sinks:                          # the block of the last real key up to the new token
        L = key_valid.shape[1]
        upto = key_valid & (torch.arange(L, device=dev) <= position)
        last = torch.where(upto, torch.arange(L, device=dev), -1).amax(-1)
        forced = forced | (blocks == torch.div(last - first, block_size, rounding_mode="floor")[:, None])
    forced = forced & allowed
    n_real = allowed.sum(-1, keepdim=True)                                        # [B, 1]
    n_forced = forced.sum(-1, keepdim=True)
    if head_rows is not None:
        per = ((n_real * head_rows.long().view(1, H) + 500) // 1000).clamp(min=1)  # [B, H]
        count = torch.maximum(n_forced, per)
    elif topk is not None:
        count = (n_forced + topk).expand(B, H)
    else:
        per_row = causal_row_permille(keep_permille)
        count = torch.maximum(n_forced, ((n_real * per_row + 999) // 1000).clamp(min=1)).expand(B, H)
    count = torch.minimum(count, n_real)                                          # only allowed blocks
    u = (quest_bound(q, k_min, k_max) * scale).masked_fill(~allowed[:, None], NEG_INF)   # [B, H, nb]
    share = torch.log_softmax(u, dim=-1).view(B, h_kv, H // h_kv, n_b).logsumexp(2)   # NaN: nothing allowed
    score = torch.where(forced[:, None], POS_INF, share).masked_fill(~allowed[:, None], NEG_INF)
    if head_rows is not None and max_row_permille is None:
        max_row_permille = int(head_rows.max())
    width = decode_width(n_b, topk=topk, keep_permille=keep_permille, n_sinks=len(sinks),
                         max_row_permille=max_row_permille if head_rows is not None else None)
    top = score.topk(width, dim=-1)                                               # forced first
    return torch.where(top.values > NEG_INF, top.indices, -1), count


def gathered_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_valid: torch.Tensor,
                       position: torch.Tensor, blocks: torch.Tensor, count: torch.Tensor, *, block_size: int,
                       scale: float, first: torch.Tensor | None = None) -> torch.Tensor:
    """Exact attention of the new token q [B, H, 1, D] to the keys of its selected blocks
    (`decode_selection`): each kv head's blocks gathered once from the cache [B, Hkv, L, ·], its G
    query heads the G rows of one SDPA head, head h masked to its first count[b, h] blocks and to
    the real slots ≤ position. [B, H, 1, Dv] in q.dtype; a row that sees no key gets 0."""
    B, H, _, D = q.shape
    h_kv, L, d_v = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    g, W = H // h_kv, blocks.shape[-1]
    first = first_slots(key_valid) if first is None else first
    slot = (first.view(B, 1, 1, 1) + blocks.clamp(min=0).unsqueeze(-1) * block_size
            + torch.arange(block_size, device=q.device))                          # [B, Hkv, W, b]
    ok = (blocks >= 0).unsqueeze(-1) & (slot <= position.reshape(1))
    slot = slot.clamp(max=L - 1).view(B, h_kv, W * block_size)
    ok = ok.view(B, h_kv, W * block_size) & key_valid.gather(1, slot.view(B, -1)).view(B, h_kv, -1)
    rows = (slot + (torch.arange(B * h_kv, device=q.device) * L).view(B, h_kv, 1)).view(-1)   # of [B·Hkv·L, ·]
    kg = k_cache.reshape(B * h_kv * L, D).index_select(0, rows).view(B, h_kv, W * block_size, D)
    vg = v_cache.reshape(B * h_kv * L, d_v).index_select(0, rows).view(B, h_kv, W * block_size, d_v)
    rank = torch.arange(W, device=q.device).view(1, 1, 1, W, 1)
    mine = (rank < count.view(B, h_kv, g, 1, 1)).expand(B, h_kv, g, W, block_size)
    mask = mine.reshape(B, h_kv, g, W * block_size) & ok.unsqueeze(2)              # [B, Hkv, G, W·b]
    out = F.scaled_dot_product_attention(q.reshape(B, h_kv, g, D), kg, vg, attn_mask=mask, scale=scale)
    out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    return out.reshape(B, H, 1, d_v)


def _append_summary(k_min: torch.Tensor, k_max: torch.Tensor, k: torch.Tensor, key_valid: torch.Tensor,
                    first: torch.Tensor, position: torch.Tensor, block_size: int, capacity: int,
                    inplace: bool):
    """The summaries with the new token's key k [B, Hkv, 1, D] folded into its block (min / max),
    where its slot is real; first grown to ⌈capacity/b⌉ blocks (+inf / −inf) when they hold fewer."""
    B, h_kv, n_b, D = k_min.shape
    need = (capacity + block_size - 1) // block_size
    if n_b < need:                               # the first step after the prefill: room for the cache
        k_min = F.pad(k_min, (0, 0, 0, need - n_b), value=POS_INF)
        k_max = F.pad(k_max, (0, 0, 0, need - n_b), value=NEG_INF)
        inplace = True                           # fresh tensors: nobody else holds them
    cur = torch.div(position.reshape(1) - first, block_size, rounding_mode="floor")
    idx = cur.clamp(0, k_min.shape[2] - 1).view(B, 1, 1, 1).expand(B, h_kv, 1, D)
    real = key_valid.index_select(1, position.reshape(1)).view(B, 1, 1, 1)
    lo, hi = k.masked_fill(~real, POS_INF), k.masked_fill(~real, NEG_INF)
    if inplace:
        return k_min.scatter_reduce_(2, idx, lo, "amin"), k_max.scatter_reduce_(2, idx, hi, "amax")
    return k_min.scatter_reduce(2, idx, lo, "amin"), k_max.scatter_reduce(2, idx, hi, "amax")


@torch.no_grad()
def block_routing_step(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, k_min: torch.Tensor, k_max: torch.Tensor,
                       cache_position: torch.Tensor, key_valid: torch.Tensor,
                       head_rows: torch.Tensor | None = None, *, block_size: int, topk: int | None,
                       keep_permille: int | None, sinks: tuple[str, ...], scale: float,
                       max_row_permille: int | None = None, inplace: bool = False):
    """One decode step of block routing: the new token's q [B, H, 1, D], k, v [B, Hkv, 1, ·] and
    the state (k_cache, v_cache [B, Hkv, L, ·], k_min, k_max [B, Hkv, nb, D]); `key_valid` [B, L]
    the real slots, the new one (cache_position, int [1]) included. Writes k, v at cache_position
    (in place when `inplace`, else into copies), folds k into its block's summary, selects
    (`decode_selection`) and attends (`gathered_attention`). Returns (out [B, H, 1, Dv], k_cache,
    v_cache, k_min, k_max). No host sync: the gather width is `decode_width` of the cache."""
    if q.shape[2] != 1:
        raise ValueError(f"block_routing_step: one new token per step; got q {list(q.shape)}")
    position = cache_position.reshape(1)
    write = torch.Tensor.index_copy_ if inplace else torch.Tensor.index_copy
    k_cache = write(k_cache, 2, position, k)
    v_cache = write(v_cache, 2, position, v)
    first = first_slots(key_valid)
    k_min, k_max = _append_summary(k_min, k_max, k, key_valid, first, position, block_size, k_cache.shape[2],
                                   inplace)
    blocks, count = decode_selection(q[:, :, 0], k_min, k_max, key_valid, position, head_rows,
                                     block_size=block_size, topk=topk, keep_permille=keep_permille,
                                     sinks=sinks, scale=scale, max_row_permille=max_row_permille, first=first)
    out = gathered_attention(q, k_cache, v_cache, key_valid, position, blocks, count, block_size=block_size,
                             scale=scale, first=first)
    return out, k_cache, v_cache, k_min, k_max


def block_routing_decode_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                             key_valid: torch.Tensor, position: int, head_rows: torch.Tensor | None = None, *,
                             block_size: int, topk: int | None, keep_permille: int | None,
                             sinks: tuple[str, ...], scale: float, max_row_permille: int | None = None):
    """fp32 ground truth of one step from the cache alone (the new token already written): the
    summaries recomputed from the cached keys of the real slots ≤ position, `decode_selection` on
    them, then dense masked softmax over every slot with the selected blocks' real slots visible
    (no gather). Returns (out [B, H, 1, Dv] fp32, blocks, count). The selection rule itself is
    checked against loops over the cached keys in tests/generation/test_block_routing_decode.py."""
    B, H, _, D = q.shape
    h_kv, L = k_cache.shape[1], k_cache.shape[2]
    seen = key_valid & (torch.arange(L) <= position)
    k_min, k_max = block_summaries(k_cache, seen, block_size)
    blocks, count = decode_selection(q[:, :, 0], k_min, k_max, seen, torch.tensor([position]), head_rows,
                                     block_size=block_size, topk=topk, keep_permille=keep_permille,
                                     sinks=sinks, scale=scale, max_row_permille=max_row_permille)
    first = first_slots(seen)
    blk = torch.div(torch.arange(L) - first[:, None], block_size, rounding_mode="floor")     # [B, L]
    g = H // h_kv
    vis = torch.zeros(B, H, L, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            chosen = [int(j) for j in blocks[b, h // g, :int(count[b, h])] if j >= 0]
            vis[b, h] = seen[b] & torch.isin(blk[b], torch.tensor(chosen, dtype=torch.long))
    kf = k_cache.float().repeat_interleave(g, 1)
    vf = v_cache.float().repeat_interleave(g, 1)
    s = (q.float() @ kf.transpose(-1, -2)) * scale                                   # [B, H, 1, L]
    p = torch.softmax(s.masked_fill(~vis[:, :, None], NEG_INF), -1).nan_to_num(0.0)
    return p @ vf, blocks, count
