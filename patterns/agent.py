"""Agent attention: softmax(QKᵀ)V → softmax(QAᵀ·s₂ + B₂)·softmax(AKᵀ·s₁ + B₁)V + c·V, n ≪ N agents.

Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024,
arXiv:2312.08874. The agents A are the queries average-
pooled into n windows over the real tokens (adaptive pooling; padding never enters an agent;
a prefix such as CLS can be kept out); n defaults to the paper's 49 and is capped at the
sequence length. Cost O(N·n·d) instead of O(N²·d).

Agent bias. The paper adds learned position biases B₁, B₂ (its "agent bias") to both
softmaxes. Training-free we use a fixed prior in their place (ours, not the paper's numbers):
B₂ = −β₂·(distance from token j to agent i's pooling window, in window widths), β₂ = 2 by
default, so each token leans on the agents pooled near it; with a short sample (n ≥ its
token count, one token per agent) the rewrite then tends to exact attention. On MiniLM's
held-out sentences at n = 16 this lifts mean embedding cos 0.976 → 0.983 (benchmarks/
bench_routed_models.py). `position_bias: 0` gives AgentSD's plain form (§5 of the paper: s₁ =
s₂ = the site's softmax scale, c = 0 here).

Short samples in a padded batch get min(n, real tokens) live agents and the rest are masked
(−inf in B₂), so a sentence's output does not depend on what it is batched with.

Optional calibration fits, per head, s₁, s₂, c and the bias slopes β₁, β₂ to the site's exact
attention output on calibration activations (relative MSE over real tokens, Adam; starts
from the training-free values, so it can only lower the calibration loss).

Causal sites are refused: every agent averages queries from the whole sequence, so each
output would read the future.

Before:  o = sdpa(q, k, v, padding_mask)
After:   A, live, dist = agent_windows(key_mask, n, prefix) pooled from q;  B₁, B₂ = agent_bias(...)
         o = rewriter::agent_attention(q, k, v, A, key_mask, s₁, s₂, B₁, B₂, c)
Approximate (no exact setting for n < N): the gate is mandatory.
"""
from __future__ import annotations

import sympy
import torch
from pydantic import Field

from rewriter import graph as G
from rewriter.kernels.agent_attention import agent_block
from rewriter.kernels.routed_attention import key_mask_from_attn_mask
from rewriter.report import N, projection_flops_per_token
from rewriter.rule import Rule, StepOptions, register

from . import _routing as R

PAPER = ('Han et al., "Agent Attention: On the Integration of Softmax and Linear Attention", ECCV 2024, '
         'arXiv:2312.08874')


class AgentOptions(StepOptions):
    agents: int = Field(49, ge=1, description="agent tokens n (capped at the sequence length)")
    prefix: int = Field(0, ge=0, description="leading real tokens kept out of the pooling (1 keeps CLS out)")
    scale1: float | None = Field(None, gt=0, description="training-free stage-1 temperature s₁ (agents → keys); "
                                 "default the site's softmax scale")
    scale2: float | None = Field(None, gt=0, description="training-free stage-2 temperature s₂ (queries → agents); "
                                 "default the site's softmax scale (AgentSD uses head_dim^-0.15)")
    shortcut: float = Field(0.0, description="training-free weight c of the c·V shortcut (AgentSD uses 0.075)")
    position_bias: float = Field(2.0, ge=0, description="training-free agent bias B₂ = −β·(distance from the token "
                                 "to the agent's pooling window, in window widths); 0 = AgentSD's form without it")
    calibrate: bool = Field(False, description="fit per-head s₁, s₂, c and a locality bias to the exact "
                            "attention output on calibration activations")
    locality: bool = Field(True, description="with calibrate: also fit the per-head agent-bias slopes β₁ (stage 1) "
                           "and β₂ (stage 2)")
    steps: int = Field(150, ge=1, description="Adam steps of the calibration fit")
    lr: float = Field(0.02, gt=0, description="Adam learning rate of the calibration fit")


def check(c, opts) -> str | None:
    site = c.site
    if site.mask in ("causal", "causal+padding"):
        return ("causal attention: pooled agents average queries from the whole sequence, so every output "
                "would read future tokens")
    return R.common_refusal(site)


def _fit(acts, names, site, opts, init: dict) -> dict:
    """Adam on per-head log s₁, log s₂, c (and β) against the exact output, relative MSE over real tokens."""
    params = {"log_s1": init["scale1"].log().clone(), "log_s2": init["scale2"].log().clone(),
              "shortcut": init["shortcut"].clone(), "beta": init["beta"].clone()}
    for name, p in params.items():
        p.requires_grad_(name != "beta" or opts.locality)
    opt = torch.optim.Adam([p for p in params.values() if p.requires_grad], lr=opts.lr)
    data = []
    for i in range(len(acts[names["q"]])):
        q, k, v, o = (acts[names[x]][i].float() for x in ("q", "k", "v", "out"))
        km = key_mask_from_attn_mask(acts[names["mask"]][i], q) if "mask" in names else None
        w = (km if km is not None else torch.ones(q.shape[0], q.shape[2], dtype=torch.bool))[:, None, :, None]
        data.append((q, k, v, km, o, w, (o.pow(2) * w).sum()))
    for _ in range(opts.steps):
        opt.zero_grad()
        loss = 0.0
        for q, k, v, km, o, w, norm in data:
            y = agent_block(q, k, v, km, params["log_s1"].exp(), params["log_s2"].exp(), params["shortcut"],
                            params["beta"], agents=opts.agents, prefix=opts.prefix, stage1_bias=opts.locality)
            loss = loss + ((y - o).pow(2) * w).sum() / norm
        loss.backward()
        opt.step()
    return {"scale1": params["log_s1"].exp().detach(), "scale2": params["log_s2"].exp().detach(),
            "shortcut": params["shortcut"].detach(), "beta": params["beta"].detach()}


def build(ctx, c, opts) -> dict:
    site = c.site
    H = site.heads
    built = {"scale1": torch.full((H,), opts.scale1 or site.scale),
             "scale2": torch.full((H,), opts.scale2 or site.scale),
             "shortcut": torch.full((H,), float(opts.shortcut)),
             "beta": torch.tensor([[0.0, opts.position_bias]]).repeat(H, 1)}      # [H, (β₁, β₂)]
    if not opts.calibrate:
        return built
    sd = G.node(ctx.gm, site.node)
    a = G.sdpa_args(sd)
    names = {"q": a["query"].name, "k": a["key"].name, "v": a["value"].name, "out": sd.name}
    if site.mask == "padding":
        names["mask"] = a["attn_mask"].name
    acts = ctx.capture(list(names.values()))
    return _fit(acts, names, site, opts, built)


def apply(gm, c, built, opts) -> None:
    site, built = c.site, built.tensors
    sd, q, k, v, key_mask, _ = R.site_tensors(gm, site)
    t = R.register_all(gm, sd, "agent_attention", site.index, built)
    G.replace_with_op(gm, sd, agent_block,
                      (q, k, v, key_mask, t["scale1"], t["scale2"], t["shortcut"], t["beta"]),
                      dict(agents=opts.agents, prefix=opts.prefix, stage1_bias=opts.calibrate and opts.locality),
                      rule="agent_attention", site=site.index)


def cost(site, opts):
    """Per token: stage 1 (n agents × N keys, scores + values) and stage 2 (N queries × n agents),
    2·2·n·d each per head, plus the c·V shortcut."""
    hd = site.heads * site.head_dim
    n = sympy.Min(opts.agents, N - opts.prefix)
    return projection_flops_per_token(site) + 8 * hd * n + 2 * hd


register(Rule(
    name="agent_attention", paper=PAPER, exact=False, options=AgentOptions,
    summary="agent attention: n pooled-query agents aggregate the values, then broadcast them back (O(N·n·d))",
    check=check, build=build, apply=apply, cost=cost, fits=lambda o: o.calibrate))
