"""MASA: share attention projection weights across layers through a matrix dictionary.

Zhussip et al., "Share Your Attention: Transformer Weight Sharing via Matrix-based Dictionary
Learning", arXiv:2508.04581. Per projection type P ∈ {q, k, v, o} and per group of layers, S shared
matrix atoms D_s and per-layer coefficients: Ŵₗ = Σₛ cₗₛ D_s, fitted post hoc by matrix PCA (exact
when S = the group's layer count) — the paper's training-free variant. Optional refinements, each
inside the same gated decision: a whitened rank-r residual per layer (Ŵₗ += Uₗ Vₗ, SVD-LLM,
arXiv:2403.07378) and `distill`, which trains atoms, coefficients and residuals so every
projection's outputs on the calibration activations match the original (ridge-regularized; see
`_masa_math.distill`).

Ours (not in the paper): `reduction` (a parameter budget for the whole group, spent greedily on
residual ranks by relative output error removed per parameter across layers and types, with layers
that would need a full-size factorization kept dense; `_masa_math.allocate_ranks`), per-type atom
counts (0 = no dictionary, low-rank only), `fit: whitened` (`_masa_math.whitened_pca`), and the
ridge in `distill`. Measured (benchmarks/bench_masa.py): the layers' weights are nearly orthogonal,
so the allocation, not the sharing, carries the accuracy at a 20 % cut (README, MASA section).

A group of layers is one decision: `plan` partitions the selected sites into groups (all, fixed
size, or `auto`: consecutive layers whose attention inputs drift little on calibration data), each
within one role (an encoder-decoder's encoder self-, decoder self- and cross-attentions never share)
and returns one Candidate per group (its sites: the group's layers; its facts: the group and the
parameter counts); the record names every layer of the group.

Before (each layer l):   y = linear(x, W_l, b_l)                      W_l: L dense [out, in] tensors
After:                   y = linear(x, view(mm(c_l, view(D, [S, out·in])), [out, in]) (+ mm(U_l, V_l)), b_l)
                         D: one [S, out, in] buffer per group and type; c_l: [S]; U_l, V_l: rank r_l
                         (with `reduction`: r_l per layer and type; S = 0: Ŵ_l = U_l V_l; a layer kept
                         dense is left as it was)
The dense weights become unused and are dropped, so the state dict (and a saved model) is smaller.
Exact setting: atoms = every layer of the group (1.0), residual_rank 0, no distill.
Biases, GQA's narrower k/v projections and GPT-2's fused Conv1D c_attn ([in, out] layout) are handled.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rewriter import graph as G
from rewriter.report import projection_flops_per_token, sdpa_flops_per_token
from rewriter.rule import Built, Candidate, Rule, StepOptions, one_per_site, register
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
    atoms: int | float | dict[Literal["q", "k", "v", "o"], int | float] = Field(
        default=0.5, description="atoms S per group: an int (at most the group's layer count) or a fraction "
        "in (0, 1] of the group's layer count (rounded, at least 1). S = all layers is exact. A dict gives "
        "each projection type its own S (e.g. {q: 3, k: 3, v: 4, o: 4}); there 0 means no dictionary for "
        "that type, only the per-layer whitened low-rank term (SVD-LLM), which needs `reduction`.")
    fit: Literal["pca", "whitened"] = Field(
        default="pca", description='how the atoms are fitted: "pca" is the paper\'s matrix PCA (min ‖W − Ŵ‖_F); '
        '"whitened" (ours) is the matrix PCA in one group-shared whitened input space (min Σₗ output error), '
        "then per-layer least-squares coefficients in each layer's own input statistics. Measured on MiniLM "
        "(20 % cut with `reduction`): whitened atoms held-out cos 0.875 vs 0.986 for pca, so pca stays the default")
    groups: Literal["all", "auto"] | int = Field(
        default="all", description='"all": one dictionary over the selected layers of each role (encoder '
        'self-, decoder self- and cross-attention are three); an int: consecutive '
        'groups of that many layers; "auto": consecutive layers whose attention inputs drift less than '
        "`drift` from the group's first layer on calibration data (MASA's grouping)")
    drift: float = Field(
        default=0.3, gt=0, le=2, description='groups="auto": start a new group when 1 − mean token cosine '
        "between a layer's attention input and the group's first layer's exceeds this")
    residual_rank: int = Field(
        default=0, ge=0, description="rank of the per-layer whitened residual Uₗ Vₗ (SVD-LLM), the same "
        "for every layer; 0 = none. Exclusive with `reduction`.")
    reduction: float | None = Field(
        default=None, gt=0, lt=1, description="(ours) cut the group's attention-projection parameters "
        "(atoms + coefficients + residual factors) by this fraction: after the atoms, the remaining "
        "parameters go to per-layer whitened residual ranks, layer by layer and type by type wherever a "
        "rank removes the most relative output error per parameter (`_masa_math.allocate_ranks`). A layer "
        "whose rank would reach out·in/(out+in) (a factorization as large as the matrix) keeps its dense "
        "weight instead: same parameters, exact. Exclusive with `residual_rank`.")
    distill: DistillOptions | None = Field(
        default=None, description="train atoms, coefficients and residuals to match each projection's "
        "outputs on calibration activations ({steps, lr, ridge}); null = training-free")

    @field_validator("atoms")
    @classmethod
    def _atoms(cls, v):
        for a in (v.values() if isinstance(v, dict) else [v]):
            if isinstance(a, float) and not 0 < a <= 1:
                raise ValueError(f"atoms as a fraction must be in (0, 1], got {a}")
            if isinstance(a, int) and a < (0 if isinstance(v, dict) else 1):
                raise ValueError(f"atoms as a count must be >= {0 if isinstance(v, dict) else 1}, got {a}")
        return v

    @model_validator(mode="after")
    def _budget(self):
        if self.reduction is not None and self.residual_rank:
            raise ValueError("give either residual_rank (the same rank everywhere) or reduction (ranks "
                             "allocated to reach a parameter cut), not both")
        if isinstance(self.atoms, dict):
            missing = [p for p in self.projections if p not in self.atoms]
            if missing:
                raise ValueError(f"atoms as a dict needs a value for every projection type; missing {missing}")
            if self.reduction is None and any(a == 0 for a in self.atoms.values()):
                raise ValueError("atoms 0 (no dictionary) needs `reduction`: the low-rank term is then all there is")
        return self

    @field_validator("groups")
    @classmethod
    def _groups(cls, v):
        if isinstance(v, int) and v < 2:
            raise ValueError(f"groups as a size must be >= 2 (one layer has nothing to share), got {v}")
        return v


def _missing(site: AttentionSite, opts: MasaOptions) -> list[str]:
    return [p for p in opts.projections if getattr(site, f"{p}_weight") is None]


def check(c: Candidate, opts: MasaOptions) -> str | None:
    missing = sorted({p for s in c.sites for p in _missing(s, opts)}, key=PROJECTIONS.index)
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


def _masks(ctx, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The real tokens of each calibration batch's activation x (from the model's I/O)."""
    return [ctx.valid(b, x) for b, x in zip(ctx.batches, xs)]


def _auto_groups(ctx, sites: list[AttentionSite], drift: float) -> list[list[AttentionSite]]:
    names = [_consumer(ctx.gm, s.q_weight or s.o_weight)[2].name for s in sites]
    acts = ctx.capture(sorted(set(names)))
    groups, start = [[sites[0]]], 0
    for i in range(1, len(sites)):
        num = den = 0.0
        for m, a, b in zip(_masks(ctx, acts[names[start]]), acts[names[start]], acts[names[i]]):
            cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
            w = m.to(cos.dtype) if m.shape == cos.shape else torch.ones_like(cos)
            num, den = num + (cos * w).sum().item(), den + w.sum().item()
        if 1 - num / den > drift:
            groups.append([])
            start = i
        groups[-1].append(sites[i])
    return groups


def _groups(ctx, sites, opts) -> list[list[AttentionSite]]:
    """The groups of `opts.groups` ("all", "auto" or a size), formed within each role in layer order:
    a role is the module path without its block numbers (G.module_pattern, e.g.
    "decoder.layers.*.encoder_attn"), so an encoder-decoder's encoder self-, decoder self- and
    cross-attentions never share a dictionary."""
    roles: dict[str, list[AttentionSite]] = {}
    for s in sorted(sites, key=_layer_key):
        roles.setdefault(G.module_pattern(s.module), []).append(s)
    out = []
    for members in roles.values():
        if opts.groups == "all":
            out.append(members)
        elif opts.groups == "auto":
            out += _auto_groups(ctx, members, opts.drift)
        else:
            out += [members[i:i + opts.groups] for i in range(0, len(members), opts.groups)]
    return out


def _n_atoms(opts, n_layers: int, label: str = "q") -> int:
    """Atoms for one projection type (a fused label such as "qkv" takes its first type's value)."""
    a = opts.atoms[label[0]] if isinstance(opts.atoms, dict) else opts.atoms
    return max(1, round(a * n_layers)) if isinstance(a, float) else a


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


def plan(ctx, sites, opts) -> list[Candidate]:
    """One candidate per group of the selected sites that have every projection; the rest one each
    (check then says what is missing)."""
    usable = [s for s in sites if not _missing(s, opts)]
    out = []
    for g in _groups(ctx, usable, opts) if usable else []:
        before = after = 0
        atoms = {}
        for label, quals in _members(g, opts.projections).items():
            shape = G.fetch_attr(ctx.gm, quals[0]).shape
            P, S = shape.numel(), _n_atoms(opts, len(g), label)
            atoms[label] = S
            before += len(quals) * P
            after += S * P + len(quals) * S + len(quals) * min(opts.residual_rank, *shape) * sum(shape)
        if opts.reduction is not None:        # build allocates ranks and writes the exact count
            after = before - int(opts.reduction * before)
        out.append(Candidate(tuple(g), {
            "group": [s.index for s in g], "layers": [_layer_key(s) for s in g],
            "atoms": next(iter(atoms.values())) if len(set(atoms.values())) == 1 else atoms,
            "attn_proj_params_before": before, "attn_proj_params_after": after}))
    return out + one_per_site(ctx, [s for s in sites if s not in usable], opts)


# ---- build / apply -------------------------------------------------------------------------------

def _cap(shape) -> int:
    """The rank at which a factorization U V stores as many numbers as the [out, in] matrix."""
    return (shape[0] * shape[1]) // (shape[0] + shape[1])


def build(ctx, c: Candidate, opts) -> Built:
    group, info = list(c.sites), dict(c.facts)
    site = c.site
    if len(group) < 2:
        raise ValueError(f"layer {_layer_key(site)} forms a group of one layer: nothing to share "
                         "(select more layers, or use a larger groups size / drift)")
    members = _members(group, opts.projections)
    for label in members:
        S = _n_atoms(opts, len(group), label)
        if S > len(group):
            raise ValueError(f"atoms={S} exceeds the {len(group)} layers of group {[_layer_key(s) for s in group]} "
                             "(with groups, give atoms as a fraction, e.g. 0.67)")
    calibrated = (opts.residual_rank > 0 or opts.distill is not None or opts.reduction is not None
                  or opts.fit == "whitened")
    found = {q: _consumer(ctx.gm, q) for quals in members.values() for q in quals}
    acts = ctx.capture(sorted({f[2].name for f in found.values()})) if calibrated else {}
    fit, per = {}, {}
    # 1. atoms and coefficients per projection type
    for label, quals in members.items():
        Ws = [G.fetch_attr(ctx.gm, q) for q in quals]
        if len({w.shape for w in Ws}) > 1:
            raise ValueError(f"{label} weights differ in shape across layers {[_layer_key(s) for s in group]}: "
                             f"{sorted({tuple(w.shape) for w in Ws})}; split them into separate groups")
        W = torch.stack([w.detach() for w in Ws])
        W = W.transpose(-1, -2) if found[quals[0]][3] else W                  # [L, out, in]
        M = torch.stack([MM.second_moment(acts[found[q][2].name], _masks(ctx, acts[found[q][2].name]))
                          for q in quals]) if calibrated else None
        S = _n_atoms(opts, len(group), label)
        if S == 0:
            D, C = W.new_zeros(0, *W.shape[1:]), W.new_zeros(len(quals), 0)
        elif opts.fit == "whitened":
            D, C = MM.whitened_pca(W, M, S)
        else:
            D, C = MM.matrix_pca(W, S)
        if calibrated:
            fit[f"{label}.pca"] = MM.weighted_error(W, MM.reconstruct(D, C), M).mean().item()
        per[label] = dict(quals=quals, W=W, M=M, D=D, C=C, ranks=[opts.residual_rank] * len(quals))
    # 2. residual ranks: the same everywhere, or allocated to reach `reduction`
    if opts.reduction is not None:
        before = sum(v["W"][0].numel() * len(v["quals"]) for v in per.values())
        budget = before - int(opts.reduction * before) - sum(
            v["D"].numel() + v["C"].numel() for v in per.values())
        if budget < 0:
            raise ValueError(f"the atoms alone keep {before - budget:,} of {before:,} parameters, more than "
                             f"reduction={opts.reduction} allows; use fewer atoms")
        gains, spectra = {}, {}
        for label, v in per.items():
            E = v["W"] - MM.reconstruct(v["D"], v["C"])
            A, s2 = MM.whitened_spectrum(E, v["M"])
            spectra[label] = A
            gains[label] = s2 * MM._layer_weights(v["W"], v["M"])[:, None]
        shapes = {label: v["W"].shape[1:] for label, v in per.items()}
        ranks = MM.allocate_ranks(gains, {k: sum(sh) for k, sh in shapes.items()},
                                  {k: _cap(sh) for k, sh in shapes.items()}, budget,
                                  {k: sh[0] * sh[1] for k, sh in shapes.items()})
        for label, v in per.items():
            v["ranks"], v["A"] = ranks[label], spectra[label]
    for label, v in per.items():
        W, M, D, C = v["W"], v["M"], v["D"], v["C"]
        L, (out, inn) = len(v["quals"]), W.shape[1:]
        dense = [r >= _cap((out, inn)) and opts.reduction is not None for r in v["ranks"]]
        ranks = [0 if d else min(r, out, inn) for r, d in zip(v["ranks"], dense)]
        U = V = None
        if max(ranks):
            E = W - MM.reconstruct(D, C)
            r_max = max(ranks)
            U, V = W.new_zeros(L, out, r_max), W.new_zeros(L, r_max, inn)
            for l, r in enumerate(ranks):
                if r:
                    if "A" in v:           # allocated: the SVD is already there
                        a = v["A"][l, :, :r]
                        U[l, :, :r], V[l, :r] = a.to(W.dtype), (a.T @ E[l].double()).to(W.dtype)
                    else:
                        U[l, :, :r], V[l, :r] = MM.whitened_residual(E[l], M[l], r)
        keep = torch.tensor([not d for d in dense])
        What = torch.where(keep[:, None, None], MM.reconstruct(D, C, U, V), W)
        if U is not None or any(dense):
            fit[f"{label}.residual"] = MM.weighted_error(W, What, M).mean().item()
        if opts.distill is not None and bool(keep.any()):
            d = opts.distill
            mask = (torch.arange(U.shape[-1])[None] < torch.tensor(ranks)[:, None]) if U is not None else None
            t, _ = MM.distill(W[keep], M[keep], D, C[keep], None if U is None else U[keep],
                              None if V is None else V[keep], steps=d.steps, lr=d.lr, ridge=d.ridge,
                              rank_mask=None if mask is None else mask[keep])
            D = t.get("atoms", D)
            C = C.clone()
            C[keep] = t.get("coef", C[keep])
            if U is not None:
                U, V = U.clone(), V.clone()
                U[keep], V[keep] = t["left"], t["right"]
            What = torch.where(keep[:, None, None], MM.reconstruct(D, C, U, V), W)
            fit[f"{label}.distill"] = MM.weighted_error(W, What, M).mean().item()
        v.update(D=D, C=C, U=U, V=V, ranks=ranks, dense=dense)
    # 3. stored tensors: atoms per type; per layer its coefficients and rank-r factors (none when dense)
    built = {}
    after = 0
    for label, v in per.items():
        transposed = found[v["quals"][0]][3]
        D = v["D"]
        if D.shape[0]:
            built[f"{label}.atoms"] = (D.transpose(-1, -2) if transposed else D).contiguous()
        after += D.numel()
        for l, q in enumerate(v["quals"]):
            if v["dense"][l]:
                after += v["W"][l].numel()
                continue
            r = v["ranks"][l]
            if D.shape[0]:
                built[f"{label}.coef.{q}"] = v["C"][l].contiguous()
            if r or not D.shape[0]:   # stored layout: E = left @ right (no atoms, rank 0: Ŵ = 0)
                U, V = v["U"][l, :, :r], v["V"][l, :r]
                left, right = (V.T, U.T) if transposed else (U, V)
                built[f"{label}.left.{q}"], built[f"{label}.right.{q}"] = left.contiguous(), right.contiguous()
            after += v["C"][l].numel() + r * sum(v["W"].shape[1:])
    if opts.reduction is not None or any(any(v["dense"]) for v in per.values()):
        info["attn_proj_params_after"] = after
    if opts.reduction is not None:
        info["ranks"] = {label: v["ranks"] for label, v in per.items()}
        info["dense_layers"] = {label: [_layer_key(group[l]) for l, d in enumerate(v["dense"]) if d]
                                for label, v in per.items()}
    if fit:
        info["relative_output_error"] = {k: round(v, 6) for k, v in fit.items()}
    return Built(built, info)


def _labels(built: dict) -> dict[str, list[str]]:
    """{label: [weight names it rewrites]} from the built keys "<label>.<kind>[.<weight name>]"."""
    out: dict[str, list[str]] = {}
    for k in built:
        label, kind, *rest = k.split(".", 2)
        out.setdefault(label, [])
        if kind in ("coef", "left") and rest[0] not in out[label]:
            out[label].append(rest[0])
    return out


def apply(gm, c: Candidate, built: Built, opts) -> None:
    site, built = c.site, built.tensors
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    prov = {"rule": "masa", "site": site.index}

    def call(op, *args):
        n = gm.graph.call_function(op, args)
        n.meta["rewriter"] = prov
        return n

    for label, quals in sorted(_labels(built).items()):
        if not quals:
            continue
        weights = {q: _consumer(gm, q)[0] for q in quals}
        firsts = {q: min(w.users, key=order.__getitem__) for q, w in weights.items()}
        first = min(firsts.values(), key=order.__getitem__)
        D = built.get(f"{label}.atoms")
        if D is not None:
            S, shape = D.shape[0], list(D.shape[1:])
            atoms = G.register_tensor(gm, G.buffer_name("masa", site.index, f"{label}_atoms"), D, before=first)
            with gm.graph.inserting_before(first):
                flat = call(aten.view.default, atoms, [S, D[0].numel()])           # [S, out·in]
        for q, w in weights.items():
            key = G.buffer_name("masa", site.index, q)
            with gm.graph.inserting_before(firsts[q]):
                new = None
                if D is not None:
                    c = G.register_tensor(gm, f"{key}_coef", built[f"{label}.coef.{q}"].view(1, S), before=firsts[q])
                    new = call(aten.view.default, call(aten.mm.default, c, flat), shape)   # Σ_s c_s D_s
                if f"{label}.left.{q}" in built:
                    u = G.register_tensor(gm, f"{key}_left", built[f"{label}.left.{q}"], before=firsts[q])
                    v = G.register_tensor(gm, f"{key}_right", built[f"{label}.right.{q}"], before=firsts[q])
                    uv = call(aten.mm.default, u, v)                                       # U V
                    new = uv if new is None else call(aten.add.Tensor, new, uv)
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
    check=check, build=build, apply=apply, plan=plan, cost=cost, kind="memory", fits=True))
