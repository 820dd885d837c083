"""Routed attention: each query attends, exactly, to a content-chosen subset of the keys.

block_routing — BiFormer bi-level routing (Zhu et al., "BiFormer: Vision Transformer with
Bi-Level Routing Attention", CVPR 2023, arXiv:2303.08125), training-free: cut tokens into
blocks of b, take block means of q and k, region affinity Qʳ·Kʳᵀ; each query block keeps
its top-k key blocks plus its own block plus "sink" blocks (the first real token's block —
CLS / BOS — and the last real token's block — SEP in right-padded BERT inputs), then exact
softmax attention over the gathered blocks (`rewriter::block_sparse_attention`, never
materializing the gathered K/V). Causal sites list only blocks at or before the query block.
top-k is fixed, a fraction of the blocks (`keep`, of each sample's real blocks), or chosen on
calibration data as the smallest k whose blocks hold `mass` of the exact attention probability
(the training-free cumulative-mass selection). Exact setting: top-k ≥ number of blocks, or keep = 1.

Causal (LLM) sites default to two training-free refinements, without which SmolLM2 at 2048
tokens lost +15 % perplexity at 26 % of the causal pairs (target ≤ 3 %):
- `affinity: sampled` — key blocks are ranked by their share of the output of a few EXACT query
  rows: `samples` (16) queries of each block attend softmax over every key they may see, and
  block j scores max over them of ‖Σ_{i∈j} p_i v_i‖ (strided rows as the proxy: XAttention, Xu et
  al., arXiv:2503.16428; value-aware importance: Guo et al., EMNLP 2024, arXiv:2406.12335). Cost
  samples/b of dense attention. Which rows (`sample_rows`, ours): half strided over the block, half
  the head's queries of largest ‖q‖ — the logit scale grows with ‖q‖, so those rows are the sharp
  ones, where a block left out costs most. The block-mean query (`pooled`, FlexPrefill arXiv:2502.20766 /
  MInference arXiv:2407.02490) and BiFormer's mean q · mean k (`means`) lose the position-sensitive
  part of q under RoPE: with the same budgets they cost 2-3× the perplexity.
- `budget: heads` — the same total number of listed blocks, split across the site's heads on
  calibration data by each block's exact output share (DuoAttention's retrieval vs streaming heads,
  Xiao et al., ICLR 2025, arXiv:2410.10819, found without training): sink-and-local heads list
  little, diffuse heads list more; every row of a head lists the same count.
The sinks are the first block (attention sink / BOS) and the previous block (local context), and
`keep` is the fraction of the causal (query, key) pairs: every query block lists on average
⌈n·(1 − √(1 − keep))⌉ blocks. Non-causal sites keep BiFormer's block means and a uniform budget.

kmeans_routing — Routing Transformer (Roy et al., "Efficient Content-Based Sparse Attention
with Routing Transformers", TACL 2021, arXiv:2003.05997), post hoc: q and k normalized;
per-head centroids fitted by spherical k-means on calibration activations (≈ √N clusters);
balanced clusters (each centroid takes its top-w tokens); attention inside each cluster with
the causal mask on original positions; tokens sorted by cluster into contiguous blocks so the
block-sparse kernel does the work; a token's results from several clusters (and from its
local block) merged by log-sum-exp. Tokens join clusters by normalize(q̂ + k̂), the same set as
queries and keys (the paper shares Q and K); see rewriter.kernels.routed_attention.
Exact setting: one cluster holding every token, no local block.

Before:  o = sdpa(q, k, v, mask)
After:   o = block_routed_attention(q, k, v, key_mask(mask), head_rows; b, k, sinks)  (table built in-graph)
         o = kmeans_routed_attention(q, k, v, key_mask(mask), centroids; w, local block)
Both approximate: the gate is mandatory. Routing decisions depend on the input, so they are
computed in the graph at run time; `build` returns only calibrated constants. key_mask(mask) is
rewriter.kernels.keymask.key_valid; the run-time routing aligns each sample's first real token to
position 0 and resolves fractions on its real length, so a sample's output does not depend on the
padding of its batch (tests/reliability/test_padding.py). GQA sites hand the op k/v before
repeat_kv (query head h reads kv head h // G), so its gathers move one copy per kv head.

Generation: block_routed_attention decodes over a KV cache at kv-heads width plus per-block key
min/max (Quest, arXiv:2406.10774), each step choosing its own blocks within the same budgets
(rewriter.kernels.routed_attention.block_decode); k-means routing has no decode form.
"""
from __future__ import annotations

import math
from typing import Literal

import sympy
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from rewriter import graph as G
from rewriter.kernels import routed_attention as RA
from rewriter.kernels.keymask import key_valid
from rewriter.report import N, projection_flops_per_token
from rewriter.rule import Rule, StepOptions, register

from . import _routing as R

aten = torch.ops.aten

BIFORMER = 'Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023, arXiv:2303.08125'
ROUTING_TF = ('Roy et al., "Efficient Content-Based Sparse Attention with Routing Transformers", TACL 2021, '
              'arXiv:2003.05997')


# ---------------------------------------------------------------------------- block_routing

class BlockRoutingOptions(StepOptions):
    block_size: int = Field(64, ge=1, description="tokens per block (BiFormer region)")
    topk: int | None = Field(None, ge=0, description="routed key blocks per query block, besides its own and the sinks")
    keep: float | None = Field(None, gt=0, le=1, description="fraction of the key blocks each query block lists "
                               "(sinks and own block included), resolved at run time per sample from its "
                               "real length (padding excluded); default 0.25")
    mass: float | None = Field(None, gt=0, le=1, description="choose top-k on calibration data: the smallest k whose "
                               "blocks hold this fraction of the exact attention probability, on average")
    sinks: list[Literal["first", "last", "previous"]] | None = Field(
        None, description="always-kept blocks besides the query's own: the one holding the first real "
        'token (CLS/BOS), the one holding the last (SEP), and "previous", the block just before the query block; '
        'default ["first", "previous"] on causal sites, ["first", "last"] otherwise')
    route_by: Literal["own", "previous"] = Field("own", description='"own": route a query block by its mean query '
                                                 '(BiFormer); "previous": by the previous block\'s (strictly causal)')
    affinity: Literal["auto", "means", "pooled", "sampled"] = Field(
        "auto", description='how key blocks are ranked: "means" = BiFormer region affinity (mean q · mean k); '
        '"pooled" = attention mass of each key block under the block\'s mean query, softmax over all its keys '
        '(FlexPrefill / MInference pooled estimate); "sampled" = value-aware share of the output of `samples` '
        'exact query rows per block; "auto" = sampled on causal sites (pooled with route_by previous), '
        'means otherwise')
    samples: int = Field(16, ge=1, description='query rows per block that "sampled" computes exactly '
                         '(its cost: samples / block_size of dense attention; 8 halves it, and on SmolLM2 costs '
                         '~0.7 points more perplexity)')
    sample_rows: Literal["mixed", "strided", "largest_q"] = Field(
        "mixed", description='which queries of a block "sampled" computes: "strided" = the last of each of '
        '`samples` equal parts; "largest_q" = the block\'s `samples` queries of largest ‖q‖ per head (the sharpest '
        'rows); "mixed" = half strided, half largest ‖q‖')
    budget: Literal["auto", "uniform", "heads"] = Field(
        "auto", description='"uniform": every head lists the same number of blocks per query block; "heads": the '
        "same total, split across heads on calibration data by each block's exact share of the output "
        '(diffuse heads get more); "auto" = heads on causal sites, uniform otherwise')

    @model_validator(mode="after")
    def _one_budget(self):
        given = [n for n in ("topk", "keep", "mass") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"block_routing: give at most one of topk, keep, mass; got {', '.join(given)}")
        if self.affinity == "sampled" and self.route_by == "previous":
            raise ValueError('block_routing: route_by "previous" routes by the previous block\'s mean query; '
                             'affinity "sampled" reads the block\'s own queries (use affinity "pooled")')
        if self.mass is not None and self.budget == "heads":
            raise ValueError("block_routing: mass chooses one top-k for every head; it cannot be combined with "
                             'budget "heads" (give keep or topk instead)')
        return self


def check_block(c, opts) -> str | None:
    site = c.site
    return R.common_refusal(site)


def _resolved(opts, causal: bool) -> tuple[tuple[str, ...], str]:
    """(sinks, affinity) after the causal-dependent defaults."""
    sinks = RA.default_sinks(causal) if opts.sinks is None else tuple(opts.sinks)
    if opts.affinity != "auto":
        affinity = opts.affinity
    else:   # sampled rows are the block's own queries: strictly causal routing needs the pooled mean query
        affinity = "means" if not causal else "pooled" if opts.route_by == "previous" else "sampled"
    return sinks, affinity


def _per_head(opts, causal: bool) -> bool:
    """Whether the budget is split across heads on calibration data (see `_head_rows`)."""
    if opts.budget == "auto":
        return causal and opts.mass is None
    return opts.budget == "heads"


def _exact_probs(q, k, real, causal: bool, scale: float, h: int, pad: int) -> torch.Tensor:
    """Query head h's exact attention probabilities, fp32 [B, T, T + pad] (keys padded to whole
    blocks with zeros; GQA: the head's kv head). A query that sees no key gets zeros."""
    B, t = q.shape[0], q.shape[2]
    kh = k[:, h // (q.shape[1] // k.shape[1])].float()
    s = (q[:, h].float() @ kh.transpose(-1, -2)) * scale                                 # [B, T, T]
    vis = real[:, None, :].expand(B, t, t)
    if causal:
        vis = vis & torch.ones(t, t, dtype=torch.bool).tril()
    return F.pad(torch.softmax(s.masked_fill(~vis, RA.NEG_INF), dim=-1).nan_to_num(0.0), (0, pad))


def _mean_over_block_queries(x: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """x [B, T, nb] (per query, per key block) -> [B, nb(q), nb(k)]: the mean over each query
    block's real queries (qw [B, nb, bs]: 1 for a real query; padding and the ragged tail 0)."""
    B, n_b, bs = qw.shape
    x = F.pad(x, (0, 0, 0, n_b * bs - x.shape[1])).view(B, n_b, bs, -1)
    qw = qw.to(x.dtype)
    return (x * qw[..., None]).sum(2) / qw.sum(-1, keepdim=True).clamp(min=1)


def _output_shares(p: torch.Tensor, v: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
    """One head's exact block output shares, [B, nb(q), nb(k)]: the mean over each query block's
    real queries of ‖Σ_{j ∈ key block} p_j v_j‖ (p [B, T, nb·bs] its probabilities with keys padded
    to whole blocks, v [B, T, d_v] its values, qw as in `_mean_over_block_queries`)."""
    B, t = p.shape[:2]
    n_b, bs = qw.shape[1:]
    vb = F.pad(v.float(), (0, 0, 0, n_b * bs - t)).view(B, n_b, bs, -1)
    share = torch.einsum("btnj,bnjd->btnd", p.view(B, t, n_b, bs), vb).norm(dim=-1)        # [B, T, nb(k)]
    return _mean_over_block_queries(share, qw)


@torch.no_grad()
def _head_rows(q, k, v, key_mask, causal, scale, opts) -> torch.Tensor:
    """Per-head blocks per query block, as fractions of the blocks, fp64 [H], for one calibration
    batch (left-aligned, see `build_block`; a fraction f gives a sample of n real blocks
    round(n·f) per row, as at run time). The uniform budget's total number of listed blocks is
    handed out again over (head, query block, key block) triples by each block's EXACT share of the output, mean over
    the block's real queries of ‖Σ_{j ∈ block} p_j v_j‖; head h's share c_h then becomes the
    per-row count K_h whose rows Σ_i min(max(K_h, forced_i), allowed_i) come closest to c_h.
    Heads whose attention is diffuse get more blocks, sink-and-local heads fewer: the
    retrieval-vs-streaming split of DuoAttention (Xiao et al., ICLR 2025, arXiv:2410.10819),
    found here from the output share instead of a trained gate. One head at a time: T² memory."""
    B, H, t, _ = q.shape
    bs, n_b = opts.block_size, (t + opts.block_size - 1) // opts.block_size
    sinks, _ = _resolved(opts, causal)
    score, n_forced = RA.block_scores(q, k, key_mask, block_size=bs, causal=causal, sinks=sinks,
                                      route_by="own", affinity="means", scale=scale)
    forced, allowed = score == float("inf"), score > RA.NEG_INF                         # [B, 1|H, nb, nb]
    forced, allowed = forced.expand(B, H, n_b, n_b), allowed.expand(B, H, n_b, n_b)
    real = torch.ones(B, t, dtype=torch.bool) if key_mask is None else key_mask.bool()
    pad = n_b * bs - t
    qw = F.pad(real.float(), (0, pad)).view(B, n_b, bs)                                  # real queries per block
    exact = torch.empty(B, H, n_b, n_b)
    for h in range(H):
        exact[:, h] = _output_shares(_exact_probs(q, k, real, causal, scale, h, pad), v[:, h // (H // v.shape[1])], qw)
    rows_allowed = allowed.sum(-1)                                                      # [B, H, nb]
    rows_forced = forced.sum(-1)
    topk, keep = _budget({}, opts)
    n_real = RA.real_blocks(score)                                                      # [B, 1, 1, 1]
    _, rows = RA.uniform_rows(n_b, n_forced, topk=topk, keep_permille=keep, causal=causal, n_sinks=len(sinks),
                              n_real=n_real)
    uniform = torch.minimum(rows[..., 0].expand(B, H, n_b), rows_allowed)
    extra = int(uniform.sum() - rows_forced.sum())
    free = exact.masked_fill(forced | ~allowed, RA.NEG_INF).reshape(-1)
    chosen = torch.zeros_like(free, dtype=torch.bool)
    if extra > 0:
        chosen[free.topk(extra).indices] = True
    per_head = (chosen.view(B, H, -1).sum(-1) + forced.reshape(B, H, -1).sum(-1)).double().mean(0)   # [H]
    K = torch.arange(1, n_b + 1).view(-1, 1, 1, 1)                                      # candidates K / n_b
    K = ((2 * K * n_real.view(1, B, 1, 1) + n_b) // (2 * n_b)).clamp(min=1)   # per sample: round(n·K/n_b)
    listed = torch.minimum(torch.maximum(K, rows_forced[None]), rows_allowed[None]).sum(-1).double().mean(1)
    best = (listed - per_head[None]).abs().argmin(0)                                    # [H]
    return (best + 1).double() / n_b


@torch.no_grad()
def _captured_mass(q, k, v, key_mask, causal, scale, opts) -> torch.Tensor:
    """Mean (over heads and real query blocks) attention probability held by the forced blocks
    plus the top-k routed ones, for k = 0 … n_blocks − 1: fp64 [n_blocks]."""
    B, H, t, _ = q.shape
    bs, n_b = opts.block_size, (t + opts.block_size - 1) // opts.block_size
    sinks, affinity = _resolved(opts, causal)
    score, n_forced = RA.block_scores(q, k, key_mask, block_size=bs, causal=causal, sinks=sinks,
                                      route_by=opts.route_by, affinity=affinity, scale=scale, v=v,
                                      samples=opts.samples, sample_rows=opts.sample_rows)
    order = score.sort(dim=-1, descending=True).indices                             # [B, H, nb, nb]
    real = torch.ones(B, t, dtype=torch.bool) if key_mask is None else key_mask.bool()
    pad = n_b * bs - t
    qw = F.pad(real.double(), (0, pad)).view(B, n_b, bs)                              # real queries per block
    total, count = torch.zeros(n_b, dtype=torch.float64), 0.0
    for h in range(H):                                                               # one head at a time: T² memory
        mass = _exact_probs(q, k, real, causal, scale, h, pad).view(B, t, n_b, bs).sum(-1)   # [B, T, nb]
        blk = _mean_over_block_queries(mass.double(), qw)                             # [B, nb, nb] mean row mass
        ranked = blk.gather(-1, order[:, h]).cumsum(-1)                               # mass of the best j+1 blocks
        nf = n_forced[:, 0, :, 0]                                                     # [B, nb]
        idx = (nf[..., None] - 1 + torch.arange(n_b)).clamp(max=n_b - 1)              # forced + k extra
        got = ranked.gather(-1, idx)                                                  # [B, nb, nb(k)]
        has_q = qw.sum(-1) > 0
        total += (got * has_q[..., None]).sum((0, 1))
        count += float(has_q.sum())
    return total / max(count, 1.0)


def build_block(ctx, c, opts) -> dict:
    site = c.site
    causal = site.mask in ("causal", "causal+padding")
    heads = _per_head(opts, causal)
    if opts.mass is None and not heads:
        return {}
    a = G.sdpa_args(G.node(ctx.gm, site.node))
    padded = site.mask in ("padding", "causal+padding")
    names = [a["query"].name, a["key"].name, a["value"].name] + ([a["attn_mask"].name] if padded else [])
    acts = ctx.capture(names)
    results = []
    for i in range(len(ctx.batches)):
        q, k, v = (acts[n][i] for n in names[:3])
        km = key_valid(acts[names[3]][i], q.shape[0]) if padded else None
        if km is not None:          # as the run-time routing sees them: first real token at position 0
            to, _ = RA.alignment(km)
            q, k, v, km = (RA.along_tokens(x, to) for x in (q, k, v, km))
        fn = _head_rows if heads else _captured_mass
        results.append(fn(q, k, v, km, causal, site.scale, opts))
    mean = torch.stack(results).mean(0)
    if heads:
        return {"head_rows": (1000 * mean).round().long()}
    ok = (mean >= opts.mass - 1e-9).nonzero()
    topk = int(ok[0]) if len(ok) else len(mean)
    return {"topk": torch.tensor([topk]), "mass_curve": mean.float()}


def _budget(built, opts) -> tuple[int | None, int | None]:
    """(topk, keep_permille) the graph uses: calibrated top-k, else the options (default keep 0.25)."""
    if "topk" in built:
        return int(built["topk"].reshape(-1)[0]), None
    if opts.topk is not None:
        return opts.topk, None
    return None, round(1000 * (opts.keep if opts.keep is not None else 0.25))


def apply_block(gm, c, built, opts) -> None:
    site, built = c.site, built.tensors
    sd, q, k, v, key_mask, causal = R.site_tensors(gm, site)
    if site.kv_heads and G.size_hint(G.shape(k)[1]) != site.kv_heads:     # repeated for the SDPA
        kk, vv = G.unrepeat_kv(k), G.unrepeat_kv(v)     # the routed op takes GQA's k/v as they are
        if kk and vv and G.size_hint(G.shape(kk[0])[1]) == G.size_hint(G.shape(vv[0])[1]) == site.kv_heads:
            k, v = kk[0], vv[0]
    topk, keep = _budget(built, opts)
    sinks, affinity = _resolved(opts, causal)
    args, extra = (q, k, v, key_mask), {}
    if "head_rows" in built:
        (rows,) = R.register_all(gm, sd, "block_routing", site.index, {"head_rows": built["head_rows"]}).values()
        args, extra = args + (rows,), {"max_row_permille": int(built["head_rows"].max())}
    G.replace_with_op(gm, sd, RA.block_routed_attention, args, dict(
        block_size=opts.block_size, topk=topk, keep_permille=keep, causal=causal, sinks=sinks,
        route_by=opts.route_by, scale=site.scale, affinity=affinity, samples=opts.samples,
        sample_rows=opts.sample_rows, **extra),
        rule="block_routing", site=site.index)


def cost_block(site, opts):
    """Attention FLOPs/token: exact attention over the kept keys + routing scores: region affinity
    (N/b)²·2d / N ("means"), each block's mean query against every key, (N/b)·N·2d / N ("pooled"),
    or `samples` exact rows per block against every key and value, (N·S/b)·N·4d / N ("sampled")."""
    b, hd = opts.block_size, site.heads * site.head_dim
    causal = site.mask in ("causal", "causal+padding")
    sinks, affinity = _resolved(opts, causal)
    if opts.topk is not None:
        kept = sympy.Min(N, (opts.topk + 1 + len(sinks)) * b)
    else:   # keep fraction (mass-chosen top-k is per site; the default fraction stands in for it)
        kept = sympy.Min(N, sympy.Rational(round(1000 * (opts.keep or 0.25)), 1000) * N + b)
    route = {"means": 2 * hd * N / b**2, "pooled": 2 * hd * N / b,
             "sampled": 4 * hd * N * sympy.Min(opts.samples, b) / b}[affinity]
    return projection_flops_per_token(site) + 4 * hd * kept + route


register(Rule(
    name="block_routing", paper=BIFORMER, exact=False, options=BlockRoutingOptions,
    summary="BiFormer bi-level routing: each query block attends exactly to its top-k key blocks + own + sinks",
    check=check_block, build=build_block, apply=apply_block, cost=cost_block))


# ---------------------------------------------------------------------------- kmeans_routing

class KMeansRoutingOptions(StepOptions):
    clusters: int | None = Field(None, ge=1, description="centroids per head; default round(√N) at the "
                                 "calibration length")
    window: int | None = Field(None, ge=1, description="tokens each centroid takes (balanced clusters); "
                               "default ⌈N / clusters⌉ at the calibration length")
    local: bool = Field(True, description="also attend the token's own local block and the first block, "
                        "merged by log-sum-exp (the Routing Transformer's local heads)")
    local_block: int | None = Field(None, ge=1, description="local block size; default = window")
    iters: int = Field(25, ge=1, description="k-means iterations")
    max_points: int = Field(16384, ge=1, description="calibration tokens per head used to fit the centroids")


def check_kmeans(c, opts) -> str | None:
    site = c.site
    return R.common_refusal(site)


def build_kmeans(ctx, c, opts) -> dict:
    site = c.site
    a = G.sdpa_args(G.node(ctx.gm, site.node))
    padded = site.mask in ("padding", "causal+padding")
    names = [a["query"].name, a["key"].name] + ([a["attn_mask"].name] if padded else [])
    acts = ctx.capture(names)
    points, t_cal = [], 0
    for i in range(len(ctx.batches)):
        q, k = acts[names[0]][i], acts[names[1]][i]
        t_cal = max(t_cal, q.shape[2])
        real = (key_valid(acts[names[2]][i], q.shape[0]) if padded
                else torch.ones(q.shape[0], q.shape[2], dtype=torch.bool))
        r = RA.routing_vectors(q, k)                                                 # [B, H, T, D]
        points.append(r.permute(1, 0, 2, 3)[:, real])                                # [H, M_i, D]
    x = torch.cat(points, dim=1)
    clusters = opts.clusters or max(1, round(math.sqrt(t_cal)))
    window = opts.window or (t_cal + clusters - 1) // clusters
    g = torch.Generator().manual_seed(site.index)
    keep = torch.randperm(x.shape[1], generator=g)[:opts.max_points]
    cents = torch.stack([R.spherical_kmeans(x[h, keep], clusters, opts.iters, seed=h) for h in range(x.shape[0])])
    return {"centroids": cents.to(acts[names[0]][0].dtype),
            "window": torch.tensor([window]),
            "local_block": torch.tensor([(opts.local_block or window) if opts.local else 0])}


def apply_kmeans(gm, c, built, opts) -> None:
    site, built = c.site, built.tensors
    sd, q, k, v, key_mask, causal = R.site_tensors(gm, site)
    (cent,) = R.register_all(gm, sd, "kmeans_routing", site.index, {"centroids": built["centroids"]}).values()
    local = int(built["local_block"].reshape(-1)[0])
    G.replace_with_op(gm, sd, RA.kmeans_routed_attention, (q, k, v, key_mask, cent), dict(
        window=int(built["window"].reshape(-1)[0]), causal=causal, scale=site.scale,
        local_block=local or None), rule="kmeans_routing", site=site.index)


def cost_kmeans(site, opts):
    """Per token: centroid scores 2·C·d, attention to its clusters' w keys (each token joins
    ≈ one cluster on average) and, with `local`, to two local blocks."""
    C = opts.clusters or sympy.sqrt(N)
    w = opts.window or N / C
    lb = (opts.local_block or w) if opts.local else 0
    hd = site.heads * site.head_dim
    return projection_flops_per_token(site) + 2 * hd * C + 4 * hd * (w + 2 * lb)


register(Rule(
    name="kmeans_routing", paper=ROUTING_TF, exact=False, options=KMeansRoutingOptions,
    summary="Routing Transformer: attention inside k-means clusters of q/k (centroids fitted on calibration)",
    check=check_kmeans, build=build_kmeans, apply=apply_kmeans, cost=cost_kmeans))
