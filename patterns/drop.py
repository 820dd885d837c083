"""Attention / block dropping by redundancy.

He et al., "What Matters in Transformers? Not All Attention is Needed", arXiv:2406.15786
(LLM-Drop).

Importance of a sublayer F with residual input X:  I = 1 − mean_tokens cos(X, X + F(X)).
The sublayers with the smallest I are the most redundant and are dropped first; each drop is
gated. Graph edit (drop_attention): the attention sublayer contributes nothing — the add where its
branch F (everything from the projections to the add: a norm of the branch, Swin's window reverse
and roll back) meets the rest is rewired to that add's other operand, so the whole attention
subgraph becomes dead and is removed. Where the analyzer found it (`rewriter.analyze`, the site's
extra["residual"]):

    sequential (pre-norm):        h = x + F(norm(x))            → h = x
    sandwich (Gemma 2/3, OLMo-2): h = x + norm'(F(norm(x)))     → h = x
    post-norm (BERT):             h = LN(x + F(x))              → h = LN(x)   (the LayerNorm stays)
    parallel (GPT-J, Falcon):     h = x + (MLP(n(x)) + F(n(x))) → h = x + MLP(n(x))  (the MLP stays;
                                  also written (x + MLP(n(x))) + F(n(x)))

drop_block removes the whole block: its output is rewired to its input (for a parallel block, the
residual add that ends it). Exact setting: none (every drop changes the function); the gate is
mandatory.
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


def _merge(site: AttentionSite) -> tuple[str, str, str]:
    """(add, its attention operand, its other operand): where dropping the attention cuts. The
    residual add itself in a sequential block (x + F → x); in a parallel block the add where the
    attention meets the other branch ((M + F) → M)."""
    r = site.extra.get("residual") or {}
    if r.get("merge"):
        return r["merge"], r["merge_branch"], r["merge_other"]
    return site.residual_add, site.branch_output, site.residual_input


def _now(gm, name: str, add: str, branch: str):
    """The node `name` — the other operand of the add `add` beside `branch` — as the graph has it now.
    A site's names are those of the graph it was analyzed on, and an earlier drop may have erased
    one: Whisper's cross-attention reads the stream at its block's self-attention residual add,
    which dropping that self-attention rewires to the block input. That add's other operand then is
    the value the stream now holds."""
    n = G.find(gm, name)
    if n is not None:
        return n
    a, b = G.node(gm, add), G.node(gm, branch)
    return a.args[1] if a.args[0] is b else a.args[0]


def _input(gm, site: AttentionSite):
    """The residual input x of `site` in the current graph."""
    return _now(gm, site.residual_input, site.residual_add, site.branch_output)


def _parallel(site: AttentionSite) -> bool:
    """Attention and MLP in parallel off one stream: the attention's sublayer output x + F is no graph
    value, and one add ends the block."""
    return (site.extra.get("residual") or {}).get("form") == "parallel"


def _block_output(gm, site: AttentionSite):
    """The node that ends the block holding `site`: the MLP's residual add (pre-norm), or the norm
    after it (post-norm). The MLP add may read the stream through a dtype cast (Llama). None if the
    block's MLP residual cannot be found."""
    post = site.norm == "post" and site.norm_node
    start = G.find(gm, site.norm_node if post else site.residual_add)
    if start is None or _parallel(site):       # attention and MLP in parallel: one add ends the block
        return start
    stream = [start] + [u for u in start.users if G.is_op(u, G.CASTS)]
    for s in stream:
        for u in s.users:
            if G.is_op(u, torch.ops.aten.add.Tensor) and s in u.args:
                return norm_output_after(u) if post else u
    return None


def _importance(ctx, sites: list[AttentionSite], end_of) -> dict[int, float]:
    """I = 1 − mean over valid calibration tokens of cos(X, sublayer output), one forward pass.
    `end_of(gm, site)` names the sublayer output, or (name, True) for a branch F whose sublayer
    output X + F is no graph value (parallel attention)."""
    ends = {s.index: end_of(ctx.gm, s) for s in sites}
    pairs = {i: (_input(ctx.gm, s).name, *(e if isinstance(e, tuple) else (e, False)))
             for s in sites for i, e in [(s.index, ends[s.index])]}
    names = sorted({n for x, y, _ in pairs.values() for n in (x, y) if n})

    def sums(b: dict, acts: dict) -> dict[int, tuple[float, float]]:   # per batch: one batch held at a time
        out = {}
        for idx, (x_name, y_name, plus_x) in pairs.items():
            x, y = acts[x_name], acts[y_name]
            y = x.double() + y.double().reshape(x.shape) if plus_x else y.double()
            cos = F.cosine_similarity(x.double(), y, dim=-1)          # [B, T]
            w = ctx.valid(b, x).to(cos.dtype)
            out[idx] = ((cos * w).sum().item(), w.sum().item())
        return out
    per = ctx.capture(names, reduce=sums)
    scores = {}
    for idx in pairs:
        num = den = 0.0
        for p in per:                      # in batch order, as the sums over batches always ran
            num += p[idx][0]
            den += p[idx][1]
        scores[idx] = 1.0 - num / den
    return scores


def _attention_end(gm, site: AttentionSite):
    """The attention sublayer's output x + F(x): the residual add, or F alone where it is parallel."""
    return (_merge(site)[1], True) if _parallel(site) else site.residual_add


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
        return {"mean": _mean_over_valid_tokens(ctx, _merge(c.site)[1])}
    return {}


def build_block(ctx, c: Candidate, opts) -> dict:
    if opts.compensate == "mean":
        end = _block_end_name(ctx.gm, c.site)
        shift = _mean_over_valid_tokens(ctx, end) - _mean_over_valid_tokens(ctx, _input(ctx.gm, c.site).name)
        return {"mean": shift}
    return {}


def _rewire_to_input(gm, end, site: AttentionSite, built: Built, keep=None) -> None:
    """Route the uses of `end` to `keep` (default: the block's residual input), plus the stored
    mean when compensating. An in-place `end` (Falcon's add_) is erased, and the later reads of
    the tensor it wrote read the replacement too."""
    x = keep if keep is not None else _input(gm, site)
    if "mean" in built.tensors:
        c = G.register_tensor(gm, G.buffer_name("drop", site.index, "mean"), built.tensors["mean"], before=end)
        with gm.graph.inserting_before(end):
            x = gm.graph.call_function(torch.ops.aten.add.Tensor, (x, c))
        x.meta["rewriter"] = {"rule": "drop", "site": site.index}
    end.replace_all_uses_with(x)
    if isinstance(end.target, torch._ops.OpOverload) and end.target._schema.is_mutable:
        written, after = end.args[0], False
        for n in list(gm.graph.nodes):
            if after and n is not x and written in n.all_input_nodes:
                n.replace_input_with(written, x)
            after = after or n is end
        gm.graph.erase_node(end)
    G.clean(gm)


def apply_attention(gm, c: Candidate, built: Built, opts) -> None:
    merge, branch, other = _merge(c.site)
    _rewire_to_input(gm, G.node(gm, merge), c.site, built, keep=_now(gm, other, merge, branch))


def apply_block(gm, c: Candidate, built: Built, opts) -> None:
    site = c.site
    end = _block_output(gm, site)
    if end is None:
        raise ValueError(f"site {site.index} ({site.module}): the block's MLP residual add was not found")
    _rewire_to_input(gm, end, site, built)


PAPER = 'He et al., "What Matters in Transformers? Not All Attention is Needed", arXiv:2406.15786'

register(Rule(
    name="drop_attention", paper=PAPER, exact=False, options=DropOptions,
    summary="remove redundant attention sublayers (x + Attn(x) → x; parallel: the MLP branch stays), "
    "least important first",
    check=check, build=build, apply=apply_attention, plan=_plan(_attention_end),
    cost=lambda site, opts: 0, kind="structure"))


def _block_end_name(gm, site: AttentionSite) -> str | None:
    end = _block_output(gm, site) if _refusal(site) is None else None
    return end.name if end is not None else None


register(Rule(
    name="drop_block", paper=PAPER, exact=False, options=DropOptions,
    summary="remove whole redundant transformer blocks (attention + MLP), least important first",
    check=check, build=build_block, apply=apply_block, plan=_plan(_block_end_name),
    cost=lambda site, opts: 0, kind="structure"))
