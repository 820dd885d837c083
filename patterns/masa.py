"""MASA: share attention projection weights across layers through a matrix dictionary.

Zhussip et al., "Share Your Attention: Transformer Weight Sharing via Matrix-based Dictionary
Learning", arXiv:2508.04581. Per projection type P ∈ {q, k, v, o} and per group of layers, S shared
matrix atoms D_s and per-layer coefficients: Ŵₗ = Σₛ cₗₛ D_s, fitted post hoc by matrix PCA (exact
when S = the group's layer count). Optional refinements, each inside the same gated decision:
a whitened rank-r residual per layer (Ŵₗ += Uₗ Vₗ, SVD-LLM, arXiv:2403.07378) and `distill`, which
trains atoms, coefficients and residuals so every projection's outputs on the calibration
activations match the original (ridge-regularized; see `_masa_math.distill`).

A group of layers is one decision: `plan` partitions the selected sites into groups (all, fixed
size, or `auto`: consecutive layers whose attention inputs drift little on calibration data) and
returns the first site of each group; its record's info lists the group and the parameter counts.

Before (each layer l):   y = linear(x, W_l, b_l)                      W_l: L dense [out, in] tensors
After:                   y = linear(x, view(mm(c_l, view(D, [S, out·in])), [out, in]) (+ mm(U_l, V_l)), b_l)
                         D: one [S, out, in] buffer per group and type; c_l: [S]; U_l, V_l: rank r
The dense weights become unused and are dropped, so the state dict (and a saved model) is smaller.
Exact setting: atoms = every layer of the group (1.0), residual_rank 0, no distill.
Biases, GQA's narrower k/v projections and GPT-2's fused Conv1D c_attn ([in, out] layout) are handled.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from rewriter import graph as G
from rewriter.report import projection_flops_per_token, sdpa_flops_per_token
from rewriter.rule import Rule, StepOptions, register
from rewriter.site import AttentionSite

from . import _masa_math as MM

aten = torch.ops.aten
PROJECTIONS = ("q", "k", "v", "o")


class DistillOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(100, ge=1, description="Adam steps on the full-batch output-matching loss")
    lr: float = Field(3e-2, gt=0, description="Adam learning rate, in units of each tensor's initial RMS "
                      "(3e-2 chosen on MiniLM q/v: 100 steps reach the 300-step loss of lr 1e-2)")
    ridge: float = Field(0.5, ge=0, description="ridge weight, relative to the mean input energy per "
                         "direction; 0 is plain least squares (can blow up unused input directions)")
    # ridge 0.5: MiniLM S=4/6 + residual 16, held-out embedding cos 0.941 vs 0.917 at ridge 0.05 (which
    # overfits the calibration moments: lower calibration error, worse held-out) and 0.939 without distill


class MasaOptions(StepOptions):
    projections: list[Literal["q", "k", "v", "o"]] = Field(
        default=["q", "k", "v", "o"], min_length=1,
        description="projection types that get shared atoms (each its own dictionary)")
    atoms: int | float = Field(
        default=0.5, description="atoms S per group: an int (at most the group's layer count) or a fraction "
        "in (0, 1] of the group's layer count (rounded, at least 1). S = all layers is exact.")
    groups: Literal["all", "auto"] | int = Field(
        default="all", description='"all": one dictionary over the selected layers; an int: consecutive '
        'groups of that many layers; "auto": consecutive layers whose attention inputs drift less than '
        "`drift` from the group's first layer on calibration data (MASA's grouping)")
    drift: float = Field(
        default=0.3, gt=0, le=2, description='groups="auto": start a new group when 1 − mean token cosine '
        "between a layer's attention input and the group's first layer's exceeds this")
    residual_rank: int = Field(
        default=0, ge=0, description="rank of the per-layer whitened residual Uₗ Vₗ (SVD-LLM); 0 = none")
    distill: DistillOptions | None = Field(
        default=None, description="train atoms, coefficients and residuals to match each projection's "
        "outputs on calibration activations ({steps, lr, ridge}); null = training-free")

    @field_validator("atoms")
    @classmethod
    def _atoms(cls, v):
        if isinstance(v, float) and not 0 < v <= 1:
            raise ValueError(f"atoms as a fraction must be in (0, 1], got {v}")
        if isinstance(v, int) and v < 1:
            raise ValueError(f"atoms as a count must be >= 1, got {v}")
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v):
        if isinstance(v, int) and v < 2:
            raise ValueError(f"groups as a size must be >= 2 (one layer has nothing to share), got {v}")
        return v


def check(site: AttentionSite, opts: MasaOptions) -> str | None:
    missing = [p for p in opts.projections if getattr(site, f"{p}_weight") is None]
    if missing:
        return f"no {'/'.join(missing)} projection weight was found for this attention, so there is nothing to share"
    return None


# ---- groups --------------------------------------------------------------------------------------

def _layer_key(s: AttentionSite) -> int:
    return s.layer if s.layer is not None else s.index


def _consumer(gm, qual: str):
    """(weight get_attr node, the op using it, its activation input, stored layout is [in, out])."""
    w = next((n for n in gm.graph.nodes if n.op == "get_attr" and n.target == qual), None)
    if w is None:
        raise ValueError(f"weight {qual!r} is no longer read by the graph (rewritten by an earlier step?)")
    for u in w.users:
        if G.is_op(u, aten.linear.default) and u.args[1] is w:
            return w, u, u.args[0], False
        if G.is_op(u, aten.addmm.default) and u.args[2] is w:
            return w, u, u.args[1], True
        if G.is_op(u, aten.mm.default, aten.matmul.default) and u.args[1] is w:
            return w, u, u.args[0], True
    raise ValueError(f"weight {qual!r} is not used as linear/addmm/mm(x, W); users: {[u.name for u in w.users]}")


def _tensor(gm, qual: str) -> torch.Tensor:
    prefix, _, leaf = qual.rpartition(".")
    return getattr(gm.get_submodule(prefix) if prefix else gm, leaf)


def _masks(ctx) -> list:
    return [b.get("attention_mask") for b in ctx.batches]


def _auto_groups(ctx, sites: list[AttentionSite], drift: float) -> list[list[AttentionSite]]:
    names = [_consumer(ctx.gm, s.q_weight or s.o_weight)[2].name for s in sites]
    acts = ctx.capture(sorted(set(names)))
    groups, start = [[sites[0]]], 0
    for i in range(1, len(sites)):
        num = den = 0.0
        for m, a, b in zip(_masks(ctx), acts[names[start]], acts[names[i]]):
            cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
            w = m.to(cos.dtype) if isinstance(m, torch.Tensor) and m.shape == cos.shape else torch.ones_like(cos)
            num, den = num + (cos * w).sum().item(), den + w.sum().item()
        if 1 - num / den > drift:
            groups.append([])
            start = i
        groups[-1].append(sites[i])
    return groups


def _groups(ctx, sites, opts) -> list[list[AttentionSite]]:
    sites = sorted(sites, key=_layer_key)
    if opts.groups == "all":
        return [sites]
    if opts.groups == "auto":
        return _auto_groups(ctx, sites, opts.drift)
    return [sites[i:i + opts.groups] for i in range(0, len(sites), opts.groups)]


def _n_atoms(opts, n_layers: int) -> int:
    return max(1, round(opts.atoms * n_layers)) if isinstance(opts.atoms, float) else opts.atoms


def _members(group: list[AttentionSite], projections) -> dict[str, list[str]]:
    """{label: [weight qualified name per layer]}; a fused weight (GPT-2 c_attn) is one label, "qkv"."""
    out: dict[str, list[str]] = {}
    for s in group:
        names = {p: getattr(s, f"{p}_weight") for p in PROJECTIONS}
        for p in projections:
            label = "".join(t for t in PROJECTIONS if names[t] == names[p])
            if names[p] not in out.get(label, []):
                out.setdefault(label, []).append(names[p])
    return out


def plan(ctx, sites, opts):
    usable = [s for s in sites if check(s, opts) is None]
    groups = _groups(ctx, usable, opts) if usable else []
    state = ctx.__dict__.setdefault("masa_groups", {})   # plan → build, for this step's groups
    for g in groups:
        S = _n_atoms(opts, len(g))
        before = after = 0
        for label, quals in _members(g, opts.projections).items():
            shape = _tensor(ctx.gm, quals[0]).shape
            P = shape.numel()
            before += len(quals) * P
            after += S * P + len(quals) * S + len(quals) * min(opts.residual_rank, *shape) * sum(shape)
        info = {"group": [s.index for s in g], "layers": [_layer_key(s) for s in g], "atoms": S,
                "attn_proj_params_before": before, "attn_proj_params_after": after}
        ctx.info[g[0].index] = info
        state[g[0].index] = (g, info)   # the same dict object the record keeps: build adds fit errors
    return [g[0] for g in groups] + [s for s in sites if s not in usable]


# ---- build / apply -------------------------------------------------------------------------------

def build(ctx, site, opts) -> dict:
    planned = ctx.__dict__.get("masa_groups", {}).pop(site.index, None)
    group, info = planned if planned else (next(g for g in _groups(
        ctx, [s for s in ctx.sites if opts.selects(s) and check(s, opts) is None], opts) if site in g), {})
    S = _n_atoms(opts, len(group))
    if len(group) < 2:
        raise ValueError(f"layer {_layer_key(site)} forms a group of one layer: nothing to share "
                         "(select more layers, or use a larger groups size / drift)")
    if S > len(group):
        raise ValueError(f"atoms={S} exceeds the {len(group)} layers of group {[_layer_key(s) for s in group]} "
                         "(with groups, give atoms as a fraction, e.g. 0.67)")
    calibrated = opts.residual_rank > 0 or opts.distill is not None
    members = _members(group, opts.projections)
    found = {q: _consumer(ctx.gm, q) for quals in members.values() for q in quals}
    acts = ctx.capture(sorted({f[2].name for f in found.values()})) if calibrated else {}
    built, fit = {}, {}
    for label, quals in members.items():
        transposed = found[quals[0]][3]
        Ws = [_tensor(ctx.gm, q) for q in quals]
        if len({w.shape for w in Ws}) > 1:
            raise ValueError(f"{label} weights differ in shape across layers {[_layer_key(s) for s in group]}: "
                             f"{sorted({tuple(w.shape) for w in Ws})}; split them into separate groups")
        W = torch.stack([w.detach() for w in Ws])
        W = W.transpose(-1, -2) if transposed else W                          # [L, out, in]
        D, C = MM.matrix_pca(W, S)
        U = V = None
        if calibrated:
            M = torch.stack([MM.second_moment(acts[found[q][2].name], _masks(ctx)) for q in quals])
            fit[f"{label}.pca"] = MM.weighted_error(W, MM.reconstruct(D, C), M).mean().item()
        if opts.residual_rank:
            E = W - MM.reconstruct(D, C)
            U, V = map(torch.stack, zip(*(MM.whitened_residual(E[l], M[l], opts.residual_rank) for l in range(len(quals)))))
            fit[f"{label}.residual"] = MM.weighted_error(W, MM.reconstruct(D, C, U, V), M).mean().item()
        if opts.distill is not None:
            d = opts.distill
            t, _ = MM.distill(W, M, D, C, U, V, steps=d.steps, lr=d.lr, ridge=d.ridge)
            D, C, U, V = t["atoms"], t["coef"], t.get("left"), t.get("right")
            fit[f"{label}.distill"] = MM.weighted_error(W, MM.reconstruct(D, C, U, V), M).mean().item()
        built[f"{label}.atoms"] = (D.transpose(-1, -2) if transposed else D).contiguous()
        for l, q in enumerate(quals):
            built[f"{label}.coef.{q}"] = C[l].contiguous()
            if U is not None:   # stored layout: E = left @ right
                left, right = (V[l].T, U[l].T) if transposed else (U[l], V[l])
                built[f"{label}.left.{q}"], built[f"{label}.right.{q}"] = left.contiguous(), right.contiguous()
    if fit:
        info["relative_output_error"] = {k: round(v, 6) for k, v in fit.items()}   # lands in the record
    return built


def apply(gm, site: AttentionSite, built: dict, opts) -> None:
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    prov = {"rule": "masa", "site": site.index}

    def call(op, *args):
        n = gm.graph.call_function(op, args)
        n.meta["rewriter"] = prov
        return n

    for label in sorted(k[:-len(".atoms")] for k in built if k.endswith(".atoms")):
        D = built[f"{label}.atoms"]
        S, shape = D.shape[0], list(D.shape[1:])
        quals = [k[len(f"{label}.coef."):] for k in built if k.startswith(f"{label}.coef.")]
        weights = {q: _consumer(gm, q)[0] for q in quals}
        firsts = {q: min(w.users, key=order.__getitem__) for q, w in weights.items()}
        first = min(firsts.values(), key=order.__getitem__)
        atoms = G.register_tensor(gm, G.buffer_name("masa", site.index, f"{label}_atoms"), D, before=first)
        with gm.graph.inserting_before(first):
            flat = call(aten.view.default, atoms, [S, D[0].numel()])               # [S, out·in]
        for q, w in weights.items():
            key = G.buffer_name("masa", site.index, q)
            c = G.register_tensor(gm, f"{key}_coef", built[f"{label}.coef.{q}"].view(1, S), before=firsts[q])
            with gm.graph.inserting_before(firsts[q]):
                new = call(aten.view.default, call(aten.mm.default, c, flat), shape)   # Σ_s c_s D_s
                if f"{label}.left.{q}" in built:
                    u = G.register_tensor(gm, f"{key}_left", built[f"{label}.left.{q}"], before=firsts[q])
                    v = G.register_tensor(gm, f"{key}_right", built[f"{label}.right.{q}"], before=firsts[q])
                    new = call(aten.add.Tensor, new, call(aten.mm.default, u, v))    # + U V
            new.meta["val"] = w.meta.get("val")
            w.replace_all_uses_with(new)
            gm.graph.erase_node(w)


def cost(site: AttentionSite, opts) -> object:
    """A memory rewrite: per-token FLOPs are unchanged (Ŵ is rebuilt once per call, not per token)."""
    return sdpa_flops_per_token(site) + projection_flops_per_token(site)


register(Rule(
    name="masa", paper='Zhussip et al., "Share Your Attention: Transformer Weight Sharing via Matrix-based '
    'Dictionary Learning", arXiv:2508.04581', exact=False, options=MasaOptions,
    summary="share q/k/v/o weights across layers: Ŵₗ = Σₛ cₗₛ Dₛ (+ whitened low-rank residual), by matrix PCA",
    check=check, build=build, apply=apply, plan=plan, cost=cost, kind="memory"))
