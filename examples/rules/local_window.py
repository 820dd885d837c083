"""Sliding-window attention: each query attends only to keys within `window` positions of it.
Beltagy et al., "Longformer", arXiv:2004.05150 (local attention). Exact when window >= T - 1.
A complete third-party rule: register it by importing this module, or through the entry-point
group `rewriter.rules` of your own package."""
import sympy
import torch
from pydantic import Field

from rewriter import graph as G
from rewriter.report import N, projection_flops_per_token
from rewriter.rule import Built, Candidate, Rule, StepOptions, register

aten = torch.ops.aten


class WindowOptions(StepOptions):
    window: int = Field(64, ge=0, description="keys on each side of the query that stay visible")


def check(c: Candidate, opts: WindowOptions) -> str | None:
    if c.site.mask in ("causal", "causal+padding"):
        return "this example handles bidirectional attention only"
    return None


def build(ctx, c: Candidate, opts: WindowOptions) -> Built:
    return Built({}, {"window": opts.window})         # nothing to fit: the band is computed per call


def apply(gm, c: Candidate, built: Built, opts: WindowOptions) -> None:
    sd = G.node(gm, c.site.node)
    a = G.sdpa_args(sd)
    q, mask = a["query"], a["attn_mask"]

    def op(target, *args, **kwargs):
        with gm.graph.inserting_before(sd):
            n = gm.graph.call_function(target, args, kwargs)
        n.meta["rewriter"] = {"rule": "local_window", "site": c.site.index}
        return n

    pos = op(aten.arange.default, op(aten.sym_size.int, q, 2), device=q.meta["val"].device)   # [T]
    dist = op(aten.abs.default, op(aten.sub.Tensor, op(aten.unsqueeze.default, pos, 1), pos))  # [T, T]
    band = op(aten.le.Scalar, dist, opts.window)
    if mask is not None and mask.meta["val"].dtype == torch.bool:
        band = op(aten.logical_and.default, mask, band)
    elif mask is not None:                                   # additive mask: −inf outside the band
        band = op(aten.where.ScalarOther, band, mask, float("-inf"))
    G.replace_with_op(gm, sd, G.SDPA, (q, a["key"], a["value"], band, 0.0, False),
                      {"scale": c.site.scale, "enable_gqa": bool(a["enable_gqa"])},
                      rule="local_window", site=c.site.index)


def cost(site, opts):
    return projection_flops_per_token(site) + 4 * site.heads * site.head_dim * sympy.Min(N, 2 * opts.window + 1)


RULE = register(Rule("local_window", paper='Beltagy et al., "Longformer", arXiv:2004.05150', exact=False,
                     summary="sliding-window attention: keys within `window` positions only",
                     options=WindowOptions, check=check, build=build, apply=apply, cost=cost))
