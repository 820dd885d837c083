"""Routed attention: each query attends, exactly, to a content-chosen subset of the keys.

block_routing — BiFormer bi-level routing (Zhu et al., "BiFormer: Vision Transformer with
Bi-Level Routing Attention", CVPR 2023, arXiv:2303.08125), training-free: cut tokens into
blocks of b, take block means of q and k, region affinity Qʳ·Kʳᵀ; each query block keeps
its top-k key blocks plus its own block plus "sink" blocks (the first real token's block —
CLS / BOS — and the last real token's block — SEP in right-padded BERT inputs), then exact
softmax attention over the gathered blocks (`rewriter::block_sparse_attention`, never
materializing the gathered K/V). Causal sites list only blocks at or before the query block.
top-k is fixed, a fraction of the blocks (`keep`), or chosen on calibration data as the
smallest k whose blocks hold `mass` of the exact attention probability (the training-free
cumulative-mass selection). Exact setting: top-k ≥ number of blocks, or keep = 1.

Causal (LLM) sites default to what training-free sparse prefill attention does instead of the
block-mean affinity: key blocks are ranked by their attention mass under the query block's mean
query, softmax over all keys it may see (`affinity: pooled`; the pooled-query estimate of
FlexPrefill, Lai et al., ICLR 2025, arXiv:2502.20766, and MInference, Jiang et al., NeurIPS 2024,
arXiv:2407.02490 — cost T·T/b·d per head), the sinks are the first block (attention sink /
BOS) and the previous block (local context), and `keep` is the fraction of the causal
(query, key) pairs: every query block lists ⌈n·(1 − √(1 − keep))⌉ blocks. On SmolLM2 at 2048
tokens (b = 64, keep 0.25 → 26 % of the causal pairs) this ranking holds as much attention mass
as ranking by the exact block mass (0.871 vs 0.872 on calibration text; block means: 0.851).

kmeans_routing — Routing Transformer (Roy et al., "Efficient Content-Based Sparse Attention
with Routing Transformers", TACL 2021, arXiv:2003.05997), post hoc: q and k normalized;
per-head centroids fitted by spherical k-means on calibration activations (≈ √N clusters);
balanced clusters (each centroid takes its top-w tokens); attention inside each cluster with
the causal mask on original positions; tokens sorted by cluster into contiguous blocks so the
block-sparse kernel does the work; a token's results from several clusters (and from its
local block) merged by log-sum-exp. Tokens join clusters by normalize(q̂ + k̂), the same set as
queries and keys (the paper shares Q and K); see patterns/_routing.py.
Exact setting: one cluster holding every token, no local block.

Before:  o = sdpa(q, k, v, mask)
After:   o = block_routed_attention(q, k, v, key_mask(mask); b, k, sinks)      (table built in-graph)
         o = kmeans_routed_attention(q, k, v, key_mask(mask), centroids; w, local block)
Both approximate: the gate is mandatory. Routing decisions depend on the input, so they are
computed in the graph at run time; `build` returns only calibrated constants.
"""
from __future__ import annotations

import math
from typing import Literal

import sympy
import torch
from pydantic import Field, model_validator

from rewriter import graph as G
from rewriter.report import N, projection_flops_per_token
from rewriter.rule import Rule, StepOptions, register

from . import _routing as R

BIFORMER = 'Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023, arXiv:2303.08125'
ROUTING_TF = ('Roy et al., "Efficient Content-Based Sparse Attention with Routing Transformers", TACL 2021, '
              'arXiv:2003.05997')


# ---------------------------------------------------------------------------- block_routing

class BlockRoutingOptions(StepOptions):
    block_size: int = Field(64, ge=1, description="tokens per block (BiFormer region)")
    topk: int | None = Field(None, ge=0, description="routed key blocks per query block, besides its own and the sinks")
    keep: float | None = Field(None, gt=0, le=1, description="fraction of the key blocks each query block lists "
                               "(sinks and own block included), resolved at run time from the length; default 0.25")
    mass: float | None = Field(None, gt=0, le=1, description="choose top-k on calibration data: the smallest k whose "
                               "blocks hold this fraction of the exact attention probability, on average")
    sinks: list[Literal["first", "last", "previous"]] | None = Field(
        None, description="always-kept blocks besides the query's own: the one holding the first real "
        'token (CLS/BOS), the one holding the last (SEP), and "previous", the block just before the query block; '
        'default ["first", "previous"] on causal sites, ["first", "last"] otherwise')
    route_by: Literal["own", "previous"] = Field("own", description='"own": route a query block by its mean query '
                                                 '(BiFormer); "previous": by the previous block\'s (strictly causal)')
    affinity: Literal["auto", "means", "pooled"] = Field(
        "auto", description='how key blocks are ranked: "means" = BiFormer region affinity (mean q · mean k); '
        '"pooled" = attention mass of each key block under the block\'s mean query, softmax over all its keys '
        '(FlexPrefill / MInference pooled estimate); "auto" = pooled on causal sites, means otherwise')

    @model_validator(mode="after")
    def _one_budget(self):
        given = [n for n in ("topk", "keep", "mass") if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"block_routing: give at most one of topk, keep, mass; got {', '.join(given)}")
        return self


def check_block(site, opts) -> str | None:
    return R.common_refusal(site)


def _resolved(opts, causal: bool) -> tuple[tuple[str, ...], str]:
    """(sinks, affinity) after the causal-dependent defaults."""
    sinks = R.default_sinks(causal) if opts.sinks is None else tuple(opts.sinks)
    affinity = opts.affinity if opts.affinity != "auto" else ("pooled" if causal else "means")
    return sinks, affinity


@torch.no_grad()
def _captured_mass(q, k, key_mask, causal, scale, opts) -> torch.Tensor:
    """Mean (over heads and real query blocks) attention probability held by the forced blocks
    plus the top-k routed ones, for k = 0 … n_blocks − 1: fp64 [n_blocks]."""
    B, H, t, _ = q.shape
    bs, n_b = opts.block_size, (t + opts.block_size - 1) // opts.block_size
    sinks, affinity = _resolved(opts, causal)
    score, n_forced = R.block_scores(q, k, key_mask, block_size=bs, causal=causal, sinks=sinks,
                                     route_by=opts.route_by, affinity=affinity, scale=scale)
    order = score.sort(dim=-1, descending=True).indices                             # [B, H, nb, nb]
    real = torch.ones(B, t, dtype=torch.bool) if key_mask is None else key_mask.bool()
    k = k.repeat_interleave(H // k.shape[1], dim=1) if k.shape[1] != H else k
    pad = n_b * bs - t
    total, count = torch.zeros(n_b, dtype=torch.float64), 0.0
    for h in range(H):                                                               # one head at a time: T² memory
        s = (q[:, h].float() @ k[:, h].float().transpose(-1, -2)) * scale             # [B, T, T]
        vis = real[:, None, :].expand(B, t, t)
        if causal:
            vis = vis & torch.ones(t, t, dtype=torch.bool).tril()
        p = torch.softmax(s.masked_fill(~vis, R.NEG_INF), dim=-1).nan_to_num(0.0)
        p = torch.nn.functional.pad(p, (0, pad)).view(B, t, n_b, bs).sum(-1)           # [B, T, nb]
        qw = torch.nn.functional.pad(real.double(), (0, pad)).view(B, n_b, bs)        # real queries per block
        p = torch.nn.functional.pad(p.double(), (0, 0, 0, pad)).view(B, n_b, bs, n_b)
        blk = (p * qw[..., None]).sum(2) / qw.sum(-1, keepdim=True).clamp(min=1)       # [B, nb, nb] mean row mass
        ranked = blk.gather(-1, order[:, h]).cumsum(-1)                               # mass of the best j+1 blocks
        nf = n_forced[:, 0, :, 0]                                                     # [B, nb]
        idx = (nf[..., None] - 1 + torch.arange(n_b)).clamp(max=n_b - 1)              # forced + k extra
        got = ranked.gather(-1, idx)                                                  # [B, nb, nb(k)]
        has_q = qw.sum(-1) > 0
        total += (got * has_q[..., None]).sum((0, 1))
        count += float(has_q.sum())
    return total / max(count, 1.0)


def build_block(ctx, site, opts) -> dict:
    if opts.mass is None:
        return {}
    a = G.sdpa_args(G.node(ctx.gm, site.node))
    padded = site.mask in ("padding", "causal+padding")
    names = [a["query"].name, a["key"].name] + ([a["attn_mask"].name] if padded else [])
    acts = ctx.capture(names)
    causal = site.mask in ("causal", "causal+padding")
    curves = []
    for i in range(len(ctx.batches)):
        q, k = acts[names[0]][i], acts[names[1]][i]
        km = R.key_mask_from_attn_mask(acts[names[2]][i], q) if len(names) == 3 else None
        curves.append(_captured_mass(q, k, km, causal, site.scale, opts))
    curve = torch.stack(curves).mean(0)
    ok = (curve >= opts.mass - 1e-9).nonzero()
    topk = int(ok[0]) if len(ok) else len(curve)
    return {"topk": torch.tensor([topk]), "mass_curve": curve.float()}


def _budget(built, opts) -> tuple[int | None, int | None]:
    """(topk, keep_permille) the graph uses: calibrated top-k, else the options (default keep 0.25)."""
    if "topk" in built:
        return int(built["topk"].reshape(-1)[0]), None
    if opts.topk is not None:
        return opts.topk, None
    return None, round(1000 * (opts.keep if opts.keep is not None else 0.25))


def apply_block(gm, site, built, opts) -> None:
    sd, q, k, v, key_mask, causal = R.site_tensors(gm, site)
    topk, keep = _budget(built, opts)
    sinks, affinity = _resolved(opts, causal)
    G.replace_with_op(gm, sd, R.block_routed_attention, (q, k, v, key_mask), dict(
        block_size=opts.block_size, topk=topk, keep_permille=keep, causal=causal, sinks=sinks,
        route_by=opts.route_by, scale=site.scale, affinity=affinity), rule="block_routing", site=site.index)


def cost_block(site, opts):
    """Attention FLOPs/token: exact attention over the kept keys + routing scores: region affinity
    (N/b)²·2d / N ("means"), or each block's mean query against every key, (N/b)·N·2d / N ("pooled")."""
    b, hd = opts.block_size, site.heads * site.head_dim
    causal = site.mask in ("causal", "causal+padding")
    sinks, affinity = _resolved(opts, causal)
    if opts.topk is not None:
        kept = sympy.Min(N, (opts.topk + 1 + len(sinks)) * b)
    else:   # keep fraction (mass-chosen top-k is per site; the default fraction stands in for it)
        kept = sympy.Min(N, sympy.Rational(round(1000 * (opts.keep or 0.25)), 1000) * N + b)
    route = 2 * hd * N / b**2 if affinity == "means" else 2 * hd * N / b
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


def check_kmeans(site, opts) -> str | None:
    return R.common_refusal(site)


def build_kmeans(ctx, site, opts) -> dict:
    a = G.sdpa_args(G.node(ctx.gm, site.node))
    padded = site.mask in ("padding", "causal+padding")
    names = [a["query"].name, a["key"].name] + ([a["attn_mask"].name] if padded else [])
    acts = ctx.capture(names)
    points, t_cal = [], 0
    for i in range(len(ctx.batches)):
        q, k = acts[names[0]][i], acts[names[1]][i]
        t_cal = max(t_cal, q.shape[2])
        real = (R.key_mask_from_attn_mask(acts[names[2]][i], q) if padded
                else torch.ones(q.shape[0], q.shape[2], dtype=torch.bool))
        r = R.routing_vectors(q, k)                                                  # [B, H, T, D]
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


def apply_kmeans(gm, site, built, opts) -> None:
    sd, q, k, v, key_mask, causal = R.site_tensors(gm, site)
    (cent,) = R.register_all(gm, sd, "kmeans_routing", site.index, {"centroids": built["centroids"]}).values()
    local = int(built["local_block"].reshape(-1)[0])
    G.replace_with_op(gm, sd, R.kmeans_routed_attention, (q, k, v, key_mask, cent), dict(
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
