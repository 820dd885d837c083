"""Canonicalization: raise every written-out attention to one aten.scaled_dot_product_attention.

After this pass the rules see a single form, whatever way the model wrote its attention
(the counter-example is inductor's attention-fusion pass, which keeps 18 near-copies of
one pattern). The matcher (match.py) is written once, with the variants as alternatives:

    P·V  ←  [dropout(eval) | cast]*  ←  softmax  ←  [cast | scale | additive mask | fill mask]*  ←  Q·Kᵀ

    product     aten.matmul / aten.bmm / aten.einsum / aten.baddbmm (scores only, its input an
                additive bias: BLOOM's ALiBi); heads either a separate dim ([B, H, T, D]) or folded
                into the batch ([B·H, T, D]), also folded products around a softmax over the scores
                viewed as [B, H, Tq, Tk] (BLOOM, DeBERTa-v2: masks on either side of the view)
    Kᵀ          transpose / permute / mT of K (any other Kᵀ gets an explicit transpose)
    scale       mul or div by a constant (python number, 0-d constant tensor, in-graph
                sqrt(head_dim), a sym float resolved from static shapes) on Q, on K or on the
                scores; a non-constant scalar factor is folded into Q
    mask        add (additive float mask), masked_fill / where with −inf (bool keep-mask) or
                with a finite value ≤ −1e4 (−1e9, finfo.min: an equivalent additive mask
                where(mask, value, 0)); a triu/tril-of-ones mask over Tq == Tk that is the
                only mask becomes is_causal=True; any additive bias, computed from q and k
                too (DeBERTa's content→position and position→content terms), is an attn_mask
    softmax     aten.softmax / aten._softmax / aten._safe_softmax over the key axis, with or
                without an fp32 upcast, or written out as exp(x − max) / sum(exp(x − max))
    V           also un-repeats GQA's repeat_kv (unsqueeze → expand → reshape, or
                repeat_interleave) on K and V and passes enable_gqa=True, as for one K/V head
                that the products broadcast to every query head (Falcon's multi-query attention)
    in place    `scores += bias`, `scores /= sqrt(d)` (MPNet, DeBERTa, Falcon) are first rewritten
                out of place (`out_of_place`) where that is exact: the written tensor is fresh
                (no input, parameter or view) and no view of it was taken before the write

Before (BERT eager, one head group):

    scores = matmul(q, transpose(k, 2, 3)); s = mul(scores, 0.25); s = add(s, mask)
    p = softmax(s, -1); p = dropout(p, 0.0, False); out = matmul(p, v)

After:

    out = scaled_dot_product_attention(q, k, v, mask, 0.0, False, scale=0.25)

Every rewrite is exact in fp32 (tests: max abs diff ≤ 1e-5), with two documented limits:
a finite fill value (−1e9) becomes an additive mask, which equals the original wherever a row
keeps at least one key (exp(value − max) underflows to 0 either way); a row whose keys are all
masked is uniform in the original and not in SDPA. A match is refused, with a reason that
`explain_unmatched` reports, when an intermediate (scores, probabilities) is used outside the
pattern (e.g. output_attentions=True), when dropout is live (train=True, p > 0), when dtypes are
mixed, when the shapes do not line up, or when the scores pass through a nonlinear function (Gemma
2's logit soft-capping, cap·tanh(s/cap): SDPA only scales and masks the scores).

References: Vaswani et al., "Attention Is All You Need" (2017) for the scaled dot-product form;
Ainslie et al., "GQA" (arXiv:2305.13245) for grouped key/value heads.
"""
from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx

from .graph import CASTS, COPIES, SDPA, arg, attr_value, clean, const_value, dtype, is_op, module_path, \
    rank, remove_dead, same_shape, same_size, shape, strip_casts, unrepeat_kv, value
from .match import (DIV, DROPOUT, EINSUM, MASKED_OUT, MATMUL, RESHAPES, SOFTMAX, Layer, Match, NoMatch, Operand,
                    describe, ident, match, norm_dim, strip_scale, swap_last)
from .norms import first_user

aten = torch.ops.aten


def canonicalize(gm: fx.GraphModule) -> list[dict]:
    """Raise every written-out attention in `gm` to aten.scaled_dot_product_attention, in place.

    Returns one record per rewritten attention: {"node", "form", "module", "is_causal",
    "scale", "enable_gqa"}. Removes the written-out nodes (dead-code elimination) and recompiles.
    The new SDPA node carries the old softmax's nn_module_stack and the old output's "val".
    GQA: when K and V are repeated with repeat_kv, SDPA takes the un-repeated K/V with
    enable_gqa=True (head h reads kv head h // n_rep in both)."""
    records = []
    out_of_place(gm)
    remove_dead(gm.graph)   # a dead user (MultiheadAttention's unused head-averaged weights) blocks no match
    for pv in [n for n in gm.graph.nodes if is_op(n, MATMUL, EINSUM)]:
        try:
            m = match(pv)
        except NoMatch:
            continue
        module = module_path(m.softmax)
        sdpa = rewrite(gm, m)
        info = sdpa.meta["canonicalize"]
        records.append({"node": sdpa.name, "form": info["form"], "module": module,
                        **{k: info[k] for k in ("is_causal", "scale", "enable_gqa")}})
    clean(gm)   # the written-out nodes, dropout and metadata asserts included (graph.remove_dead)
    return records


def explain_unmatched(gm: fx.GraphModule) -> list[str]:
    """For each softmax in `gm` that is not (yet) an SDPA node, one sentence saying why."""
    out = []
    for s in gm.graph.nodes:
        if not (is_op(s, SOFTMAX) or is_op(s, DIV) and is_op(s.args[0], aten.exp.default)
                and is_op(s.args[1], aten.sum.dim_IntList)):
            continue
        if "rewriter" in s.meta and s.meta["rewriter"].get("rule") != "canonicalize":
            continue   # a rule's own softmax (e.g. Hedgehog feature maps), not a missed attention
        head = f"softmax at {module_path(s) or '<root>'} ({s.name})"
        if is_op(s, SOFTMAX) and norm_dim(s.args[1], rank(s)) != rank(s) - 1:
            out.append(f"{head}: it normalizes dim {s.args[1]}, not the key axis (the last dim)")
            continue
        pv = first_user(s, lambda u, n: is_op(u, MATMUL) and u.args[0] is n
                        or is_op(u, EINSUM) and bool(u.args[1]) and u.args[1][0] is n,
                        DROPOUT | CASTS | COPIES | RESHAPES)
        if pv is None:
            users = ", ".join(describe(u) if u.op != "output" else "the model output" for u in s.users)
            out.append(f"{head}: its output does not feed a probabilities·V product (used by {users or 'nothing'})")
            continue
        try:
            out.append(f"{head}: matches {match(pv).form()}; canonicalize() has not run on this graph")
        except NoMatch as err:
            out.append(f"{head}: {err}")
    return out


# ---------------------------------------------------------------- in-place arithmetic

_OUT_OF_PLACE = {aten.add_.Tensor: aten.add.Tensor, aten.add_.Scalar: aten.add.Scalar,
                 aten.sub_.Tensor: aten.sub.Tensor, aten.sub_.Scalar: aten.sub.Scalar,
                 aten.mul_.Tensor: aten.mul.Tensor, aten.mul_.Scalar: aten.mul.Scalar,
                 aten.div_.Tensor: aten.div.Tensor, aten.div_.Scalar: aten.div.Scalar,
                 aten.masked_fill_.Scalar: aten.masked_fill.Scalar,
                 aten.masked_fill_.Tensor: aten.masked_fill.Tensor}


def _may_alias(n) -> bool:
    """Whether `n`'s value may share storage with another value: graph inputs, parameters and
    buffers, and the outputs of ops whose schema returns an alias (views, contiguous, split)."""
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return True
    if n.target is operator.getitem:
        return _may_alias(n.args[0])
    t = n.target
    return not isinstance(t, torch._ops.OpOverload) or any(r.alias_info is not None
                                                            for r in t._schema.returns)


def out_of_place(gm: fx.GraphModule) -> int:
    """Rewrite in-place arithmetic (`scores += bias`, `scores /= sqrt(d)`: aten.add_ / div_ / ...,
    as MPNet, DeBERTa and Falcon write them) as the out-of-place op, where that is exact: the
    written tensor is a fresh value (no input, parameter or view of another tensor), no view of it
    was taken before the write, and the result keeps its dtype. Every later read of the written
    tensor reads the new node. Returns the number of rewritten nodes."""
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    done = 0
    for n in list(gm.graph.nodes):
        op = _OUT_OF_PLACE.get(n.target)
        a = n.args[0] if op is not None else None
        if a is None or _may_alias(a) or any(pos.get(u, -1) < pos[n] and _may_alias(u) for u in a.users):
            continue
        b = value(n.args[1])
        if dtype(a) is None or isinstance(b, torch.Tensor) and torch.result_type(value(a), b) != dtype(a):
            continue
        with gm.graph.inserting_before(n):
            new = gm.graph.call_function(op, n.args, n.kwargs)
        new.meta.update(n.meta)
        for u in list(a.users):
            if u is not n and u is not new and pos.get(u, -1) > pos[n]:
                u.replace_input_with(a, new)
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)
        done += 1
    if done:
        gm.recompile()
    return done


# ---------------------------------------------------------------- rewriting

def rewrite(gm: fx.GraphModule, m: Match) -> fx.Node:
    """Replace the matched pattern by one SDPA node and return it; the written-out nodes are left
    dead for canonicalize's clean()."""
    pv, q, k, v, scale = m.pv, m.q, m.k, m.v, m.q_scale
    emit = _Emitter(gm, pv, m.softmax, m.form())
    has_tensor_factor = any(l.kind == "scale" and not isinstance(l.factor, float) for l in m.layers)
    folded = len(q.shape) == 3
    if folded:  # [B·H, T, D]: recover [B, H, T, D] from the reshapes that folded the heads
        four = [None] * 3 if has_tensor_factor else [_unfold(t) for t in (q, k, v)]
        if m.scores_unfolded and not _same_heads(four):   # the softmax is 4-D: unflatten by its heads
            four = [_unflatten(emit, t, m.heads) for t in (q, k, v)]
        if _same_heads(four):
            if has_tensor_factor:
                q, k, v = four
            else:
                # the scales applied before the fold
                (q, qs), (k, ks), v = strip_scale(four[0], m), strip_scale(four[1], m), four[2]
                scale *= qs * ks
            m.record("heads-unfolded")
        else:
            m.record("heads-folded(3d)")
    gqa = m.kv_broadcast   # one K/V head broadcast to all: SDPA's enable_gqa with one kv head
    if len(q.shape) == 4 and not gqa:
        rk, rv = _unrepeat_kv(k), _unrepeat_kv(v)
        if rk and rv and rk[1] == rv[1] and rk[1] > 1 and same_size(rk[0].shape[1] * rk[1], q.shape[1]):
            k, v, gqa = rk[0], rv[0], True
            m.record("gqa")
    for l in m.layers:
        if l.kind == "scale" and isinstance(l.factor, float):
            scale = scale / l.factor if l.inverse else scale * l.factor
    qn, kn, vn = emit.operand(q), emit.operand(k), emit.operand(v)
    mask, is_causal, factors = _build_mask(emit, m, qn, q.shape[1] if folded and len(q.shape) == 4 else None)
    for f, inverse in factors:  # a non-constant scalar scale: (q·f)·kᵀ == f·(q·kᵀ)
        qn = emit(aten.div.Tensor if inverse else aten.mul.Tensor, qn, f)
    while mask is not None and rank(mask) < 2:   # a [Tk] mask broadcasts as [1, Tk]; SDPA wants ≥ 2 dims
        mask = emit(aten.unsqueeze.default, mask, 0)
    emit.form = m.form()   # now with the causal tags the mask added
    gqa_kwargs = {"enable_gqa": True} if gqa else {}
    sdpa = out = emit(SDPA, qn, kn, vn, mask, 0.0, is_causal, scale=float(scale), **gqa_kwargs)
    if shape(out) and folded and len(q.shape) == 4:
        out = emit(aten.flatten.using_ints, out, 0, 1)
    if m.out_perm is not None:
        out = emit(aten.permute.default, out, m.out_perm)
    if same_shape(shape(sdpa), shape(pv)) and "val" in pv.meta:
        sdpa.meta["val"] = pv.meta["val"]
    pv.replace_all_uses_with(out)
    sdpa.meta["canonicalize"] = {"form": emit.form, "is_causal": is_causal, "scale": float(scale), "enable_gqa": gqa}
    return sdpa


class _Emitter:
    """Inserts nodes before an anchor, with fake-tensor meta["val"] and provenance."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, meta_from: fx.Node, form: str):
        self.graph, self.anchor, self.form = gm.graph, anchor, form
        self.meta = {k: meta_from.meta[k] for k in ("nn_module_stack", "stack_trace") if k in meta_from.meta}
        self.fake_mode = torch._guards.detect_fake_mode([value(anchor)])

    def __call__(self, op, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            n = self.graph.call_function(op, args, kwargs)
        n.meta.update(self.meta)
        n.meta["rewriter"] = {"rule": "canonicalize", "site": None, "form": self.form}
        fargs, fkwargs = fx.node.map_arg((args, kwargs), lambda a: a.meta.get("val"))
        if self.fake_mode is not None:
            with self.fake_mode:
                n.meta["val"] = op(*fargs, **fkwargs)
        return n

    def operand(self, op: Operand) -> fx.Node:
        if op.perm == ident(len(op.perm)):
            return op.node
        if op.perm == swap_last(len(op.perm)):
            return self(aten.transpose.int, op.node, -2, -1)
        return self(aten.permute.default, op.node, op.perm)

    def scalar(self, v, like: fx.Node) -> fx.Node:
        return self(aten.full.default, [], v, dtype=dtype(like), device=value(like).device)


def _build_mask(emit: _Emitter, m: Match, q: fx.Node, heads: int | None = None
                ) -> tuple[fx.Node | None, bool, list[fx.Node]]:
    """Combine the mask layers into one attn_mask (bool keep-mask or additive float in q's dtype).
    `heads`: the SDPA is [B, H, T, D] with these H while the products were [B·H, T, D], so a mask laid
    out for the folded scores is unflattened first. Returns (attn_mask, is_causal, non-constant scale
    factors left to fold into q)."""
    terms: list[tuple[str, fx.Node]] = []   # ("keep", bool) | ("add", float)
    factors: list[tuple[fx.Node, bool]] = []
    masks = [l for l in m.layers if l.kind != "scale"]
    is_causal = len(masks) == 1 and _is_causal_term(masks[0], shape(m.softmax))
    if is_causal:
        m.record("causal")
    elif any(l.kind == "fill" and _triangle(l.mask) is not None for l in masks):
        m.record("causal-tril")
    for l in m.layers:
        if l.kind == "scale":
            # a scale after a mask scales its additive terms too; bool keep-masks (−inf) stay
            terms = [(kind, t if kind == "keep" else emit(aten.div.Tensor if l.inverse else aten.mul.Tensor,
                                                          t, l.factor)) for kind, t in terms]
            if not isinstance(l.factor, float):
                factors.append((l.factor, l.inverse))
            continue
        if is_causal:
            continue
        mask = _mask_to_4d(emit, l.mask, heads) if heads is not None and l.folded else l.mask
        if l.kind == "add":
            terms.append(("add", mask))
        elif l.value == -math.inf:   # masked_fill(mask, −inf) keeps where the mask is False
            terms.append(("keep", emit(aten.logical_not.default, mask) if l.masked_when else mask))
        else:  # a finite fill ≤ −1e4: the additive mask where(mask, value, 0)
            fill, zero = emit.scalar(l.value, q), emit.scalar(0.0, q)
            where = (fill, zero) if l.masked_when else (zero, fill)
            terms.append(("add", emit(aten.where.self, mask, *where)))
    if not terms:
        return None, is_causal, factors
    if all(kind == "keep" for kind, _ in terms):
        out = terms[0][1]
        for _, t in terms[1:]:
            out = emit(aten.logical_and.default, out, t)
        return out, False, factors
    out = None
    for kind, t in terms:
        if kind == "keep":
            t = emit(aten.where.self, t, emit.scalar(0.0, q), emit.scalar(-math.inf, q))
        elif dtype(t) != dtype(q):
            t = emit(aten.to.dtype, t, dtype(q))
        out = t if out is None else emit(aten.add.Tensor, out, t)
    return out, False, factors


def _mask_to_4d(emit: _Emitter, mask: fx.Node, heads: int) -> fx.Node:
    """A 3-D mask for [B·H, Tq, Tk] scores as one for [B, H, Tq, Tk]."""
    s = shape(mask)
    if len(s) < 3:
        return mask
    if same_size(s[0], 1):
        return emit(aten.unsqueeze.default, mask, 0)
    unfolded = _unfold(Operand(mask, [0, 1, 2]))
    if unfolded is not None and same_size(shape(unfolded.node)[1], heads):
        return unfolded.node
    return emit(aten.unflatten.int, mask, 0, [-1, heads])


# ---------------------------------------------------------------- GQA and folded heads

def _unrepeat_kv(op: Operand) -> tuple[Operand, int] | None:
    """graph.unrepeat_kv on a [B, H, T, D] operand in its own layout."""
    found = unrepeat_kv(op.node) if op.perm == ident(4) else None
    return (Operand(found[0], ident(4)), found[1]) if found else None


def _same_heads(four: list) -> bool:
    """Three [B, H, T, D] operands (q, k, v) whose batch and head dims agree."""
    return all(four) and all(same_shape(t.shape[:2], four[0].shape[:2]) for t in four)


def _unflatten(emit: _Emitter, op: Operand, heads: int) -> Operand | None:
    """A [B·H, T, D] operand as [B, H, T, D], by an explicit unflatten of its batch dim."""
    if op.perm[0] != 0:
        return None
    return Operand(emit(aten.unflatten.int, op.node, 0, [-1, heads]), [0, 1] + [p + 1 for p in op.perm[1:]])


def _unfold(op: Operand) -> Operand | None:
    """A [B·H, T, D] operand that is a reshape of a [B, H, T, D] tensor, as that 4-D tensor."""
    if op.perm[0] != 0 or not is_op(op.node, RESHAPES):
        return None
    src = op.node.args[0]
    s3, s4 = shape(op.node), shape(src)
    if len(s4) != 4 or not (same_size(s4[0] * s4[1], s3[0]) and same_size(s4[2], s3[1]) and same_size(s4[3], s3[2])):
        return None
    return Operand(src, [0, 1] + [p + 1 for p in op.perm[1:]])


# ---------------------------------------------------------------- causal masks

def _triangle(n: fx.Node, depth: int = 0) -> str | None:
    """Which triangle of (i, j) is True in a mask built from tril/triu of ones, sliced from the
    top-left corner: "lower" (j ≤ i) or "strict_upper" (j > i); None when not provable."""
    if depth > 12 or not isinstance(n, fx.Node):
        return None
    if is_op(n, aten.logical_not.default, aten.bitwise_not.default) or (
            is_op(n, aten.eq.Scalar) and const_value(n.args[1]) == 0):
        return {"lower": "strict_upper", "strict_upper": "lower"}.get(_triangle(n.args[0], depth + 1))
    if (is_op(n, aten.ne.Scalar) and const_value(n.args[1]) == 0) or is_op(n, CASTS, COPIES):
        return _triangle(n.args[0], depth + 1)
    if is_op(n, aten.slice.Tensor):
        start = arg(n, 2, "start")
        if start not in (None, 0) and const_value(start) != 0 or arg(n, 4, "step", 1) != 1:
            return None
        return _triangle(n.args[0], depth + 1)
    if is_op(n, RESHAPES, aten.unsqueeze.default, aten.expand.default):
        return _triangle(n.args[0], depth + 1) if same_shape(shape(n)[-2:], shape(n.args[0])[-2:]) else None
    if is_op(n, aten.tril.default, aten.triu.default):
        base, diag = n.args[0], arg(n, 1, "diagonal", 0)
        ones = is_op(base, aten.ones.default, aten.ones_like.default, aten.new_ones.default) or (
            is_op(base, aten.full.default) and (const_value(base.args[1]) or 0) != 0)
        if not ones:
            return None
        if n.target is aten.tril.default and diag == 0:
            return "lower"
        return "strict_upper" if n.target is aten.triu.default and diag == 1 else None
    t = attr_value(n) if n.op == "get_attr" else None
    if not isinstance(t, torch.Tensor) or t.dim() < 2 or any(s != 1 for s in t.shape[:-2]):
        return None
    t = t.reshape(t.shape[-2:]) != 0
    if t.shape[0] != t.shape[1]:
        return None
    if torch.equal(t, torch.ones_like(t).tril()):
        return "lower"
    return "strict_upper" if torch.equal(t, torch.ones_like(t).triu(1)) else None


def _is_causal_term(layer: Layer, scores_shape: tuple) -> bool:
    tq, tk = scores_shape[-2], scores_shape[-1]
    if not same_size(tq, tk):
        return False
    if layer.kind == "fill":
        if not same_shape(shape(layer.mask)[-2:], (tq, tk)):
            return False
        if not isinstance(layer.value, float) or layer.value > MASKED_OUT:
            return False
        return _triangle(layer.mask) == ("strict_upper" if layer.masked_when else "lower")
    if layer.kind == "add":  # full((T, T), -inf).triu(1)
        n = strip_casts(layer.mask, RESHAPES | {aten.unsqueeze.default} | CASTS | COPIES)
        if is_op(n, aten.triu.default) and arg(n, 1, "diagonal", 0) == 1 and is_op(n.args[0], aten.full.default):
            v = const_value(n.args[0].args[1])
            return v is not None and v <= MASKED_OUT and same_shape(shape(n), (tq, tk))
    return False
