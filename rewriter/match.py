"""The attention matcher: every written-out form canonicalize accepts, as data, and the walk that
reads a graph against it.

The walk anchors at the probabilities·V product and goes back towards Q·Kᵀ (as torch.fx's
SubgraphMatcher anchors at a pattern's outputs). At each node it tries the alternatives of
`PATTERN` that stand where the walk is (`at`) and accept the node's op (and guard, `when`); an
alternative's `take` checks the node, adds what it contributes to the match (q, k, v, the
softmax, a scale or mask layer) and names the node the walk goes on from, and the walk records
the alternative's tag, as onnxscript's OrValue(..., tag_var=...) does. Where several alternatives
accept a node (which operand of an add holds the scores?), each is tried on a copy of the match,
in table order; the first that matches the rest of the pattern wins, else the first reason
stands. The table is in forward order, and so is the form string built from the tags:

    matmul+div(scores)+additive-mask+softmax+dropout(eval)
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.fx as fx

from rewriter.kernels.keymask import MASKED

from .graph import CASTS, COPIES, arg, const_value, dtype, is_op, rank, same_shape, same_size, shape, value

aten = torch.ops.aten

MATMUL = frozenset({aten.matmul.default, aten.bmm.default})
EINSUM = frozenset({aten.einsum.default})
BADDBMM = frozenset({aten.baddbmm.default})
SOFTMAX = frozenset({aten.softmax.int, aten._softmax.default, aten._safe_softmax.default})
DROPOUT = frozenset({aten.dropout.default})
MUL = frozenset({aten.mul.Tensor, aten.mul.Scalar})
DIV = frozenset({aten.div.Tensor, aten.div.Scalar})
ADD = frozenset({aten.add.Tensor})
FILL = frozenset({aten.masked_fill.Scalar, aten.masked_fill.Tensor})
WHERE = frozenset({aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf})
RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})
ASSERTS = frozenset({aten._assert_tensor_metadata.default})
# nonlinear functions of the scores that SDPA cannot express (Gemma 2's logit soft-capping: cap·tanh(s/cap))
NONLINEAR = frozenset({aten.tanh.default, aten.sigmoid.default, aten.clamp.default, aten.clamp.Tensor,
                       aten.abs.default})

MASKED_OUT = MASKED  # fill values at or below this mask (rewriter.kernels.keymask: exp underflows to 0)


class NoMatch(Exception):
    """The walk met something that is not part of an attention pattern; str() says what."""


def describe(n) -> str:
    if not isinstance(n, fx.Node):
        return repr(n)
    what = n.target if n.op == "call_function" else n.op
    name = getattr(what, "__name__", str(what))
    if hasattr(what, "_schema"):
        name = f"aten.{what._schema.name.split('::')[-1]}"
    return f"{name} ({n.name})"


def is_scalar_like(x) -> bool:
    """A factor that scales every score alike: a number, a sym value, or a one-element tensor."""
    v = value(x)
    if isinstance(v, (torch.SymInt, torch.SymFloat, int, float)):
        return not isinstance(v, bool)
    return isinstance(v, torch.Tensor) and all(same_size(s, 1) for s in v.shape)


# ---------------------------------------------------------------- operands and permutations

def norm_dim(d: int, r: int) -> int:
    return d + r if d < 0 else d


def ident(r: int) -> list[int]:
    return list(range(r))


def swap_last(r: int) -> list[int]:
    p = ident(r)
    p[-2], p[-1] = p[-1], p[-2]
    return p


def _as_permute(n: fx.Node) -> tuple[fx.Node, list[int]] | None:
    """n == src.permute(perm) for a transpose / permute / mT node."""
    r = rank(n)
    if is_op(n, aten.transpose.int):
        p = ident(r)
        a, b = norm_dim(n.args[1], r), norm_dim(n.args[2], r)
        p[a], p[b] = p[b], p[a]
        return n.args[0], p
    if is_op(n, aten.permute.default):
        return n.args[0], [norm_dim(d, r) for d in n.args[1]]
    return (n.args[0], swap_last(r)) if is_op(n, aten.mT.default) else None


@dataclass
class Operand:
    """A q/k/v value for SDPA: `node.permute(perm)`, then optionally unflattened/un-repeated."""
    node: fx.Node
    perm: list[int]

    @property
    def shape(self) -> tuple:
        s = shape(self.node)
        return tuple(s[i] for i in self.perm)


@dataclass
class Layer:
    """One elementwise step between Q·Kᵀ and the softmax, in forward order."""
    kind: str                 # "scale" | "add" | "fill"
    factor: object = None     # scale: float or Node; inverse=True means divide
    inverse: bool = False
    mask: fx.Node | None = None   # add: the additive tensor; fill: the bool mask
    masked_when: bool = True  # fill: the mask value that marks a dropped key
    value: object = None      # fill: float or Node
    folded: bool = False      # the mask is laid out for [B·H, Tq, Tk] scores (heads folded into the batch)


@dataclass
class Match:
    pv: fx.Node
    softmax: fx.Node | None = None    # the softmax (or the div of a written-out one)
    q: Operand | None = None
    k: Operand | None = None
    v: Operand | None = None
    q_scale: float = 1.0
    layers: list[Layer] = field(default_factory=list)
    interior: dict = field(default_factory=dict)   # node -> role ("scores" / "probabilities")
    out_perm: list[int] | None = None               # einsum output layout
    tags: list[str] = field(default_factory=list)
    heads: int | None = None          # H of [B·H, …] products around a [B, H, Tq, Tk] softmax (BLOOM, DeBERTa)
    scores_unfolded: bool = False     # [B·H, Tq, Tk] scores viewed as [B, H, Tq, Tk] before the softmax
    kv_broadcast: bool = False        # K and V hold one head that the products broadcast to all (multi-query)

    def record(self, tag: str) -> None:
        assert tag in FORM_ORDER, tag
        self.tags.append(tag)

    def form(self) -> str:
        """The matched variant in forward order, e.g. "matmul+mul(scores)+additive-mask+softmax"."""
        return "+".join(sorted(dict.fromkeys(self.tags), key=FORM_ORDER.index))


def strip_scale(op: Operand, m: Match) -> tuple[Operand, float]:
    """Look through constant scales and transposes/permutes of a q or k operand."""
    scale, n, perm = 1.0, op.node, op.perm
    while True:
        while is_op(n, COPIES):
            n = n.args[0]
        if is_op(n, MUL, DIV):
            a, b = n.args
            if is_op(n, MUL) and const_value(a) is not None:
                a, b = b, a
            c = const_value(b)
            if c is not None and isinstance(a, fx.Node):
                if c <= 0:
                    raise NoMatch(f"{describe(n)} scales q or k by {c}; only positive scales are canonical")
                scale = scale / c if is_op(n, DIV) else scale * c
                m.record("scale(q/k)")
                n = a
                continue
        src = _as_permute(n)
        if src is not None and perm != ident(len(perm)):  # reuse an existing node in the right layout
            n, perm = src[0], [src[1][i] for i in perm]
            continue
        return Operand(n, perm), scale


# ---------------------------------------------------------------- the alternatives' takes
# take(x, m): check x (NoMatch says why not), add what x contributes to m, return the node the walk
# goes on from (None where the pattern ends).

def _pv_matmul(pv, m):
    p, v = pv.args[0], pv.args[1]
    if rank(p) < 3 or rank(v) != rank(p):
        raise NoMatch(f"{describe(pv)} is not a batched P·V product (ranks {rank(p)} and {rank(v)})")
    m.v = Operand(v, ident(rank(v)))
    return p


def _einsum(x, what: str) -> tuple[str, str, str]:
    """The subscripts (first operand, second operand, output) of a two-operand einsum."""
    eq, ops = x.args[0], x.args[1]
    if len(ops) != 2 or "..." in eq:
        raise NoMatch(f"{describe(x)} einsum {eq!r} is not a two-operand {what} product")
    lhs, out = eq.replace(" ", "").split("->")
    return (*lhs.split(","), out)


def _pv_einsum(pv, m):
    (a, b, out), eq, ops = _einsum(pv, "P·V"), pv.args[0], pv.args[1]
    batch, i, j = a[:-2], a[-2], a[-1]
    e = [c for c in b if c not in a]
    if (len(e) != 1 or j not in b or j in out or i not in out or any(c not in b or c not in out for c in batch)
            or len(b) != len(a) or len(out) != len(a)):
        raise NoMatch(f"{describe(pv)} einsum {eq!r} does not contract P's key axis with V")
    want_v, want_out = batch + j + e[0], batch + i + e[0]
    m.v = Operand(ops[1], [b.index(c) for c in want_v])
    m.out_perm = None if out == want_out else [want_out.index(c) for c in out]
    return ops[0]


def _eval_dropout(p, m):
    prob, train = arg(p, 1, "p", 0.5), arg(p, 2, "train", True)
    if train and prob > 0:
        raise NoMatch(f"dropout {describe(p)} on the probabilities is live (p={prob}, train=True): "
                      "SDPA would draw a different random mask; trace the model in eval mode")
    return p.args[0]


def _heads_of(four, three) -> int | None:
    """H where the 4-D value `four` [B, H, Tq, Tk] and the 3-D value `three` [B·H, Tq, Tk] are the
    same tensor with the heads folded into the batch; else None."""
    s4, s3 = shape(four), shape(three)
    if len(s4) != 4 or len(s3) != 3 or not isinstance(s4[1], int):
        return None
    return s4[1] if same_size(s4[0] * s4[1], s3[0]) and same_shape(s4[2:], s3[1:]) else None


def _folds_heads(p, m) -> bool:
    return _heads_of(p.args[0], p) is not None


def _folded_probabilities(p, m):
    """[B, H, Tq, Tk] probabilities viewed as [B·H, Tq, Tk] for a batched P·V product."""
    m.heads = _heads_of(p.args[0], p)
    return p.args[0]


def _unfolds_heads(x, m) -> bool:
    return _heads_of(x, x.args[0]) is not None


def _unfolded_scores(x, m):
    """[B·H, Tq, Tk] scores viewed as [B, H, Tq, Tk] (masks added there are 4-D, those before it
    3-D): walks the rest of the scores itself, marking the layers it meets as folded."""
    heads = _heads_of(x, x.args[0])
    if m.heads != heads:
        folded = f"folded from {m.heads}" if m.heads else "not folded back"
        raise NoMatch(f"{describe(x)} views the scores as {heads} heads, but the probabilities are {folded} "
                      "before the P·V product")
    below = len(m.layers)
    _walk(x.args[0], "scores", m)
    for layer in m.layers[:len(m.layers) - below]:
        layer.folded = True
    m.scores_unfolded = True
    return None


def _nonlinear_scores(x, m):
    """Refused, with the reason, once the operand did read as scores (else that reason is better)."""
    _walk(x.args[0], "scores", m)
    raise NoMatch(f"{describe(x)} is a nonlinear function of the scores (e.g. logit soft-capping, "
                  "cap·tanh(s/cap)); SDPA only scales and masks them, so this attention stays written out")


def _float_cast(p, m):
    if not (dtype(p) or torch.float32).is_floating_point:
        raise NoMatch(f"{describe(p)} casts the probabilities to {dtype(p)}")
    return p.args[0]


def _through(x, m):
    return x.args[0]


def _softmax(p, m):
    if norm_dim(p.args[1], rank(p)) != rank(p) - 1:
        raise NoMatch(f"{describe(p)} normalizes dim {p.args[1]}, not the key axis (last dim)")
    m.softmax = p
    return p.args[0]


def _fp32_softmax(p, m) -> bool:
    return dtype(p) != dtype(p.args[0]) or dtype(p) == torch.float32 and dtype(m.pv) != torch.float32


def _last_dim(n, dims, keepdim: bool) -> bool:
    return [norm_dim(x, rank(n)) for x in dims] == [rank(n) - 1] and keepdim


def _manual_softmax(d, m):
    """exp(x − max(x)) / sum(exp(x − max(x))) over the last dim (max optional); returns x."""
    if is_op(d, MUL) and is_op(d.args[1], aten.reciprocal.default):   # e · reciprocal(sum)
        e, s = d.args[0], d.args[1].args[0]
        del m.interior[d]   # the reciprocal first, as leak reports have always listed them
        m.interior[d.args[1]] = "probabilities"
    else:
        e, s = d.args if is_op(d, DIV) else (None, None)
    if not (is_op(e, aten.exp.default) and is_op(s, aten.sum.dim_IntList) and s.args[0] is e
            and _last_dim(e, s.args[1], arg(s, 2, "keepdim", False))):
        raise NoMatch(_no_step(d, "probabilities"))
    inner = {d: "probabilities", e: "probabilities", s: "probabilities"}
    x = z = e.args[0]
    if is_op(z, aten.sub.Tensor) and arg(z, 2, "alpha", 1) == 1:
        mx = z.args[1]
        while is_op(mx, aten.detach.default, aten.alias.default):
            inner[mx] = "scores"
            mx = mx.args[0]
        src = None
        if is_op(mx, aten.amax.default) and _last_dim(e, mx.args[1], arg(mx, 2, "keepdim", False)):
            src, inner[mx] = mx.args[0], "scores"
        elif is_op(mx, operator.getitem) and mx.args[1] == 0 and is_op(mx.args[0], aten.max.dim):
            top = mx.args[0]
            inner[mx] = inner[top] = "scores"
            inner.update((u, "scores") for u in top.users)   # the indices output is part of the max
            if _last_dim(e, [top.args[1]], arg(top, 2, "keepdim", False)):
                src = top.args[0]
        if src is None or src is not z.args[0]:
            raise NoMatch(_no_step(d, "probabilities"))
        x, inner[z] = z.args[0], "scores"
    m.interior.update(inner)
    m.softmax = d
    return x


def _cast_scores(x, m):
    src = x.args[0]
    for t in (x, src):
        if dtype(t) is not None and not dtype(t).is_floating_point:
            raise NoMatch(f"{describe(t)} holds the scores as {dtype(t)} before the softmax")
    if dtype(x) is None or dtype(src) is None or torch.finfo(dtype(x)).bits < torch.finfo(dtype(src)).bits:
        raise NoMatch(f"{describe(x)} narrows the scores from {dtype(src)} to {dtype(x)} before the softmax")
    return src


def _widens(x, m) -> bool:
    return dtype(x) != dtype(x.args[0])


def _scale_operands(x, m=None) -> tuple[fx.Node, object] | None:
    """(scores, factor) of scores · factor, factor · scores or scores / factor with a scalar factor;
    as a guard, whether `x` is such a scale."""
    a, b = x.args
    if is_op(x, MUL) and is_scalar_like(a) and not is_scalar_like(b):
        a, b = b, a
    return (a, b) if isinstance(a, fx.Node) and is_scalar_like(b) and not is_scalar_like(a) else None


def _scale(x, m):
    scores, factor = _scale_operands(x)
    c = const_value(factor)
    m.layers.insert(0, Layer("scale", factor=c if c is not None else factor, inverse=is_op(x, DIV)))
    return scores


def _additive(side: int):
    """The add's operand `side` holds the scores, the other the additive mask."""
    def take(x, m):
        m.layers.insert(0, Layer("add", mask=x.args[1 - side]))
        return x.args[side]
    return take


def _adds_constant(x, m):
    """Refused, but only once the other operand did read as scores (else that reason is better)."""
    _walk(x.args[0] if isinstance(x.args[0], fx.Node) else x.args[1], "scores", m)
    raise NoMatch(f"{describe(x)} adds a constant to the scores; that is not a mask")


def _adds(nodes: int):
    """Guard: an add (alpha 1) of which `nodes` operands are graph values."""
    return lambda x, m: arg(x, 2, "alpha", 1) == 1 and sum(isinstance(a, fx.Node) for a in x.args[:2]) == nodes


def _fill(x, m):
    if dtype(x.args[1]) != torch.bool:
        raise NoMatch(f"{describe(x)} fills with a non-bool mask")
    c = const_value(x.args[2])
    m.layers.insert(0, Layer("fill", mask=x.args[1], masked_when=True, value=c if c is not None else x.args[2]))
    return x.args[0]


def _fills(neg_inf: bool):
    return lambda x, m: (const_value(x.args[2]) == -math.inf) == neg_inf


def _select(side: int):
    """where(keep, scores, fill) (side 1) or where(masked, fill, scores) (side 2)."""
    def take(x, m):
        fill = x.args[3 - side]
        c = const_value(fill)
        m.layers.insert(0, Layer("fill", mask=x.args[0], masked_when=side == 2, value=c if c is not None else fill))
        return x.args[side]
    return take


def _selects(side: int, neg_inf: bool):
    def when(x, m):
        scores, fill = x.args[side], x.args[3 - side]
        return isinstance(scores, fx.Node) and is_scalar_like(fill) and (const_value(fill) == -math.inf) == neg_inf
    return when


def _set_qk(m: Match, q: Operand, k: Operand) -> None:
    m.q, m.q_scale = strip_scale(q, m)
    m.k, kscale = strip_scale(k, m)
    m.q_scale *= kscale


def _qk_matmul(x, m, qn=None, kt=None):
    qn, kt = (qn, kt) if qn is not None else x.args
    if rank(qn) < 3 or rank(kt) != rank(qn):
        raise NoMatch(f"{describe(x)} is not a batched q·kᵀ product (ranks {rank(qn)}, {rank(kt)})")
    _set_qk(m, Operand(qn, ident(rank(qn))), Operand(kt, swap_last(rank(kt))))


def _qk_baddbmm(x, m):
    """baddbmm(input, q, kᵀ, beta, alpha) = beta·input + alpha·q·kᵀ: its own scale and additive mask."""
    inp, qn, kt = x.args[0], x.args[1], x.args[2]
    beta, alpha = arg(x, 3, "beta", 1), arg(x, 4, "alpha", 1)
    pre = [Layer("scale", factor=float(alpha))] if alpha != 1 else []
    if beta not in (0, 1):
        raise NoMatch(f"{describe(x)} scales its additive input by beta={beta}")
    if beta == 1 and not is_op(inp, aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default):
        pre.append(Layer("add", mask=inp))
        m.record("additive-mask")
    m.layers[:0] = pre
    _qk_matmul(x, m, qn, kt)


def _qk_einsum(x, m):
    (a, b, out), eq, ops = _einsum(x, "q·kᵀ"), x.args[0], x.args[1]
    contracted = [c for c in a if c in b and c not in out]
    if len(contracted) != 1 or len(out) < 3:
        raise NoMatch(f"{describe(x)} einsum {eq!r} does not contract one head-dim axis")
    batch, i, j, c = out[:-2], out[-2], out[-1], contracted[0]
    if set(a) != set(batch + i + c) or set(b) != set(batch + j + c) or len(a) != len(out) or len(b) != len(out):
        raise NoMatch(f"{describe(x)} einsum {eq!r} is not [batch, q, d]·[batch, k, d] → [batch, q, k]")
    _set_qk(m, Operand(ops[0], [a.index(ch) for ch in batch + i + c]),
            Operand(ops[1], [b.index(ch) for ch in batch + j + c]))


# ---------------------------------------------------------------- the pattern

@dataclass(frozen=True)
class Alt:
    """One alternative of a step: the form tag it records, where the walk stands when it applies
    (`at`), the ops it accepts, a guard, `take`, and where the walk goes on after it (`then`; None:
    the pattern is complete). Rows with at=None are tags the rewrite records (`ops` says what from)."""
    tag: str | None
    at: str | None
    ops: frozenset
    take: Callable | None = None
    then: str | None = None
    when: Callable = lambda x, m: True


MATMUL_ONLY, BMM = frozenset({aten.matmul.default}), frozenset({aten.bmm.default})

PATTERN = (   # Alt(tag, at, ops, take, then, when), in forward order
    # Q·Kᵀ: the scores' source, where the walk ends
    Alt("matmul", "scores", MATMUL_ONLY, _qk_matmul),
    Alt("bmm", "scores", BMM, _qk_matmul),
    Alt("baddbmm", "scores", BADDBMM, _qk_baddbmm),
    Alt("einsum", "scores", EINSUM, _qk_einsum),
    Alt("scale(q/k)", None, MUL | DIV),          # a constant factor on q or k (strip_scale)
    # between Q·Kᵀ and the softmax: scale, additive mask, fill mask
    Alt("mul(scores)", "scores", MUL, _scale, "scores", _scale_operands),
    Alt("div(scores)", "scores", DIV, _scale, "scores", _scale_operands),
    Alt("additive-mask", "scores", ADD, _additive(0), "scores", _adds(2)),
    Alt("additive-mask", "scores", ADD, _additive(1), "scores", _adds(2)),
    Alt(None, "scores", ADD, _adds_constant, None, _adds(1)),
    Alt("masked_fill(-inf)", "scores", FILL, _fill, "scores", _fills(True)),
    Alt("masked_fill(finite)", "scores", FILL, _fill, "scores", _fills(False)),
    Alt("where(-inf)", "scores", WHERE, _select(1), "scores", _selects(1, True)),
    Alt("where(finite)", "scores", WHERE, _select(1), "scores", _selects(1, False)),
    Alt("where(-inf)", "scores", WHERE, _select(2), "scores", _selects(2, True)),
    Alt("where(finite)", "scores", WHERE, _select(2), "scores", _selects(2, False)),
    Alt("causal-tril", None, FILL),              # a triangular mask among others
    Alt("causal", None, FILL | ADD),             # the only mask is causal: is_causal=True
    Alt(None, "scores", NONLINEAR, _nonlinear_scores),
    Alt("view(scores)", "scores", RESHAPES, _unfolded_scores, None, _unfolds_heads),
    Alt("upcast", "scores", CASTS, _cast_scores, "scores", _widens),
    Alt(None, "scores", CASTS, _cast_scores, "scores", lambda x, m: not _widens(x, m)),
    Alt(None, "scores", COPIES, _through, "scores"),
    # the softmax, over the key axis
    Alt("softmax", "probabilities", SOFTMAX, _softmax, "scores", lambda x, m: not _fp32_softmax(x, m)),
    Alt("softmax(fp32)", "probabilities", SOFTMAX, _softmax, "scores", _fp32_softmax),
    Alt("manual-softmax", "probabilities", DIV | MUL, _manual_softmax, "scores"),
    # between the softmax and P·V
    Alt("dropout(eval)", "probabilities", DROPOUT, _eval_dropout, "probabilities"),
    Alt(None, "probabilities", CASTS, _float_cast, "probabilities"),
    Alt(None, "probabilities", COPIES, _through, "probabilities"),
    Alt("view(probabilities)", "probabilities", RESHAPES, _folded_probabilities, "probabilities",
        _folds_heads),
    # P·V: the anchor
    Alt(None, "pv", MATMUL_ONLY, _pv_matmul, "probabilities"),
    Alt("bmm(pv)", "pv", BMM, _pv_matmul, "probabilities"),
    Alt("einsum(pv)", "pv", EINSUM, _pv_einsum, "probabilities"),
    # how the rewrite lays out q, k and v
    Alt("gqa", None, RESHAPES | {aten.repeat_interleave.self_int}),   # un-repeated K/V, enable_gqa=True
    Alt("mqa", None, MATMUL),                   # one K/V head the products broadcast: enable_gqa=True
    Alt("heads-unfolded", None, RESHAPES),       # [B·H, T, D] operands as [B, H, T, D]
    Alt("heads-folded(3d)", None, RESHAPES),     # left [B·H, T, D]
)
FORM_ORDER = list(dict.fromkeys(a.tag for a in PATTERN if a.tag))


def _no_step(x, at: str) -> str:
    """Why `x`, met where the walk stands `at`, is no step of the pattern."""
    d = describe(x)
    if at == "pv":
        return f"{d} is not a matmul/bmm/einsum"
    if at == "probabilities":
        return f"the P·V product's probabilities come from {d}, not a softmax"
    if is_op(x, MUL, DIV):
        return f"the scores are multiplied by a non-scalar at {d}"
    if is_op(x, ADD):
        alpha = arg(x, 2, "alpha", 1)
        return f"{d} adds with alpha={alpha}" if alpha != 1 else f"neither side of {d} is a q·kᵀ product"
    if is_op(x, WHERE):
        return f"{d} selects between two tensors, not scores and a fill value"
    return f"the softmax input is not a q·kᵀ product (found {d})"


def _walk(x, at: str, m: Match) -> None:
    """Match the pattern back from `x`, which stands `at`, filling `m`; NoMatch if it does not fit."""
    alts = [a for a in PATTERN if a.at == at and is_op(x, a.ops) and a.when(x, m)]
    if not alts:
        raise NoMatch(_no_step(x, at))
    first = None
    for a in alts:
        trial = replace(m, layers=list(m.layers), interior=dict(m.interior), tags=list(m.tags))
        if at != "pv":   # the anchor is replaced, not part of the interior
            trial.interior[x] = at
        try:
            after = a.take(x, trial)
            if a.then:
                _walk(after, a.then, trial)
        except NoMatch as err:
            first = first or err
            continue
        vars(m).update(vars(trial))
        if a.tag:
            m.record(a.tag)
        return
    raise first


def _one_kv_head(q: tuple, k: tuple, v: tuple) -> bool:
    """[B, H, T, D] queries against [B, 1, T, D] keys and values (multi-query attention written as a
    broadcasting product): SDPA's enable_gqa with one kv head computes the same."""
    return len(q) == len(k) == len(v) == 4 and all(same_size(q[0], t[0]) for t in (k, v)) \
        and all(same_size(t[1], 1) for t in (k, v)) and isinstance(q[1], int) and q[1] > 1


def match(pv: fx.Node) -> Match:
    """Match the attention pattern that ends at the P·V product `pv`, or raise NoMatch(reason)."""
    m = Match(pv)
    _walk(pv, "pv", m)
    q, k, v = m.q, m.k, m.v
    if m.heads is not None and not m.scores_unfolded:
        raise NoMatch(f"the probabilities are folded from {m.heads} heads before the P·V product, but "
                      "the scores are not unfolded to them after Q·Kᵀ")
    if len(q.shape) != len(k.shape) or len(q.shape) != len(v.shape):
        raise NoMatch(f"q, k, v have different ranks ({len(q.shape)}, {len(k.shape)}, {len(v.shape)})")
    if not (same_shape(q.shape[:-2], k.shape[:-2]) and same_shape(k.shape[:-2], v.shape[:-2])):
        if not _one_kv_head(q.shape, k.shape, v.shape):
            raise NoMatch(f"q, k, v batch dims differ ({q.shape[:-2]}, {k.shape[:-2]}, {v.shape[:-2]}): "
                          "the products broadcast, SDPA does not")
        m.kv_broadcast = True
        m.record("mqa")
    if not (same_size(q.shape[-1], k.shape[-1]) and same_size(k.shape[-2], v.shape[-2])):
        raise NoMatch(f"q {q.shape}, k {k.shape}, v {v.shape} do not line up as attention")
    dts = {dtype(q.node), dtype(k.node), dtype(v.node), dtype(pv)}
    if len(dts) != 1:
        raise NoMatch(f"mixed dtypes {sorted(map(str, dts))} among q, k, v and the output")
    scores, product = shape(m.softmax), q.shape[:-1] + (k.shape[-2],)
    if m.scores_unfolded:   # [B·H, Tq, Tk] products, [B, H, Tq, Tk] softmax
        if len(scores) == 4 and same_size(scores[0] * scores[1], product[0]):
            product = scores[:2] + product[1:]
        if any(t.perm[0] != 0 for t in (q, k, v)):
            raise NoMatch(f"q, k, v do not keep the folded batch·heads dim first "
                          f"({q.perm}, {k.perm}, {v.perm})")
    elif len(q.shape) == 3:   # [B·H, T, D] throughout: every mask is laid out for the folded scores
        for layer in m.layers:
            layer.folded = True
    if not same_shape(scores, product):
        raise NoMatch(f"the mask broadcasts the scores {product} up to {scores}")
    for layer in m.layers:
        if layer.kind == "scale" and isinstance(layer.factor, float) and layer.factor <= 0:
            raise NoMatch(f"the scores are scaled by {layer.factor}; only positive scales are canonical")
        if layer.kind == "fill" and not isinstance(layer.value, float):
            raise NoMatch(f"the fill value {describe(layer.value)} of a mask is not a constant")
        if layer.kind == "fill" and layer.value > MASKED_OUT:
            raise NoMatch(f"a masked_fill with {layer.value} does not mask keys out "
                          f"(needs −inf or ≤ {MASKED_OUT:g})")
    for n, role in m.interior.items():  # leaks: an intermediate used outside the pattern
        for u in n.users:
            if u in m.interior or u is pv or is_op(u, ASSERTS):
                continue
            where = "returned as a model output (e.g. output_attentions=True)" if u.op == "output" \
                else f"used by {describe(u)}"
            raise NoMatch(f"the attention {role} ({n.name}) are also {where} outside the attention pattern")
    return m
