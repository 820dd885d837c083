"""Linear attention by attention transfer: softmax(s·QKᵀ)V → φ(Q)(φ(K)ᵀV) / φ(Q)(φ(K)ᵀ1).

Katharopoulos et al., "Transformers are RNNs", ICML 2020, arXiv:2006.16236 (linear attention,
φ = elu + 1); Zhang et al., "The Hedgehog & the Porcupine", ICLR 2024, arXiv:2402.04347 (learned
softmax feature maps, attention transfer); Zhang et al., "LoLCATs", arXiv:2410.10254 (sliding
window of exact softmax beside the linear part, one shared normalizer, learned mixing weight).

The model stays frozen. For each site, in graph order (each calibrated on the outputs of the sites
already converted), `build` captures the SDPA's q, k, v and its output on the calibration batches
and fits the per-head feature maps (and the window's mixing weight) so that the new attention
reproduces that layer's softmax weights and output (`loss`: Hedgehog's attention-weight KL, LoLCATs'
output MSE, or both; patterns/_feature_maps.py). `elu1` has nothing to fit and is
the training-free swap. `order: damage` (or `layers: auto`) has the driver fit and apply every
site alone on the current model first, and convert them least damaging first; every site is gated.

Before:  o = sdpa(q, k, v, mask, scale)
After:   fq = cat(softmax(q·Wq + bq), softmax(−(q·Wq + bq)))        (hedgehog; elu1: elu(q) + 1;
         fk = cat(softmax(k·Wk + bk), softmax(−(k·Wk + bk)))         the graph: one softmax of stack(z, −z))
         km = key_valid(mask)         (real keys [B, Tk]: some query row may attend; rewriter.kernels.keymask)
         o  = rewriter::linear_attention(fq, fk, v, km, causal, eps)
           or rewriter::hybrid_window_attention(q, k, v, fq, fk, window, scale, mix, km, eps)
Exact setting: `window` ≥ the sequence length (causal models): the linear part is empty and the
hybrid is exact softmax attention. Otherwise approximate: the gate decides.
"""
from __future__ import annotations

from typing import Literal

import sympy
import torch
from pydantic import Field

from rewriter import graph as G
from rewriter.kernels.keymask import key_valid
from rewriter.report import projection_flops_per_token
from rewriter.rule import Built, Candidate, Rule, StepOptions, register
from rewriter.site import AttentionSite

from ._feature_maps import Sample, transfer
from ._routing import shared_key_valid

aten = torch.ops.aten
NAME = "linear_attention"


class LinearOptions(StepOptions):
    feature_map: Literal["hedgehog", "elu1"] = Field(
        default="hedgehog", description='"hedgehog": learned [softmax(xW+b), softmax(−(xW+b))] per head, '
        'fitted by attention transfer; "elu1": elu(x)+1, training-free.')
    feature_dim: int | None = Field(
        default=None, ge=1, description="hedgehog projection width f per head (φ has 2f features); "
        "default: the head dim.")
    window: int | None = Field(
        default=None, ge=1, description="causal models only: exact softmax over the last `window` keys "
        "plus linear attention over the earlier ones, one normalizer, learned mixing weight (LoLCATs: 64).")
    steps: int = Field(default=300, ge=0, description="Adam steps of attention transfer per site "
                       "(one minibatch per step: about a calibration batch's real tokens, padding dropped).")
    lr: float = Field(default=1e-2, gt=0, description="Adam learning rate (LoLCATs: 1e-2).")
    loss: Literal["output", "weights", "both"] = Field(
        default="both", description='attention-transfer loss: "output": relative MSE of the attention '
        'outputs (LoLCATs); "weights": KL between the softmax and the rewritten attention weights '
        '(Hedgehog\'s soft-label cross-entropy); "both": their sum.')
    eps: float = Field(default=1e-6, gt=0, description="added to the linear attention normalizer.")


# ---- check ---------------------------------------------------------------------------------------

def check(c: Candidate, opts: LinearOptions) -> str | None:
    site = c.site
    if site.mask == "arbitrary":
        return ("the attention mask is neither padding nor causal; linear attention can only drop padded "
                "keys and apply causality by prefix sums")
    causal = site.mask in ("causal", "causal+padding")
    if opts.window is not None and not causal:
        return f"window={opts.window} needs a causal model (the softmax window looks back only); this site's mask is {site.mask!r}"
    return None


# ---- build: attention transfer on captured activations -------------------------------------------

def _samples(ctx, site: AttentionSite) -> list[Sample]:
    a = G.sdpa_args(G.node(ctx.gm, site.node))
    names = [a["query"].name, a["key"].name, a["value"].name, site.node]
    if a["attn_mask"] is not None:
        names.append(a["attn_mask"].name)
    acts = ctx.capture(names)
    out = []
    for i in range(len(ctx.batches)):
        q, k, v, y = (acts[n][i].float() for n in names[:4])
        mask = acts[names[4]][i] if len(names) > 4 else None
        out.append(Sample(q, k, v, key_valid(mask, q.shape[0]), y))
    return out


def _fit(ctx, site: AttentionSite, opts: LinearOptions) -> tuple[dict, dict]:
    samples = _samples(ctx, site)
    d = samples[0].q.shape[-1]
    params, info = transfer(
        samples, feature_map=opts.feature_map, feature_dim=opts.feature_dim or d,
        causal=site.mask in ("causal", "causal+padding"), window=opts.window, scale=site.scale,
        eps=opts.eps, steps=opts.steps, lr=opts.lr, seed=site.index, loss=opts.loss,
        label=f"{NAME} site {site.index} ({site.module})")
    return {k: v.to(_dtype(ctx, site)).contiguous() for k, v in params.items()}, info


def _dtype(ctx, site: AttentionSite) -> torch.dtype:
    val = G.sdpa_args(G.node(ctx.gm, site.node))["query"].meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else torch.float32


def build(ctx, c: Candidate, opts: LinearOptions) -> Built:
    return Built(*_fit(ctx, c.site, opts))


# ---- apply: the graph edit -----------------------------------------------------------------------

def apply(gm, c: Candidate, built: Built, opts: LinearOptions) -> None:
    site, built = c.site, built.tensors
    sdpa = G.node(gm, site.node)
    a = G.sdpa_args(sdpa)
    q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
    g = gm.graph
    meta = {key: sdpa.meta[key] for key in ("nn_module_stack", "stack_trace") if key in sdpa.meta}

    def op(target, *args):
        with g.inserting_before(sdpa):
            n = g.call_function(target, args)
        n.meta.update(meta)
        n.meta["rewriter"] = {"rule": NAME, "site": site.index}
        return n

    def buf(key):
        return G.register_tensor(gm, G.buffer_name(NAME, site.index, key), built[key], before=sdpa)

    def phi(x, side):
        if opts.feature_map == "elu1":
            return op(aten.add.Tensor, op(aten.elu.default, x), 1.0)
        z = op(aten.add.Tensor, op(aten.matmul.default, x, buf(f"w{side}")), buf(f"b{side}"))   # [B, H, T, f]
        # [z, −z] stacked [.., 2, f], ONE softmax over f, flattened to [.., 2f]: the same φ as two
        # softmaxes and a cat, two passes over memory fewer (MiniLM's q at 1×512: 5.5 → 2.0 ms per layer)
        zz = op(aten.stack.default, [z, op(aten.neg.default, z)], -2)
        return op(aten.flatten.using_ints, op(aten.softmax.int, zz, -1), -2, -1)

    fq, fk = phi(q, "q"), phi(k, "k")
    km = None
    if mask is not None:          # the calibration's reading of the mask, as a graph node (kernels code),
        km = shared_key_valid(gm, sdpa, mask, q, NAME, site.index)      # [B, Tk]; one per mask node
    causal = site.mask in ("causal", "causal+padding")
    if opts.window is not None:
        args = (q, k, v, fq, fk, opts.window, float(site.scale), buf("mix"), km, opts.eps)
        G.replace_with_op(gm, sdpa, torch.ops.rewriter.hybrid_window_attention.default, args, rule=NAME, site=site.index)
    else:
        args = (fq, fk, v, km, causal, opts.eps)
        G.replace_with_op(gm, sdpa, torch.ops.rewriter.linear_attention.default, args, rule=NAME, site=site.index)


# ---- cost: attention FLOPs per token after the rewrite (report.N-free: linear in N overall) --------

CHUNK = 64   # the causal kernels' chunk length (kernels/linear_attention/cpu.py CHUNK)


def cost(site: AttentionSite, opts: LinearOptions) -> sympy.Expr:
    """Per token: the q/k/v/o projections (unchanged) + the feature maps (2·d·f per head for q and for
    k) + the linear attention core: state update φ(k)ᵀv (2·F·Dv per kv head) and read-out φ(q)ᵀS,
    φ(q)ᵀz (2·F·Dv + 2·F per head), F = 2f (hedgehog) or d (elu1). Causal adds the chunked form's
    intra-chunk terms, 2·C·(F + Dv) per head with C = 64; a window adds the softmax over W keys,
    4·W·d per head. None of it grows with N."""
    H, d = site.heads, site.head_dim
    Hk = H if site.extra.get("gqa_repeat") else site.kv_heads    # k/v reach the SDPA repeated (HF llama)
    f = opts.feature_dim or d
    F_ = 2 * f if opts.feature_map == "hedgehog" else d
    maps = 2 * d * f * (H + Hk) if opts.feature_map == "hedgehog" else 0
    core = 2 * F_ * d * Hk + (2 * F_ * d + 2 * F_) * H
    if site.mask in ("causal", "causal+padding"):
        core += 2 * CHUNK * (F_ + d) * H
    if opts.window is not None:
        core += 4 * opts.window * d * H
    return projection_flops_per_token(site) + sympy.Integer(maps + core)


register(Rule(
    name=NAME, paper='Katharopoulos et al., arXiv:2006.16236; Zhang et al. "Hedgehog", arXiv:2402.04347; '
    'Zhang et al. "LoLCATs", arXiv:2410.10254', exact=False, options=LinearOptions,
    summary="softmax attention → linear attention with feature maps fitted by attention transfer "
            "(optionally + a sliding softmax window)",
    check=check, build=build, apply=apply, cost=cost, fits=lambda o: o.steps > 0))
