"""Attention / block dropping by redundancy.

He et al., "What Matters in Transformers? Not All Attention is Needed", arXiv:2406.15786
(LLM-Drop).

Importance of a sublayer F with residual input X:  I = 1 − mean_tokens cos(X, X + F(X)).
The sublayers with the smallest I are the most redundant and are dropped first; each drop is
gated. Graph edit (drop_attention): the residual add `X + F(X)` is rewired to `X`, so the whole
attention subgraph (projections, SDPA, output projection) becomes dead and is removed. In a
post-norm model (BERT) the LayerNorm after the add stays: only F's contribution is removed.
drop_block removes the whole block: its output is rewired to its input.

Before (pre-norm):  h = x + o_proj(sdpa(q(norm(x)), k(norm(x)), v(norm(x))))
After:              h = x
Exact setting: none (every drop changes the function); the gate is mandatory.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from rewriter import graph as G
from rewriter.analyze import norm_output_after
from rewriter.rule import Built, Candidate, Rule, StepOptions, one_per_site, register
from rewriter.site import AttentionSite


class DropOptions(StepOptions):
    compensate: Literal["none", "mean"] = Field(
        default="none",
        description='"none": the paper\'s drop (x + F(x) → x); "mean": keep F\'s mean output over calibration '
        "tokens as a constant bias (x + F(x) → x + mean F), which removes the token mixing but keeps the "
        "average shift a post-norm LayerNorm was trained to see.")
    order: Literal["importance", "graph", "damage"] = Field(
        default="importance",
        description='"importance": least important first (LLM-Drop); "graph": in graph order; "damage": '
        "least damaging first, measured by the driver (each drop applied alone).")


def _refusal(site: AttentionSite) -> str | None:
    if site.residual_add is None or site.residual_input is None:
        return "no residual add x + F(x) around this attention was found, so there is nothing to rewire to"
    return None


def check(c: Candidate, opts: DropOptions) -> str | None:
    return _refusal(c.site)


def _block_output(gm, site: AttentionSite):
    """The node that ends the block holding `site`: the MLP's residual add (pre-norm), or the norm
    after it (post-norm). The MLP add may read the stream through a dtype cast (Llama). None if the
    block's MLP residual cannot be found."""
    post = site.norm == "post" and site.norm_node
    start = G.find(gm, site.norm_node if post else site.residual_add)
    if start is None:
        return None
    stream = [start] + [u for u in start.users if G.is_op(u, G.CASTS)]
    for s in stream:
        for u in s.users:
            if G.is_op(u, torch.ops.aten.add.Tensor) and s in u.args:
                return norm_output_after(u) if post else u
    return None


def _importance(ctx, sites: list[AttentionSite], end_of) -> dict[int, float]:
    """I = 1 − mean over valid calibration tokens of cos(X, sublayer output), one forward pass."""
    pairs = {s.index: (s.residual_input, end_of(ctx.gm, s)) for s in sites}
    names = sorted({n for p in pairs.values() for n in p if n})
    acts = ctx.capture(names)
    scores = {}
    for idx, (x_name, y_name) in pairs.items():
        num = den = 0.0
        for b, x, y in zip(ctx.batches, acts[x_name], acts[y_name]):
            cos = F.cosine_similarity(x.double(), y.double(), dim=-1)          # [B, T]
            w = ctx.valid(b, x).to(cos.dtype)
            num += (cos * w).sum().item()
            den += w.sum().item()
        scores[idx] = 1.0 - num / den
    return scores


def _plan(end_of):
    def plan(ctx, sites, opts) -> list[Candidate]:
        if opts.order != "importance":
            return one_per_site(ctx, sites, opts)
        usable = [s for s in sites if _refusal(s) is None and end_of(ctx.gm, s) is not None]
        scores = _importance(ctx, usable, end_of)
        ranked = sorted(usable, key=lambda s: scores[s.index])
        return ([Candidate((s,), {"importance": round(scores[s.index], 6)}) for s in ranked]
                + one_per_site(ctx, [s for s in sites if s not in usable], opts))
    return plan


def _mean_over_valid_tokens(ctx, name: str) -> torch.Tensor:
    total, count = 0.0, 0.0
    for b, y in zip(ctx.batches, ctx.capture([name])[name]):
        w = ctx.valid(b, y).to(y.dtype)[..., None]
        total = total + (y * w).sum(dim=tuple(range(y.dim() - 1)))
        count += w.sum().item()
    return (total / count).to(y.dtype)


def build(ctx, c: Candidate, opts) -> dict:
    if opts.compensate == "mean":
        return {"mean": _mean_over_valid_tokens(ctx, c.site.branch_output)}
    return {}


def build_block(ctx, c: Candidate, opts) -> dict:
    if opts.compensate == "mean":
        end = _block_end_name(ctx.gm, c.site)
        shift = _mean_over_valid_tokens(ctx, end) - _mean_over_valid_tokens(ctx, c.site.residual_input)
        return {"mean": shift}
    return {}


def _rewire_to_input(gm, end, site: AttentionSite, built: Built) -> None:
    x = G.node(gm, site.residual_input)
    if "mean" in built.tensors:
        c = G.register_tensor(gm, G.buffer_name("drop", site.index, "mean"), built.tensors["mean"], before=end)
        with gm.graph.inserting_before(end):
            x = gm.graph.call_function(torch.ops.aten.add.Tensor, (x, c))
        x.meta["rewriter"] = {"rule": "drop", "site": site.index}
    G.rewire(gm, end, x)


def apply_attention(gm, c: Candidate, built: Built, opts) -> None:
    _rewire_to_input(gm, G.node(gm, c.site.residual_add), c.site, built)


def apply_block(gm, c: Candidate, built: Built, opts) -> None:
    site = c.site
    end = _block_output(gm, site)
    if end is None:
        raise ValueError(f"site {site.index} ({site.module}): the block's MLP residual add was not found")
    _rewire_to_input(gm, end, site, built)


PAPER = 'He et al., "What Matters in Transformers? Not All Attention is Needed", arXiv:2406.15786'

register(Rule(
    name="drop_attention", paper=PAPER, exact=False, options=DropOptions,
    summary="remove redundant attention sublayers (x + Attn(x) → x), least important first",
    check=check, build=build, apply=apply_attention, plan=_plan(lambda gm, s: s.residual_add),
    cost=lambda site, opts: 0, kind="structure"))


def _block_end_name(gm, site: AttentionSite) -> str | None:
    end = _block_output(gm, site) if _refusal(site) is None else None
    return end.name if end is not None else None


register(Rule(
    name="drop_block", paper=PAPER, exact=False, options=DropOptions,
    summary="remove whole redundant transformer blocks (attention + MLP), least important first",
    check=check, build=build_block, apply=apply_block, plan=_plan(_block_end_name),
    cost=lambda site, opts: 0, kind="structure"))
