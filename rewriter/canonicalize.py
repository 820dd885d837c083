"""Canonicalization: raise every written-out attention to one aten.scaled_dot_product_attention.

After this pass the rules see a single form, whatever way the model wrote its attention
(the counter-example is torch._inductor's fuse_attention.py, which keeps 18 near-copies of
one pattern). The matcher is written once, with the variants as alternatives at each step,
and anchors at the probabilities·V product, walking back (as torch.fx's SubgraphMatcher does):

    P·V  ←  [dropout(eval) | cast]*  ←  softmax  ←  [cast | scale | additive mask | fill mask]*  ←  Q·Kᵀ

    product     aten.matmul / aten.bmm / aten.einsum / aten.baddbmm (scores only); heads
                either a separate dim ([B, H, T, D]) or folded into the batch ([B·H, T, D])
    Kᵀ          transpose / permute / mT of K (any other Kᵀ gets an explicit transpose)
    scale       mul or div by a constant (python number, 0-d constant tensor, in-graph
                sqrt(head_dim), a sym float resolved from static shapes) on Q, on K or on the
                scores; a non-constant scalar factor is folded into Q
    mask        add (additive float mask), masked_fill / where with −inf (bool keep-mask) or
                with a finite value ≤ −1e4 (−1e9, finfo.min: an equivalent additive mask
                where(mask, value, 0)); a triu/tril-of-ones mask over Tq == Tk that is the
                only mask becomes is_causal=True
    softmax     aten.softmax / aten._softmax / aten._safe_softmax over the key axis, with or
                without an fp32 upcast, or written out as exp(x − max) / sum(exp(x − max))
    V           also un-repeats GQA's repeat_kv (unsqueeze → expand → reshape, or
                repeat_interleave) on K and V and passes enable_gqa=True

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
mixed, or when the shapes do not line up.

References: Vaswani et al., "Attention Is All You Need" (2017) for the scaled dot-product form;
Ainslie et al., "GQA" (arXiv:2305.13245) for grouped key/value heads.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .graph import SDPA, clean

aten = torch.ops.aten

# ---------------------------------------------------------------- op families

MATMUL = (aten.matmul.default, aten.bmm.default)
EINSUM = (aten.einsum.default,)
BADDBMM = (aten.baddbmm.default,)
SOFTMAX = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
DROPOUT = (aten.dropout.default,)
CASTS = (aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default)
NOOPS = (aten.contiguous.default, aten.clone.default, aten.alias.default)
MUL = (aten.mul.Tensor, aten.mul.Scalar)
DIV = (aten.div.Tensor, aten.div.Scalar)
ADD = (aten.add.Tensor,)
FILL = (aten.masked_fill.Scalar, aten.masked_fill.Tensor)
WHERE = (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf)
RESHAPES = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
ASSERTS = (aten._assert_tensor_metadata.default,)

MASKED_OUT = -1e4  # fill values at or below this make exp(value − row max) underflow to 0
INT_MAX = 2 ** 62


class NoMatch(Exception):
    """The walk met something that is not part of an attention pattern; str() says what."""


# ---------------------------------------------------------------- small helpers

def _is(n, ops) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in ops


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def _shape(n) -> tuple:
    v = _val(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def _rank(n) -> int:
    return len(_shape(n))


def _dtype(n):
    v = _val(n)
    return v.dtype if isinstance(v, torch.Tensor) else None


def _same(a, b) -> bool:
    """Statically equal sizes (ints or SymInts)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - a size we cannot compare is not provably equal
        return False


def _same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def _describe(n) -> str:
    if not isinstance(n, fx.Node):
        return repr(n)
    what = n.target if n.op == "call_function" else n.op
    name = getattr(what, "__name__", str(what))
    if hasattr(what, "_schema"):
        name = f"aten.{what._schema.name.split('::')[-1]}"
    return f"{name} ({n.name})"


def _arg(n: fx.Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


def module_path(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    return list(stack.values())[-1][0]


def _const(x) -> float | None:
    """The value of a constant scalar expression (python number, 0-d constant tensor, sqrt of a
    static head_dim computed in the graph, a static sym value), or None when it is not constant."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        expr = x.node.expr
        return float(expr) if expr.is_number else None
    if not isinstance(x, fx.Node):
        return None
    v = x.meta.get("val")
    if isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(v, bool):
        return _const(v)
    if x.op == "get_attr":  # a lifted constant or buffer; a parameter may still be trained, so it is not
        t = _attr(x)
        ok = isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.numel() == 1
        return float(t.reshape(()).item()) if ok else None
    if x.op != "call_function":
        return None
    t, a = x.target, x.args
    unary = {aten.sqrt.default: math.sqrt, aten.rsqrt.default: lambda z: 1 / math.sqrt(z),
             aten.reciprocal.default: lambda z: 1 / z, aten.neg.default: operator.neg,
             aten.exp.default: math.exp, aten.log.default: math.log, math.sqrt: math.sqrt,
             torch.sym_float: float, torch.sym_sqrt: math.sqrt}
    binary = {aten.mul.Tensor: operator.mul, aten.mul.Scalar: operator.mul,
              aten.div.Tensor: operator.truediv, aten.div.Scalar: operator.truediv,
              aten.add.Tensor: operator.add, aten.sub.Tensor: operator.sub,
              aten.pow.Tensor_Scalar: operator.pow, aten.pow.Scalar: operator.pow,
              aten.pow.Tensor_Tensor: operator.pow, operator.mul: operator.mul,
              operator.truediv: operator.truediv, operator.pow: operator.pow,
              operator.add: operator.add, operator.sub: operator.sub}
    passthrough = CASTS + NOOPS + (aten.lift_fresh_copy.default, aten.detach.default,
                                   aten.detach_.default, aten.lift_fresh.default)
    if t in passthrough:
        return _const(a[0])
    if t in unary:
        z = _const(a[0])
        return None if z is None else float(unary[t](z))
    if t in binary and len(a) == 2:
        y, z = _const(a[0]), _const(a[1])
        return None if y is None or z is None else float(binary[t](y, z))
    if t in (aten.scalar_tensor.default,):
        return _const(a[0])
    if t in (aten.full.default,) and all(_const(s) == 1 for s in a[0]):
        return _const(a[1])
    return None


def _attr(n: fx.Node):
    obj = n.graph.owning_module
    for part in n.target.split("."):
        obj = getattr(obj, part, None)
    return obj


def _is_scalar_like(x) -> bool:
    """A factor that scales every score alike: a number, a sym value, or a one-element tensor."""
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return True
    v = _val(x)
    if isinstance(v, (torch.SymInt, torch.SymFloat, int, float)) and not isinstance(v, bool):
        return True
    return isinstance(v, torch.Tensor) and all(_same(s, 1) for s in v.shape)


# ---------------------------------------------------------------- permutations

def _norm_dim(d: int, r: int) -> int:
    return d + r if d < 0 else d


def _ident(r: int) -> list[int]:
    return list(range(r))


def _swap_last(r: int) -> list[int]:
    p = _ident(r)
    p[-2], p[-1] = p[-1], p[-2]
    return p


def _compose(t: list[int], s: list[int]) -> list[int]:
    """x.permute(t).permute(s) == x.permute(_compose(t, s))."""
    return [t[i] for i in s]


def _as_permute(n: fx.Node) -> tuple[fx.Node, list[int]] | None:
    """n == src.permute(perm) for a transpose / permute / mT node."""
    if _is(n, (aten.transpose.int,)):
        r = _rank(n)
        p = _ident(r)
        a, b = _norm_dim(n.args[1], r), _norm_dim(n.args[2], r)
        p[a], p[b] = p[b], p[a]
        return n.args[0], p
    if _is(n, (aten.permute.default,)):
        r = _rank(n)
        return n.args[0], [_norm_dim(d, r) for d in n.args[1]]
    if _is(n, (aten.mT.default,)):
        return n.args[0], _swap_last(_rank(n))
    return None


@dataclass
class Operand:
    """A q/k/v value for SDPA: `node.permute(perm)`, then optionally unflattened/un-repeated."""
    node: fx.Node
    perm: list[int]

    @property
    def shape(self) -> tuple:
        s = _shape(self.node)
        return tuple(s[i] for i in self.perm)


# ---------------------------------------------------------------- the match

@dataclass
class Layer:
    """One elementwise step between Q·Kᵀ and the softmax, in forward order."""
    kind: str                 # "scale" | "add" | "fill"
    factor: object = None     # scale: float or Node; inverse=True means divide
    inverse: bool = False
    mask: fx.Node | None = None   # add: the additive tensor; fill: the bool mask
    masked_when: bool = True  # fill: the mask value that marks a dropped key
    value: object = None      # fill: float or Node


@dataclass
class Match:
    pv: fx.Node
    softmax: fx.Node                  # the softmax (or the div of a written-out one)
    q: Operand
    k: Operand
    v: Operand
    q_scale: float = 1.0
    layers: list[Layer] = field(default_factory=list)
    interior: dict = field(default_factory=dict)   # node -> role ("scores" / "probabilities")
    out_perm: list[int] | None = None               # einsum output layout
    form: list[str] = field(default_factory=list)


def _strip_noops(n: fx.Node) -> fx.Node:
    while _is(n, NOOPS):
        n = n.args[0]
    return n


def _pv_product(pv: fx.Node) -> tuple[fx.Node, Operand, list[int] | None, str]:
    """P·V: returns (P node, V operand, output permutation or None, form tag)."""
    if _is(pv, MATMUL):
        p, v = pv.args[0], pv.args[1]
        if _rank(p) < 3 or _rank(v) != _rank(p):
            raise NoMatch(f"{_describe(pv)} is not a batched P·V product (ranks {_rank(p)} and {_rank(v)})")
        return p, Operand(v, _ident(_rank(v))), None, "bmm" if pv.target is aten.bmm.default else "matmul"
    if _is(pv, EINSUM):
        eq, ops = pv.args[0], pv.args[1]
        if len(ops) != 2 or "..." in eq:
            raise NoMatch(f"{_describe(pv)} einsum {eq!r} is not a two-operand P·V product")
        lhs, out = eq.replace(" ", "").split("->")
        a, b = lhs.split(",")
        batch, i, j = a[:-2], a[-2], a[-1]
        e = [c for c in b if c not in a]
        if (len(e) != 1 or j not in b or j in out or i not in out or any(c not in b or c not in out for c in batch)
                or len(b) != len(a) or len(out) != len(a)):
            raise NoMatch(f"{_describe(pv)} einsum {eq!r} does not contract P's key axis with V")
        want_v = batch + j + e[0]
        want_out = batch + i + e[0]
        out_perm = None if out == want_out else [want_out.index(c) for c in out]
        return ops[0], Operand(ops[1], [b.index(c) for c in want_v]), out_perm, "einsum"
    raise NoMatch(f"{_describe(pv)} is not a matmul/bmm/einsum")


def _probabilities(p: fx.Node, m: Match) -> fx.Node:
    """Walk back from P through dropout (eval) and casts to the softmax; returns its input."""
    while True:
        if _is(p, DROPOUT):
            prob, train = _arg(p, 1, "p", 0.5), _arg(p, 2, "train", True)
            if train and prob > 0:
                raise NoMatch(f"dropout {_describe(p)} on the probabilities is live (p={prob}, train=True): "
                              "SDPA would draw a different random mask; trace the model in eval mode")
            m.interior[p] = "probabilities"
            m.form.append("dropout(eval)")
            p = p.args[0]
        elif _is(p, CASTS):
            if not (_dtype(p) or torch.float32).is_floating_point:
                raise NoMatch(f"{_describe(p)} casts the probabilities to {_dtype(p)}")
            m.interior[p] = "probabilities"
            p = p.args[0]
        elif _is(p, NOOPS):
            m.interior[p] = "probabilities"
            p = p.args[0]
        else:
            break
    rank = _rank(p)
    if _is(p, SOFTMAX):
        dim = _norm_dim(p.args[1], rank)
        if dim != rank - 1:
            raise NoMatch(f"{_describe(p)} normalizes dim {p.args[1]}, not the key axis (last dim)")
        m.softmax = p
        m.interior[p] = "probabilities"
        upcast = _dtype(p) != _dtype(p.args[0])
        m.form.append("softmax(fp32)" if upcast or _dtype(p) == torch.float32 and _dtype(m.pv) != torch.float32
                      else "softmax")
        return p.args[0]
    x = _manual_softmax(p, m)
    if x is None:
        raise NoMatch(f"the P·V product's probabilities come from {_describe(p)}, not a softmax")
    return x


def _manual_softmax(d: fx.Node, m: Match) -> fx.Node | None:
    """exp(x − max(x)) / sum(exp(x − max(x))) over the last dim (max optional); returns x."""
    if _is(d, DIV):
        e, s = d.args
    elif _is(d, MUL) and _is(d.args[1], (aten.reciprocal.default,)):
        e, s = d.args[0], d.args[1].args[0]
        m.interior[d.args[1]] = "probabilities"
    else:
        return None
    if not (_is(e, (aten.exp.default,)) and _is(s, (aten.sum.dim_IntList,)) and s.args[0] is e):
        return None
    r = _rank(e)
    if [_norm_dim(x, r) for x in s.args[1]] != [r - 1] or not _arg(s, 2, "keepdim", False):
        return None
    z = e.args[0]
    inner = {d: "probabilities", e: "probabilities", s: "probabilities"}
    x = z
    if _is(z, (aten.sub.Tensor,)) and _arg(z, 2, "alpha", 1) == 1:
        mx = z.args[1]
        while _is(mx, (aten.detach.default, aten.alias.default)):
            inner[mx] = "scores"
            mx = mx.args[0]
        if _is(mx, (aten.amax.default,)):
            ok = [_norm_dim(x, r) for x in mx.args[1]] == [r - 1] and _arg(mx, 2, "keepdim", False)
            src = mx.args[0]
            inner[mx] = "scores"
        elif _is(mx, (operator.getitem,)) and mx.args[1] == 0 and _is(mx.args[0], (aten.max.dim,)):
            mnode = mx.args[0]
            ok = _norm_dim(mnode.args[1], r) == r - 1 and _arg(mnode, 2, "keepdim", False)
            src = mnode.args[0]
            inner[mx] = inner[mnode] = "scores"
            for u in mnode.users:  # the indices output is part of the max
                inner[u] = "scores"
        else:
            ok, src = False, None
        if ok and src is z.args[0]:
            x = z.args[0]
            inner[z] = "scores"
        else:
            return None
    m.interior.update(inner)
    m.softmax = d
    m.form.append("manual-softmax")
    return x


def _score_chain(x: fx.Node, m: Match) -> list[Layer]:
    """Walk back from the softmax input to Q·Kᵀ; returns the layers in forward order and fills
    m.q / m.k. Additions and where() are ambiguous (which side is the scores?): both are tried."""
    layers: list[Layer] = []
    while True:
        if _is(x, CASTS):
            src = x.args[0]
            if _dtype(x) is None or _dtype(src) is None or torch.finfo(_dtype(x)).bits < torch.finfo(_dtype(src)).bits:
                raise NoMatch(f"{_describe(x)} narrows the scores from {_dtype(src)} to {_dtype(x)} before the softmax")
            if _dtype(x) != _dtype(src):
                m.form.append("upcast")
            m.interior[x] = "scores"
            x = src
            continue
        if _is(x, NOOPS):
            m.interior[x] = "scores"
            x = x.args[0]
            continue
        if _is(x, MUL + DIV):
            a, b = x.args
            if _is(x, MUL) and _is_scalar_like(a) and not _is_scalar_like(b):
                a, b = b, a
            if isinstance(a, fx.Node) and _is_scalar_like(b) and not _is_scalar_like(a):
                c = _const(b)
                layers.append(Layer("scale", factor=c if c is not None else b, inverse=_is(x, DIV)))
                m.form.append("div(scores)" if _is(x, DIV) else "mul(scores)")
                m.interior[x] = "scores"
                x = a
                continue
            raise NoMatch(f"the scores are multiplied by a non-scalar at {_describe(x)}")
        if _is(x, ADD):
            if _arg(x, 2, "alpha", 1) != 1:
                raise NoMatch(f"{_describe(x)} adds with alpha={_arg(x, 2, 'alpha', 1)}")
            layers.append(Layer("add"))
            m.interior[x] = "scores"
            return _try_sides(x, [(x.args[0], x.args[1]), (x.args[1], x.args[0])], layers, m)
        if _is(x, FILL):
            mask, value = x.args[1], x.args[2]
            if _dtype(mask) != torch.bool:
                raise NoMatch(f"{_describe(x)} fills with a non-bool mask")
            c = _const(value)
            layers.append(Layer("fill", mask=mask, masked_when=True, value=c if c is not None else value))
            m.form.append("masked_fill(-inf)" if c == -math.inf else "masked_fill(finite)")
            m.interior[x] = "scores"
            x = x.args[0]
            continue
        if _is(x, WHERE):
            cond, a, b = x.args
            m.interior[x] = "scores"
            sides = []
            if isinstance(a, fx.Node) and _is_scalar_like(b):
                sides.append((a, b, False))   # where(keep, scores, value)
            if isinstance(b, fx.Node) and _is_scalar_like(a):
                sides.append((b, a, True))    # where(masked, value, scores)
            if not sides:
                raise NoMatch(f"{_describe(x)} selects between two tensors, not scores and a fill value")
            last = None
            for scores, value, masked_when in sides:
                c = _const(value)
                trial = Match(m.pv, m.softmax, m.q, m.k, m.v, interior=dict(m.interior), form=list(m.form))
                try:
                    rest = _score_chain(scores, trial)
                except NoMatch as err:
                    last = err
                    continue
                _adopt(m, trial)
                m.form.append("where(-inf)" if c == -math.inf else "where(finite)")
                return rest + [Layer("fill", mask=cond, masked_when=masked_when,
                                     value=c if c is not None else value)] + layers[::-1]
            raise last
        if _is(x, MATMUL + EINSUM + BADDBMM):
            return _qk_product(x, m) + layers[::-1]
        raise NoMatch(f"the softmax input is not a q·kᵀ product (found {_describe(x)})")


def _adopt(m: Match, trial: Match) -> None:
    m.q, m.k, m.q_scale = trial.q, trial.k, trial.q_scale
    m.interior, m.form = trial.interior, trial.form


def _try_sides(x, pairs, layers, m: Match) -> list[Layer]:
    last = None
    for scores, other in pairs:
        if not isinstance(scores, fx.Node):
            continue
        trial = Match(m.pv, m.softmax, m.q, m.k, m.v, interior=dict(m.interior), form=list(m.form))
        try:
            rest = _score_chain(scores, trial)
        except NoMatch as err:
            last = last or err
            continue
        if not isinstance(other, fx.Node):
            raise NoMatch(f"{_describe(x)} adds a constant to the scores; that is not a mask")
        _adopt(m, trial)
        layers[-1].mask = other
        m.form.append("additive-mask")
        return rest + layers[::-1]
    raise last or NoMatch(f"neither side of {_describe(x)} is a q·kᵀ product")


def _qk_product(x: fx.Node, m: Match) -> list[Layer]:
    """Q·Kᵀ by matmul/bmm/baddbmm/einsum; sets m.q and m.k; returns baddbmm's own layers."""
    m.interior[x] = "scores"
    pre: list[Layer] = []
    if _is(x, EINSUM):
        eq, ops = x.args[0], x.args[1]
        if len(ops) != 2 or "..." in eq:
            raise NoMatch(f"{_describe(x)} einsum {eq!r} is not a two-operand q·kᵀ product")
        lhs, out = eq.replace(" ", "").split("->")
        a, b = lhs.split(",")
        contracted = [c for c in a if c in b and c not in out]
        if len(contracted) != 1 or len(out) < 3:
            raise NoMatch(f"{_describe(x)} einsum {eq!r} does not contract one head-dim axis")
        batch, i, j = out[:-2], out[-2], out[-1]
        c = contracted[0]
        if (set(a) != set(batch + i + c) or set(b) != set(batch + j + c) or len(a) != len(out)
                or len(b) != len(out)):
            raise NoMatch(f"{_describe(x)} einsum {eq!r} is not [batch, q, d]·[batch, k, d] → [batch, q, k]")
        q = Operand(ops[0], [a.index(ch) for ch in batch + i + c])
        k = Operand(ops[1], [b.index(ch) for ch in batch + j + c])
        m.form.append("einsum")
    else:
        if _is(x, BADDBMM):
            inp, qn, kt = x.args[0], x.args[1], x.args[2]
            beta, alpha = _arg(x, 3, "beta", 1), _arg(x, 4, "alpha", 1)
            if alpha != 1:
                pre.append(Layer("scale", factor=float(alpha)))
            if beta not in (0, 1):
                raise NoMatch(f"{_describe(x)} scales its additive input by beta={beta}")
            if beta == 1 and not (_is(inp, (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default))):
                pre.append(Layer("add", mask=inp))
                m.form.append("additive-mask")
            m.form.append("baddbmm")
        else:
            qn, kt = x.args
            m.form.append("bmm" if x.target is aten.bmm.default else "matmul")
        if _rank(qn) < 3 or _rank(kt) != _rank(qn):
            raise NoMatch(f"{_describe(x)} is not a batched q·kᵀ product (ranks {_rank(qn)}, {_rank(kt)})")
        q = Operand(qn, _ident(_rank(qn)))
        k = Operand(kt, _swap_last(_rank(kt)))
    m.q, m.q_scale = _strip_scale(q, m)
    m.k, kscale = _strip_scale(k, m)
    m.q_scale *= kscale
    return pre


def _strip_scale(op: Operand, m: Match) -> tuple[Operand, float]:
    """Look through constant scales and transposes/permutes of a q or k operand."""
    scale, node, perm = 1.0, op.node, op.perm
    while True:
        node = _strip_noops(node)
        if _is(node, MUL + DIV):
            a, b = node.args
            if _is(node, MUL) and _const(a) is not None:
                a, b = b, a
            c = _const(b)
            if c is not None and isinstance(a, fx.Node):
                if c <= 0:
                    raise NoMatch(f"{_describe(node)} scales q or k by {c}; only positive scales are canonical")
                scale = scale / c if _is(node, DIV) else scale * c
                m.form.append("scale(q/k)")
                node = a
                continue
        pv = _as_permute(node)
        if pv is not None and perm != _ident(len(perm)):  # reuse an existing node in the right layout
            node, perm = pv[0], _compose(pv[1], perm)
            continue
        return Operand(node, perm), scale


# ---------------------------------------------------------------- GQA and folded heads

def _strip_full_slices(n: fx.Node) -> fx.Node:
    while _is(n, (aten.slice.Tensor,)):
        start, end = _arg(n, 2, "start"), _arg(n, 3, "end")
        step = _arg(n, 4, "step", 1)
        if start not in (None, 0) or step != 1 or not _same_shape(_shape(n), _shape(n.args[0])):
            break
        n = n.args[0]
    return n


def _unrepeat_kv(op: Operand) -> tuple[Operand, int] | None:
    """Undo repeat_kv (x[:, :, None].expand(B, Hkv, n, T, D).reshape(B, Hkv·n, T, D)) or
    repeat_interleave(x, n, dim=1) on a [B, H, T, D] operand; returns (x, n)."""
    if op.perm != _ident(4):
        return None
    n = _strip_full_slices(op.node)
    dim = _arg(n, 2, "dim", None) if _is(n, (aten.repeat_interleave.self_int,)) else None
    if dim is not None and _norm_dim(dim, 4) == 1:
        return Operand(n.args[0], _ident(4)), int(n.args[1])
    if not _is(n, RESHAPES):
        return None
    e = _strip_full_slices(n.args[0])
    if not _is(e, (aten.expand.default,)) or _rank(e) != 5:
        return None
    u = _strip_full_slices(e.args[0])
    if not (_is(u, (aten.unsqueeze.default,)) and _norm_dim(u.args[1], 5) == 2):
        return None
    x = _strip_full_slices(u.args[0])
    es, xs = _shape(e), _shape(x)
    reps = es[2]
    if not isinstance(reps, int) or not (_same(es[0], xs[0]) and _same(es[1], xs[1]) and _same(es[3], xs[2])
                                        and _same(es[4], xs[3])):
        return None
    return Operand(x, _ident(4)), reps


def _unfold(op: Operand) -> Operand | None:
    """A [B·H, T, D] operand that is a reshape of a [B, H, T, D] tensor, as that 4-D tensor."""
    if op.perm[0] != 0:
        return None
    n = op.node
    if not _is(n, RESHAPES):
        return None
    src = n.args[0]
    s3, s4 = _shape(n), _shape(src)
    if len(s4) != 4 or not (_same(s4[0] * s4[1], s3[0]) and _same(s4[2], s3[1]) and _same(s4[3], s3[2])):
        return None
    return Operand(src, [0, 1] + [p + 1 for p in op.perm[1:]])


# ---------------------------------------------------------------- causal masks

def _triangle(n: fx.Node, depth: int = 0) -> str | None:
    """Which triangle of (i, j) is True in a mask built from tril/triu of ones, sliced from the
    top-left corner: "lower" (j ≤ i) or "strict_upper" (j > i); None when not provable."""
    if depth > 12 or not isinstance(n, fx.Node):
        return None
    flip = {"lower": "strict_upper", "strict_upper": "lower"}
    if _is(n, (aten.logical_not.default, aten.bitwise_not.default)) or (
            _is(n, (aten.eq.Scalar,)) and _const(n.args[1]) == 0):
        t = _triangle(n.args[0], depth + 1)
        return flip.get(t)
    if (_is(n, (aten.ne.Scalar,)) and _const(n.args[1]) == 0) or _is(n, CASTS + NOOPS):
        return _triangle(n.args[0], depth + 1)
    if _is(n, (aten.slice.Tensor,)):
        if _arg(n, 2, "start") not in (None, 0) and _const(_arg(n, 2, "start")) != 0 or _arg(n, 4, "step", 1) != 1:
            return None
        return _triangle(n.args[0], depth + 1)
    if _is(n, RESHAPES + (aten.unsqueeze.default, aten.expand.default)):
        if not _same_shape(_shape(n)[-2:], _shape(n.args[0])[-2:]):
            return None
        return _triangle(n.args[0], depth + 1)
    if _is(n, (aten.tril.default, aten.triu.default)):
        base, diag = n.args[0], _arg(n, 1, "diagonal", 0)
        ones = _is(base, (aten.ones.default, aten.ones_like.default, aten.new_ones.default)) or (
            _is(base, (aten.full.default,)) and (_const(base.args[1]) or 0) != 0)
        if not ones:
            return None
        if n.target is aten.tril.default and diag == 0:
            return "lower"
        if n.target is aten.triu.default and diag == 1:
            return "strict_upper"
        return None
    if n.op == "get_attr":
        t = _attr(n)
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or any(s != 1 for s in t.shape[:-2]):
            return None
        t = t.reshape(t.shape[-2:]) != 0
        if t.shape[0] != t.shape[1]:
            return None
        if torch.equal(t, torch.ones_like(t).tril()):
            return "lower"
        if torch.equal(t, torch.ones_like(t).triu(1)):
            return "strict_upper"
    return None


def _is_causal_term(layer: Layer, scores_shape: tuple) -> bool:
    tq, tk = scores_shape[-2], scores_shape[-1]
    if not _same(tq, tk):
        return False
    if layer.kind == "fill":
        if not _same_shape(_shape(layer.mask)[-2:], (tq, tk)):
            return False
        if not isinstance(layer.value, float) or layer.value > MASKED_OUT:
            return False
        tri = _triangle(layer.mask)
        return tri == ("strict_upper" if layer.masked_when else "lower")
    if layer.kind == "add":  # full((T, T), -inf).triu(1)
        n = layer.mask
        while _is(n, RESHAPES + (aten.unsqueeze.default,) + CASTS + NOOPS):
            n = n.args[0]
        if _is(n, (aten.triu.default,)) and _arg(n, 1, "diagonal", 0) == 1 and _is(n.args[0], (aten.full.default,)):
            v = _const(n.args[0].args[1])
            return v is not None and v <= MASKED_OUT and _same_shape(_shape(n), (tq, tk))
    return False


# ---------------------------------------------------------------- matching

def match(pv: fx.Node) -> Match:
    """Match the attention pattern that ends at the P·V product `pv`, or raise NoMatch(reason)."""
    p, v, out_perm, tag = _pv_product(pv)
    m = Match(pv=pv, softmax=p, q=None, k=None, v=v, out_perm=out_perm)
    x = _probabilities(p, m)
    m.layers = _score_chain(x, m)
    if tag != "matmul":
        m.form.append(f"{tag}(pv)")

    # shapes and dtypes
    q, k, v = m.q, m.k, m.v
    if len(q.shape) != len(k.shape) or len(q.shape) != len(v.shape):
        raise NoMatch(f"q, k, v have different ranks ({len(q.shape)}, {len(k.shape)}, {len(v.shape)})")
    if not (_same_shape(q.shape[:-2], k.shape[:-2]) and _same_shape(k.shape[:-2], v.shape[:-2])):
        raise NoMatch(f"q, k, v batch dims differ ({q.shape[:-2]}, {k.shape[:-2]}, {v.shape[:-2]}): "
                      "the products broadcast, SDPA does not")
    if not (_same(q.shape[-1], k.shape[-1]) and _same(k.shape[-2], v.shape[-2])):
        raise NoMatch(f"q {q.shape}, k {k.shape}, v {v.shape} do not line up as attention")
    dts = {_dtype(q.node), _dtype(k.node), _dtype(v.node), _dtype(pv)}
    if len(dts) != 1:
        raise NoMatch(f"mixed dtypes {sorted(map(str, dts))} among q, k, v and the output")
    scores = _shape(m.softmax)
    if not _same_shape(scores, q.shape[:-1] + (k.shape[-2],)):
        raise NoMatch(f"the mask broadcasts the scores {q.shape[:-1] + (k.shape[-2],)} up to {scores}")
    for layer in m.layers:
        if layer.kind == "scale" and isinstance(layer.factor, float) and layer.factor <= 0:
            raise NoMatch(f"the scores are scaled by {layer.factor}; only positive scales are canonical")
        if layer.kind == "fill" and not isinstance(layer.value, float):
            raise NoMatch(f"the fill value {_describe(layer.value)} of a mask is not a constant")
        if layer.kind == "fill" and layer.value > MASKED_OUT:
            raise NoMatch(f"a masked_fill with {layer.value} does not mask keys out (needs −inf or ≤ {MASKED_OUT:g})")

    # leaks: an intermediate used outside the pattern
    for n, role in m.interior.items():
        for u in n.users:
            if u in m.interior or u is pv or _is(u, ASSERTS):
                continue
            where = "returned as a model output (e.g. output_attentions=True)" if u.op == "output" \
                else f"used by {_describe(u)}"
            raise NoMatch(f"the attention {role} ({n.name}) are also {where} outside the attention pattern")
    return m


# ---------------------------------------------------------------- rewriting

class _Emitter:
    """Inserts nodes before an anchor, with fake-tensor meta["val"] and provenance."""

    def __init__(self, gm: fx.GraphModule, anchor: fx.Node, meta_from: fx.Node, form: str):
        self.graph, self.anchor, self.form = gm.graph, anchor, form
        self.meta = {k: meta_from.meta[k] for k in ("nn_module_stack", "stack_trace") if k in meta_from.meta}
        self.fake_mode = torch._guards.detect_fake_mode([_val(anchor)])

    def __call__(self, op, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            n = self.graph.call_function(op, args, kwargs)
        n.meta.update(self.meta)
        n.meta["rewriter"] = {"rule": "canonicalize", "site": None, "form": self.form}
        fargs, fkwargs = torch.fx.node.map_arg((args, kwargs), lambda a: a.meta.get("val"))
        if self.fake_mode is not None:
            with self.fake_mode:
                n.meta["val"] = op(*fargs, **fkwargs)
        return n

    def operand(self, op: Operand) -> fx.Node:
        if op.perm == _ident(len(op.perm)):
            return op.node
        if op.perm == _swap_last(len(op.perm)):
            return self(aten.transpose.int, op.node, -2, -1)
        return self(aten.permute.default, op.node, op.perm)


def _scalar(emit: _Emitter, value, like: fx.Node) -> fx.Node:
    return emit(aten.full.default, [], value, dtype=_dtype(like), device=_val(like).device)


def _build_mask(emit: _Emitter, m: Match, q: fx.Node) -> tuple[fx.Node | None, bool, list[fx.Node]]:
    """Combine the mask layers into one attn_mask (bool keep-mask or additive float in q's dtype).
    Returns (attn_mask, is_causal, non-constant scale factors left to fold into q)."""
    terms: list[tuple[str, fx.Node]] = []   # ("keep", bool) | ("add", float)
    factors: list[tuple[fx.Node, bool]] = []
    mask_layers = [l for l in m.layers if l.kind != "scale"]
    is_causal = len(mask_layers) == 1 and _is_causal_term(mask_layers[0], _shape(m.softmax))
    if is_causal:
        m.form.append("causal")
        mask_layers = []
    else:
        for l in mask_layers:
            if l.kind == "fill" and _triangle(l.mask) is not None:
                m.form.append("causal-tril")
    for l in m.layers:
        if l.kind == "scale":
            # a scale after a mask scales its additive terms too; bool keep-masks (−inf) stay
            terms = [(kind, t if kind == "keep" else emit(aten.div.Tensor if l.inverse else aten.mul.Tensor,
                                                          t, l.factor)) for kind, t in terms]
            if not isinstance(l.factor, float):
                factors.append((l.factor, l.inverse))
        elif l not in mask_layers:
            continue
        elif l.kind == "add":
            terms.append(("add", l.mask))
        elif l.value == -math.inf and l.masked_when:
            terms.append(("keep", emit(aten.logical_not.default, l.mask)))
        elif l.value == -math.inf:
            terms.append(("keep", l.mask))
        else:  # a finite fill ≤ −1e4: the additive mask where(mask, value, 0)
            fill, zero = _scalar(emit, l.value, q), _scalar(emit, 0.0, q)
            a, b = (fill, zero) if l.masked_when else (zero, fill)
            terms.append(("add", emit(aten.where.self, l.mask, a, b)))
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
            t = emit(aten.where.self, t, _scalar(emit, 0.0, q), _scalar(emit, -math.inf, q))
        elif _dtype(t) != _dtype(q):
            t = emit(aten.to.dtype, t, _dtype(q))
        out = t if out is None else emit(aten.add.Tensor, out, t)
    return out, False, factors


def _mask_to_4d(emit: _Emitter, mask: fx.Node, heads: int) -> fx.Node:
    """A 3-D mask for [B·H, Tq, Tk] scores as one for [B, H, Tq, Tk]."""
    s = _shape(mask)
    if len(s) < 3:
        return mask
    if _same(s[0], 1):
        return emit(aten.unsqueeze.default, mask, 0)
    unfolded = _unfold(Operand(mask, [0, 1, 2]))
    if unfolded is not None and _same(_shape(unfolded.node)[1], heads):
        return unfolded.node
    return emit(aten.unflatten.int, mask, 0, [-1, heads])


def rewrite(gm: fx.GraphModule, m: Match) -> fx.Node:
    """Replace the matched pattern by one SDPA node and erase the written-out nodes; returns it."""
    pv = m.pv
    q, k, v = m.q, m.k, m.v
    scale = m.q_scale
    has_tensor_factor = any(l.kind == "scale" and not isinstance(l.factor, float) for l in m.layers)
    folded = len(q.shape) == 3
    if folded:  # [B·H, T, D]: recover [B, H, T, D] from the reshapes that folded the heads
        q4, k4, v4 = (None, None, None) if has_tensor_factor else (_unfold(q), _unfold(k), _unfold(v))
        if q4 and k4 and v4 and _same_shape(q4.shape[:2], k4.shape[:2]) and _same_shape(k4.shape[:2], v4.shape[:2]):
            (q, qs), (k, ks), v = _strip_scale(q4, m), _strip_scale(k4, m), v4  # scales before the fold
            scale *= qs * ks
            m.form.append("heads-unfolded")
        else:
            m.form.append("heads-folded(3d)")
    gqa = False
    if len(q.shape) == 4:
        rk, rv = _unrepeat_kv(k), _unrepeat_kv(v)
        if rk and rv and rk[1] == rv[1] and rk[1] > 1 and _same(rk[0].shape[1] * rk[1], q.shape[1]):
            k, v, gqa = rk[0], rv[0], True
            m.form.append("gqa")
    for l in m.layers:
        if l.kind == "scale" and isinstance(l.factor, float):
            scale = scale / l.factor if l.inverse else scale * l.factor
    form = _form(m)
    emit = _Emitter(gm, pv, m.softmax, form)
    qn, kn, vn = emit.operand(q), emit.operand(k), emit.operand(v)
    mask, is_causal, factors = _build_mask(emit, m, qn)
    for f, inverse in factors:  # a non-constant scalar scale: (q·f)·kᵀ == f·(q·kᵀ)
        qn = emit(aten.div.Tensor if inverse else aten.mul.Tensor, qn, f)
    if mask is not None and folded and len(q.shape) == 4:
        mask = _mask_to_4d(emit, mask, q.shape[1])
    kwargs = {"scale": float(scale)}
    if gqa:
        kwargs["enable_gqa"] = True
    emit.form = form = _form(m)
    out = emit(SDPA, qn, kn, vn, mask, 0.0, is_causal, **kwargs)
    sdpa = out
    if _shape(out) and folded and len(q.shape) == 4:
        out = emit(aten.flatten.using_ints, out, 0, 1)
    if m.out_perm is not None:
        out = emit(aten.permute.default, out, m.out_perm)
    if _same_shape(_shape(sdpa), _shape(pv)) and "val" in pv.meta:
        sdpa.meta["val"] = pv.meta["val"]
    for n in m.interior:  # metadata asserts would keep the dead pattern alive
        for u in list(n.users):
            if _is(u, ASSERTS):
                gm.graph.erase_node(u)
    pv.replace_all_uses_with(out)
    gm.graph.erase_node(pv)
    # the written-out nodes go explicitly: eliminate_dead_code keeps aten.dropout (it is random)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for n in sorted(m.interior, key=lambda n: -order[n]):
        if not n.users:
            gm.graph.erase_node(n)
    sdpa.meta["canonicalize"] = {"form": form, "is_causal": is_causal, "scale": float(scale), "enable_gqa": gqa}
    return sdpa


FORM_ORDER = ["matmul", "bmm", "baddbmm", "einsum", "scale(q/k)", "mul(scores)", "div(scores)",
              "additive-mask", "masked_fill(-inf)", "masked_fill(finite)", "where(-inf)", "where(finite)",
              "causal-tril", "causal", "upcast", "softmax", "softmax(fp32)", "manual-softmax",
              "dropout(eval)", "bmm(pv)", "einsum(pv)", "gqa", "heads-unfolded", "heads-folded(3d)"]


def _form(m: Match) -> str:
    """The matched variant in forward order, e.g. "matmul+mul(scores)+additive-mask+softmax"."""
    tags = dict.fromkeys(m.form)
    rank = {t: i for i, t in enumerate(FORM_ORDER)}
    return "+".join(sorted(tags, key=lambda t: rank.get(t, len(rank))))


def _pv_candidates(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if _is(n, MATMUL + EINSUM)]


def canonicalize(gm: fx.GraphModule) -> list[dict]:
    """Raise every written-out attention in `gm` to aten.scaled_dot_product_attention, in place.

    Returns one record per rewritten attention: {"node", "form", "module", "is_causal",
    "scale", "enable_gqa"}. Removes the written-out nodes (dead-code elimination) and recompiles.
    The new SDPA node carries the old softmax's nn_module_stack and the old output's "val".
    GQA: when K and V are repeated with repeat_kv, SDPA takes the un-repeated K/V with
    enable_gqa=True (head h reads kv head h // n_rep in both)."""
    records = []
    for pv in _pv_candidates(gm):
        try:
            m = match(pv)
        except NoMatch:
            continue
        module = module_path(m.softmax)
        sdpa = rewrite(gm, m)
        info = sdpa.meta["canonicalize"]
        records.append({"node": sdpa.name, "form": info["form"], "module": module,
                        "is_causal": info["is_causal"], "scale": info["scale"],
                        "enable_gqa": info["enable_gqa"]})
    clean(gm)
    return records


# ---------------------------------------------------------------- explanations

def _softmax_like(gm: fx.GraphModule) -> list[fx.Node]:
    out = []
    for n in gm.graph.nodes:
        if _is(n, SOFTMAX):
            out.append(n)
        elif _is(n, DIV) and _is(n.args[0], (aten.exp.default,)) and _is(n.args[1], (aten.sum.dim_IntList,)):
            out.append(n)
    return out


def _forward_to_pv(s: fx.Node) -> fx.Node | None:
    """The P·V product that consumes softmax `s` (through dropout / casts), if any."""
    frontier, seen = [s], set()
    while frontier:
        n = frontier.pop(0)
        if n in seen:
            continue
        seen.add(n)
        for u in n.users:
            if _is(u, MATMUL) and u.args[0] is n:
                return u
            if _is(u, EINSUM) and u.args[1] and u.args[1][0] is n:
                return u
            if _is(u, DROPOUT + CASTS + NOOPS):
                frontier.append(u)
    return None


def explain_unmatched(gm: fx.GraphModule) -> list[str]:
    """For each softmax in `gm` that is not (yet) an SDPA node, one sentence saying why."""
    out = []
    for s in _softmax_like(gm):
        if "rewriter" in s.meta and s.meta["rewriter"].get("rule") != "canonicalize":
            continue   # a rule's own softmax (e.g. Hedgehog feature maps), not a missed attention
        where = module_path(s) or "<root>"
        head = f"softmax at {where} ({s.name})"
        r = _rank(s)
        if _is(s, SOFTMAX) and _norm_dim(s.args[1], r) != r - 1:
            out.append(f"{head}: it normalizes dim {s.args[1]}, not the key axis (the last dim)")
            continue
        pv = _forward_to_pv(s)
        if pv is None:
            users = ", ".join(_describe(u) if u.op != "output" else "the model output" for u in s.users)
            out.append(f"{head}: its output does not feed a probabilities·V product (used by {users or 'nothing'})")
            continue
        try:
            m = match(pv)
        except NoMatch as err:
            out.append(f"{head}: {err}")
            continue
        out.append(f"{head}: matches {_form(m)}; canonicalize() has not run on this graph")
    return out
