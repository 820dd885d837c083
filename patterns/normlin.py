"""NormLin: softmax attention → one learned row-stochastic token-mixing matrix, for fixed tokens.

Yue et al., "OLinear: A Linear Model for Time Series Forecasting in Orthogonally Transformed
Domain", arXiv:2505.08550. NormLin replaces
softmax(QKᵀ/√d)·V by A·V with

    A = row-L1-normalize(softplus(W)),  W ∈ ℝ^{N×N}  (one per head with heads="per_head", as in
    OLinear's LinearEncoder_Multihead)

and keeps the value and output projections: y = x + W_o(A·W_v x). No queries or keys, so q/k
projections and the N²·d score product disappear (about half the attention FLOPs, fewer
parameters). A is the same for every input, so it is only meaningful where token i means the
same thing in every input: a fixed patch grid (vision) or variates as tokens (iTransformer-style
forecasters). Decided here, per site, from the traced graph and the model kind:

* accepted: kind "vision" or "generic", and the SDPA's sequence length N is a plain int in the
  traced graph (the graph was specialized to exactly N tokens; images are traced at a fixed size,
  a forecaster's variate axis is never marked dynamic);
* refused, with the reason: text models (kind "encoder" / "causal_lm": token i is a different word
  in every input and N varies), any site whose N is a symbolic size, and masked attention.

Fit (post hoc, no training loop over the model): least squares from the calibration values V to the
site's attention output O, projected to non-negative row-stochastic rows, then a short
distillation on the same loss (patterns/_normlin_fit.py); gated against the original model.
Exact setting: when the site's attention matrix is input-independent, the fit recovers it.

Before:  o_proj(merge(sdpa(q_proj(x), k_proj(x), v_proj(x))))
After:   o_proj(merge(matmul(softplus(W) / rowsum(softplus(W)), v_proj(x))))
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rewriter import graph as G
from rewriter.report import N
from rewriter.rule import Built, Candidate, Rule, StepOptions, register
from rewriter.site import AttentionSite

from . import _normlin_fit as fit

aten = torch.ops.aten
TEXT_KINDS = ("encoder", "causal_lm")


class NormLinOptions(StepOptions):
    heads: Literal["shared", "per_head"] = Field(
        default="shared",
        description='"shared": one N×N matrix for all heads (OLinear\'s NormLin); "per_head": one per '
        "head (OLinear's multi-head variant), H·N² parameters.")
    distill_steps: int = Field(
        default=200, ge=0,
        description="projected-gradient steps on the calibration distillation loss after the "
        "least-squares start; 0 keeps the projected least-squares fit.")


def _tokens(gm, site: AttentionSite, kind: str) -> tuple[int | None, str | None]:
    """(N, None) if this site has a fixed token count and identities, else (N or None, reason)."""
    node = G.find(gm, site.node)
    val = node.meta.get("val") if node is not None else None
    n = val.shape[-2] if isinstance(val, torch.Tensor) else None
    fixed = isinstance(n, int)
    shown = n if fixed else (f"symbolic {n}" if n is not None else "unknown")
    if kind in TEXT_KINDS:
        return (n if fixed else None), (
            f"text model (kind {kind!r}, sequence length {shown}): token i is a different word in every "
            "input and the token count varies, so there is no fixed N×N mixing to learn; NormLin needs "
            "fixed tokens (a fixed patch grid, variates as tokens)")
    if not fixed:
        return None, (f"the sequence length at this attention is {shown} in the traced graph, not a fixed "
                      "token count; NormLin's N×N matrix needs the same N tokens in every input")
    if site.mask != "none":
        return n, f"the attention has a {site.mask} mask; NormLin mixes all N tokens with one fixed matrix"
    return n, None


def plan(ctx, sites: list[AttentionSite], opts: NormLinOptions) -> list[Candidate]:
    """Decide fixed-token eligibility per site from the graph and the model kind (graph order kept)."""
    out = []
    for s in sites:
        n, why = _tokens(ctx.gm, s, ctx.kind)
        out.append(Candidate((s,), {"tokens": n, "kind": ctx.kind} | ({"refuse": why} if why else {})))
    return out


def check(c: Candidate, opts: NormLinOptions) -> str | None:
    if "kind" not in c.facts:
        return "normlin's plan did not run on this site, so its token count and kind are unknown"
    return c.facts.get("refuse")


def build(ctx, c: Candidate, opts: NormLinOptions) -> dict:
    site = c.site
    value = G.sdpa_args(G.node(ctx.gm, site.node))["value"]
    acts = ctx.capture([value.name, site.node])             # on the current (partly rewritten) graph
    Gm, C, o2 = fit.gram_stats(acts[value.name], acts[site.node], per_head=opts.heads == "per_head")
    A = fit.project_rows_to_simplex(fit.least_squares(Gm, C))
    A = fit.distill(A, Gm, C, o2, opts.distill_steps)
    W = fit.softplus_inverse(A)
    return {"weight": (W[0] if opts.heads == "shared" else W).to(acts[site.node][0].dtype)}


def apply(gm, c: Candidate, built: Built, opts: NormLinOptions) -> None:
    site = c.site
    sdpa = G.node(gm, site.node)
    args = G.sdpa_args(sdpa)
    v = args["value"]
    w = G.register_tensor(gm, G.buffer_name("normlin", site.index, "weight"), built.tensors["weight"], before=sdpa)
    graph, tag = gm.graph, {"rule": "normlin", "site": site.index}
    with graph.inserting_before(sdpa):
        sp = graph.call_function(aten.softplus.default, (w,))
        a = graph.call_function(aten.div.Tensor, (sp, graph.call_function(aten.sum.dim_IntList, (sp, [-1], True))))
        new = [sp, a, a.args[1]]
        if args["enable_gqa"] and site.kv_heads and site.kv_heads != site.heads:
            v = graph.call_function(aten.repeat_interleave.self_int, (v, site.heads // site.kv_heads, -3))
            new.append(v)
    for n in new:
        n.meta["rewriter"] = tag
    G.replace_with_op(gm, sdpa, aten.matmul.default, (a, v), rule="normlin", site=site.index)


def cost(site: AttentionSite, opts: NormLinOptions):
    """A·V (2·H·d·N per token) plus the kept v and o projections; q/k and QKᵀ are gone."""
    d_model, hd = site.heads * site.head_dim, site.head_dim
    return 2 * site.heads * hd * N + 2 * d_model * site.kv_heads * hd + 2 * site.heads * hd * d_model


register(Rule(
    name="normlin", paper='Yue et al., "OLinear" (NormLin), arXiv:2505.08550', exact=False,
    options=NormLinOptions, summary="attention → fixed row-stochastic token mixing softplus-normalized "
    "A·V (fixed-token models: patch grids, variates)", check=check, build=build, apply=apply,
    plan=plan, cost=cost, fits=True))
