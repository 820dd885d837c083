"""Attention / block dropping by redundancy.

He et al., "What Matters in Transformers? Not All Attention is Needed", arXiv:2406.15786
(LLM-Drop, code: CASE-Lab-UMD/LLM-Drop).

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
from rewriter.rule import Rule, StepOptions, register
from rewriter.site import AttentionSite


_CASTS = (torch.ops.aten.to.dtype, torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype_layout)


class DropOptions(StepOptions):
    max_layers: int | None = Field(
        default=None, ge=1,
        description="Drop at most this many sublayers in this step; omitted = as many as the gate allows.")
    compensate: Literal["none", "mean"] = Field(
        default="none",
        description='"none": the paper\'s drop (x + F(x) → x); "mean": keep F\'s mean output over calibration '
        "tokens as a constant bias (x + F(x) → x + mean F), which removes the token mixing but keeps the "
        "average shift a post-norm LayerNorm was trained to see.")
    order: Literal["importance", "graph"] = Field(
        default="importance",
        description='"importance": least important first (LLM-Drop); "graph": in graph order.')


def check(site: AttentionSite, opts: DropOptions) -> str | None:
    if site.residual_add is None or site.residual_input is None:
        return "no residual add x + F(x) around this attention was found, so there is nothing to rewire to"
    return None


def _block_output(gm, site: AttentionSite):
    """The node that ends the block holding `site`: the MLP's residual add (pre-norm), or the norm
    after it (post-norm). The MLP add may read the stream through a dtype cast (Llama). None if the
    block's MLP residual cannot be found."""
    post = site.norm == "post" and site.norm_node
    start = G.find(gm, site.norm_node if post else site.residual_add)
    if start is None:
        return None
    stream = [start] + [u for u in start.users if u.target in _CASTS]
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
            m = b.get("attention_mask")
            w = m.to(cos.dtype) if isinstance(m, torch.Tensor) and m.shape == cos.shape else torch.ones_like(cos)
            num += (cos * w).sum().item()
            den += w.sum().item()
        scores[idx] = 1.0 - num / den
    return scores


def _plan(end_of):
    def plan(ctx, sites, opts):
        if opts.order == "graph":
            return sites
        usable = [s for s in sites if check(s, opts) is None and end_of(ctx.gm, s) is not None]
        scores = _importance(ctx, usable, end_of)
        for s in usable:
            ctx.info[s.index] = {"importance": round(scores[s.index], 6)}
        ranked = sorted(usable, key=lambda s: scores[s.index])
        return ranked + [s for s in sites if s not in usable]
    return plan


def _mean_over_valid_tokens(ctx, name: str) -> torch.Tensor:
    total, count = 0.0, 0.0
    for b, y in zip(ctx.batches, ctx.capture([name])[name]):
        m = b.get("attention_mask")
        w = m.to(y.dtype)[..., None] if isinstance(m, torch.Tensor) and m.shape == y.shape[:2] else torch.ones_like(y[..., :1])
        total = total + (y * w).sum(dim=tuple(range(y.dim() - 1)))
        count += w.sum().item()
    return (total / count).to(y.dtype)


def build(ctx, site, opts) -> dict:
    if opts.compensate == "mean":
        return {"mean": _mean_over_valid_tokens(ctx, site.branch_output)}
    return {}


def build_block(ctx, site, opts) -> dict:
    if opts.compensate == "mean":
        end = _block_end_name(ctx.gm, site)
        shift = _mean_over_valid_tokens(ctx, end) - _mean_over_valid_tokens(ctx, site.residual_input)
        return {"mean": shift}
    return {}


def _rewire_to_input(gm, end, site: AttentionSite, built: dict) -> None:
    x = G.node(gm, site.residual_input)
    if "mean" in built:
        c = G.register_tensor(gm, G.buffer_name("drop", site.index, "mean"), built["mean"], before=end)
        with gm.graph.inserting_before(end):
            x = gm.graph.call_function(torch.ops.aten.add.Tensor, (x, c))
        x.meta["rewriter"] = {"rule": "drop", "site": site.index}
    G.rewire(gm, end, x)


def apply_attention(gm, site: AttentionSite, built: dict, opts) -> None:
    _rewire_to_input(gm, G.node(gm, site.residual_add), site, built)


def apply_block(gm, site: AttentionSite, built: dict, opts) -> None:
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
    end = _block_output(gm, site) if check(site, None) is None else None
    return end.name if end is not None else None


register(Rule(
    name="drop_block", paper=PAPER, exact=False, options=DropOptions,
    summary="remove whole redundant transformer blocks (attention + MLP), least important first",
    check=check, build=build_block, apply=apply_block, plan=_plan(_block_end_name),
    cost=lambda site, opts: 0, kind="structure"))
