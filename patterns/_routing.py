"""Graph-edit and calibration helpers the routed-attention rules share (agent_attention,
block_routing, kmeans_routing).

The run-time math these rules put in a graph — the key mask read from the SDPA mask
(rewriter.kernels.keymask, the one definition of a real key), block routing, k-means routing, agent
pooling — is kernel code: rewriter.kernels.keymask, .routed_attention and .agent_attention. A
rewritten graph calls only those functions and torch ops, never a function of rewriter.patterns.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from rewriter import graph as G
from rewriter.kernels.keymask import key_valid

aten = torch.ops.aten


def site_tensors(gm, site):
    """(sdpa node, q, k, v, key-mask node or None, causal) for a site; inserts the key-mask node,
    `key_valid(mask, batch)` [B, Tk], right before the SDPA node when the mask is a padding mask."""
    sd = G.node(gm, site.node)
    a = G.sdpa_args(sd)
    key_mask = None
    if site.mask in ("padding", "causal+padding"):
        key_mask = shared_key_valid(gm, sd, a["attn_mask"], a["query"])
    causal = site.mask in ("causal", "causal+padding")
    return sd, a["query"], a["key"], a["value"], key_mask, causal


def shared_key_valid(gm, before, mask, q, rule: str | None = None, site: int | None = None):
    """A `key_valid(mask, batch)` node [B, Tk] ahead of `before`: an existing one of the same mask
    node at the same batch size when the graph has one earlier (a decoder's layers share one mask,
    and the reduction over its [B, 1, T, T] rows costs ~50 ms per call at 8192 tokens), else a new
    one right before `before` with batch = q.shape[0] (provenance {rule, site} when `rule` is given)."""
    want = _batch(q)
    for n in gm.graph.nodes:
        if n is before:
            break
        if n.op == "call_function" and n.target is key_valid and n.args[0] is mask and len(n.args) > 1 \
                and isinstance(n.args[1], torch.fx.Node) and n.args[1].target is aten.sym_size.int \
                and want is not None and _batch(n.args[1].args[0]) == want:
            return n
    with gm.graph.inserting_before(before):
        batch = gm.graph.call_function(aten.sym_size.int, (q, 0))
        km = gm.graph.call_function(key_valid, (mask, batch))
    if rule is not None:
        for n in (batch, km):
            n.meta["rewriter"] = {"rule": rule, "site": site}
    return km


def _batch(x) -> str | None:
    """The batch size of node x's value as text (a SymInt's expression, or an int), or None."""
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    return str(val.shape[0]) if isinstance(val, torch.Tensor) and val.dim() else None


def common_refusal(site) -> str | None:
    """Reasons every routed rule shares for leaving a site alone."""
    if site.mask == "arbitrary":
        return ("the attention mask is neither causal nor padding-only (a sliding window, a bias or a fixed "
                "buffer); routing would drop or misplace it")
    return None


def register_all(gm, sd, rule: str, site: int, tensors: dict) -> dict:
    """Register each built tensor as a buffer read before the SDPA node; {key: get_attr node}."""
    return {k: G.register_tensor(gm, G.buffer_name(rule, site, k), t, before=sd) for k, t in tensors.items()}


# ---------------------------------------------------------------------------- k-means calibration

@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, clusters: int, iters: int = 25, seed: int = 0) -> torch.Tensor:
    """Unit-norm centroids [C, D] of unit vectors x [M, D] by spherical k-means (cosine
    assignment, normalized-mean update); init by a seeded random pick; an empty cluster is
    re-seeded with the point farthest from its centroid. Deterministic for a given seed."""
    if x.shape[0] < clusters:
        raise ValueError(f"k-means: {clusters} clusters need at least as many calibration tokens, got {x.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(x.shape[0], generator=g)[:clusters]].clone()
    for _ in range(iters):
        sim = x @ c.T
        assign = sim.argmax(-1)
        new = torch.zeros_like(c).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=clusters)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            far = sim.max(-1).values.argsort()[:len(empty)]
            new[empty] = x[far]
        c = F.normalize(new, dim=-1)
    return c
