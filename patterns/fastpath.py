"""causal_fastpath: an exact kernel swap — masked causal SDPA → the fused is_causal kernel when
the mask is the plain causal triangle (no padding in the batch), decided per call.

DESIGN's exact-kernel row ("sdpa (canonical), decode kernels"). A traced decoder always feeds SDPA
the [B, 1, T, T] mask it builds from `attention_mask`, while eager HF calls SDPA with
is_causal=True when there is no padding: the traced graph was about 2× slower per attention core
on the CPU at 2048 tokens, which hid every other rule's gain. This rule gives that path back
without losing padding support (kernels/causal_attention).

Before:  o = sdpa(q, k, v, attn_mask=causal_mask(attention_mask), scale)
After:   o = rewriter::causal_attention(q, k, v, causal_mask(attention_mask), scale)
GQA's repeat_kv copies go too: the op reads k/v at kv-heads width (enable_gqa), as eager HF's SDPA
call does without a mask.
Exact (both branches compute the same function on a plain causal mask); put it last in a recipe,
since the other rules look for the SDPA nodes it replaces.
"""
from __future__ import annotations

import torch

from rewriter import graph as G
from rewriter.report import projection_flops_per_token, sdpa_flops_per_token
from rewriter.rule import Candidate, Refused, Rule, StepOptions, register

import rewriter.kernels  # noqa: F401  (registers rewriter::causal_attention)

NAME = "causal_fastpath"


def check(c: Candidate, opts) -> str | None:
    site = c.site
    if site.mask not in ("causal", "causal+padding"):
        return f"the mask is {site.mask!r}, not causal: there is no fused causal kernel to switch to"
    return None


def _args(gm, site):
    sd = G.node(gm, site.node)
    return sd, G.sdpa_args(sd)


def build(ctx, c: Candidate, opts) -> dict:
    _, a = _args(ctx.gm, c.site)
    if not isinstance(a["attn_mask"], torch.fx.Node):
        raise Refused(f"SDPA gets no mask tensor (is_causal={a['is_causal']}): it already runs the fused path")
    if a["dropout_p"]:
        raise Refused(f"SDPA has dropout_p={a['dropout_p']}; the fused path is swapped in for eval graphs only")
    return {}


def apply(gm, c: Candidate, built, opts) -> None:
    site = c.site
    sd, a = _args(gm, site)
    k, v, gqa = G.gqa_kv(a["query"], a["key"], a["value"], bool(a["enable_gqa"]))
    args = (a["query"], k, v, a["attn_mask"], float(site.scale), gqa)
    G.replace_with_op(gm, sd, torch.ops.rewriter.causal_attention.default, args, rule=NAME, site=site.index)


def cost(site, opts):
    """Unchanged: the same projections and softmax attention core (the fused kernel skips only
    the masked upper triangle's work, which the FLOP model does not count either way)."""
    return projection_flops_per_token(site) + sdpa_flops_per_token(site)


register(Rule(
    name=NAME, paper="exact kernel swap (PyTorch SDPA's fused causal kernel); no paper", exact=True,
    options=StepOptions, check=check, build=build, apply=apply, cost=cost,
    summary="masked causal SDPA → the fused is_causal kernel whenever the batch has no padding (exact)"))
