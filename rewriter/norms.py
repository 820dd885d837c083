"""Normalizations in a traced graph, as aten ops or written out, and where one reads a value.

LayerNorm (Ba et al., arXiv:1607.06450): (x − mean(x)) · rsqrt(var + eps) · weight + bias;
RMSNorm (Zhang & Sennrich, arXiv:1910.07467): x · rsqrt(mean(x²) + eps) · weight; either as
aten.layer_norm / aten.rms_norm or written out, with divisions by sqrt for the rsqrt products,
with or without dtype casts, and Gemma's (1 + weight) scale.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .graph import CASTS, COPIES, arg, is_op, strip_casts

aten = torch.ops.aten

# what analysis looks through as "the same value": casts and copies of any overload, detach, and
# (for `strip`) shape-only reshapes and eval-mode dropout
VALUE_CASTS = {op.overloadpacket for op in CASTS | COPIES} | {aten.detach, aten.lift_fresh_copy}
RESHAPES = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.view_as,
            aten.reshape_as, aten.squeeze, aten.unsqueeze}
QK_NORM = {aten.layer_norm, aten.rms_norm, aten.pow, aten.mean, aten.rsqrt, aten.sqrt}
_FUSED_RMS = getattr(aten, "_fused_rms_norm", None)


def is_dropout_identity(n) -> bool:
    """aten.dropout(x, p, train) in an eval-mode trace (train=False) or with p == 0."""
    if not is_op(n, aten.dropout):
        return False
    return arg(n, 2, "train", True) is False or arg(n, 1, "p", 0.5) == 0


def strip(n, *, reshapes: bool = True):
    """Follow casts, clones, identity dropout (and shape-only reshapes) back to the value's source."""
    ops = VALUE_CASTS | (RESHAPES if reshapes else set())
    return strip_casts(n, lambda m: is_op(m, ops) or is_dropout_identity(m))


def strip_cast(n):
    return strip(n, reshapes=False)


def same_value(a, b) -> bool:
    """Both are graph values and the same one once casts, copies and reshapes are looked through."""
    return isinstance(a, fx.Node) and isinstance(b, fx.Node) and strip(a) is strip(b)


def operands(n):
    """The first two arguments of a call, (None, None) where it has fewer or is no node."""
    return (n.args[0], n.args[1]) if isinstance(n, fx.Node) and len(n.args) >= 2 else (None, None)


def _equiv(a, b) -> bool:
    """The same value, or the same op on the same operands (traces do not de-duplicate `x - mean`)."""
    if same_value(a, b):
        return True
    a, b = strip(a), strip(b)
    return (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == b.op == "call_function"
            and a.target == b.target and len(a.args) == len(b.args) and a.kwargs == b.kwargs
            and all(same_value(x, y) if isinstance(x, fx.Node) else x == y for x, y in zip(a.args, b.args)))


def _is_square_of(sq, x) -> bool:
    sq = strip_cast(sq)
    a, b = operands(sq)
    if is_op(sq, aten.pow):
        return b == 2 and _equiv(a, x)
    return is_op(sq, aten.mul) and _equiv(a, x) and _equiv(b, x)


def _normalized(n) -> list[tuple[fx.Node, fx.Node]]:
    """(c, s) for each way `n` reads as c · rsqrt(s + eps) or c / sqrt(s + eps) (eps may be missing)."""
    a, b = operands(n)
    pairs = [(a, b, aten.rsqrt), (b, a, aten.rsqrt)] if is_op(n, aten.mul) else \
        [(a, b, aten.sqrt)] if is_op(n, aten.div) else []
    out = []
    for c, r, root in pairs:
        r = strip_cast(r)
        if isinstance(c, fx.Node) and is_op(r, root):
            d = strip_cast(r.args[0])
            stats = [strip_cast(t) for t in operands(d) if isinstance(t, fx.Node)] if is_op(d, aten.add) else [d]
            out += [(c, s) for s in stats]
    return out


def _rms_core(n):
    """x · rsqrt(mean(x²) + eps) or x / sqrt(mean(x²) + eps) → x."""
    for x, s in _normalized(n):
        if is_op(s, aten.mean) and _is_square_of(s.args[0], x):
            return x
    return None


def _ln_core(n):
    """(x − mean(x)) · rsqrt(var + eps) or (x − mean(x)) / sqrt(var + eps) → x, the variance as
    aten.var / var_mean or written out as mean((x − mean(x))²)."""
    for c, s in _normalized(n):
        c = strip_cast(c)
        x, m = operands(c)
        if not (is_op(c, aten.sub) and is_op(strip_cast(m), aten.mean) and same_value(strip_cast(m).args[0], x)):
            continue
        var_mean = is_op(s, operator.getitem) and is_op(s.args[0], aten.var_mean)
        if is_op(s, aten.var, aten.var_mean) and same_value(s.args[0], x) or (
                var_mean and same_value(s.args[0].args[0], x)) or (is_op(s, aten.mean) and _is_square_of(s.args[0], c)):
            return x
    return None


def _is_weightish(w) -> bool:
    """A norm's scale: a weight attribute, possibly cast, or Gemma's (1 + weight)."""
    w = strip_cast(w)
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return True
    ab = operands(w) if is_op(w, aten.add) else ()
    return any(isinstance(t, fx.Node) and strip_cast(t).op == "get_attr" for t in ab) and \
        any(isinstance(t, (int, float)) for t in ab)


def _core(n):
    for core, kind in ((_ln_core, "layer_norm"), (_rms_core, "rms_norm")):  # LN = RMS of x − mean: LN first
        x = core(n)
        if x is not None:
            return kind, x
    return None


def _norm(n) -> tuple[str, fx.Node] | None:
    """(kind, input) of a normalization: an aten op, or written out as core, core · w, w · core, core · w + b."""
    if not isinstance(n, fx.Node):
        return None
    n = strip_cast(n)
    if is_op(n, operator.getitem) and n.args[1] == 0 and is_op(n.args[0], aten.native_layer_norm, _FUSED_RMS):
        n = n.args[0]   # the output of a fused op that also returns its statistics
    if is_op(n, aten.layer_norm, aten.native_layer_norm):
        return "layer_norm", n.args[0]
    if is_op(n, aten.rms_norm, _FUSED_RMS):
        return "rms_norm", n.args[0]
    if is_op(n, aten.add):
        for m, bias in (operands(n), operands(n)[::-1]):
            if isinstance(m, fx.Node) and isinstance(bias, fx.Node) and strip_cast(bias).op == "get_attr":
                found = _norm_mul(strip_cast(m))
                if found is not None:
                    return found
        return None
    return _norm_mul(n)


def _norm_mul(n) -> tuple[str, fx.Node] | None:
    found = _core(n)
    if found is None and is_op(n, aten.mul):
        for c, w in (operands(n), operands(n)[::-1]):
            if found is None and isinstance(c, fx.Node) and _is_weightish(w):
                found = _core(strip_cast(c))
    return found


def norm_kind(n: fx.Node) -> str | None:
    """"layer_norm" / "rms_norm" if `n` is (the output of) a normalization: aten.layer_norm,
    aten.rms_norm, or one written out — RMSNorm as x · rsqrt(mean(x²) + eps) · weight and LayerNorm
    as (x − mean(x)) · rsqrt(var + eps) · weight + bias, with or without dtype casts; else None."""
    found = _norm(n)
    return found[0] if found else None


def norm_input(n: fx.Node) -> fx.Node | None:
    """The tensor a normalization node normalizes (the node as the graph has it), or None if `n`
    is not a normalization (see `norm_kind`)."""
    found = _norm(n)
    return found[1] if found else None


def first_user(start: fx.Node, hit, through, *, depth: int | None = None,
               limit: float = float("inf")) -> fx.Node | None:
    """Breadth-first over the users of `start`: the first node u, reached from m, with hit(u, m);
    the walk goes on only through nodes whose op is in `through`, for at most `depth` levels and
    `limit` nodes."""
    frontier, seen, level = [start], {start}, 0
    while frontier and len(seen) < limit and (depth is None or level < depth):
        nxt = []
        for m in frontier:
            for u in m.users:
                if u in seen:
                    continue
                seen.add(u)
                if hit(u, m):
                    return u
                if is_op(u, through):
                    nxt.append(u)
        frontier, level = nxt, level + 1
    return None


_NORM_WALK = VALUE_CASTS | QK_NORM | {aten.mul, aten.add, aten.sub, aten.div, aten.var, aten.var_mean, operator.getitem}


def norm_output_after(n: fx.Node, depth: int = 12) -> fx.Node | None:
    """The output node of a normalization that reads `n` directly (through casts), if any: the
    last node of that norm's pattern, e.g. layer_norm, or RMSNorm's final weight multiply."""
    def hit(u, _):
        inp = norm_input(u)
        return inp is not None and same_value(inp, n) and not _extends_norm(u)
    return first_user(n, hit, _NORM_WALK, depth=depth)


def _extends_norm(u: fx.Node) -> bool:
    """Whether a user of `u` is a larger match of the same norm (core → core·w → core·w + b)."""
    inp = norm_input(u)
    return any(w is not u and norm_input(w) is not None and same_value(norm_input(w), inp)
               for v in u.users for w in [v, *v.users])
