"""Analyze: one AttentionSite per canonical aten.scaled_dot_product_attention node.

Read-only. For each SDPA node (graph order) the analyzer walks the traced graph:

* back from q/k/v through layout ops (view/reshape/transpose/permute/expand/slice/split/getitem/
  casts), RoPE arithmetic (Su et al., "RoFormer", arXiv:2104.09864: x·cos + rotate_half(x)·sin,
  rotate_half = cat(−x₂, x₁)) and GQA head repetition (Ainslie et al., "GQA", arXiv:2305.13245;
  HF `repeat_kv` = unsqueeze + expand + reshape) to the projection: aten.linear, aten.addmm
  (GPT-2 Conv1D, weight [in, out]) or aten.mm/matmul with a weight attribute;
* forward from the SDPA output through the head merge to the output projection, then through
  dropout / casts / layer scale to the residual add whose other operand is the stream the q/k/v
  projections read (directly: post-norm, or through a norm: pre-norm; Xiong et al., "On Layer
  Normalization in the Transformer Architecture", arXiv:2002.04745);
* up the attention mask's ancestors to decide its kind (see `_mask_kind`).

A field that cannot be determined is None (projections, residual) and the reason is written to
``site.extra["notes"]``; unusual graphs never raise.

Before (what a site describes, pre-norm decoder)::

    x ─ norm ─┬─ q_proj ─ view ─ transpose ─ RoPE ───────────────┐
              ├─ k_proj ─ view ─ transpose ─ RoPE ─ repeat_kv ─ sdpa(q, k, v, mask) ─ transpose ─ reshape ─ o_proj ─ add(x, ·)
              └─ v_proj ─ view ─ transpose ─────── repeat_kv ─┘                                                       ↑
    x ────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘
"""
from __future__ import annotations

import math
import operator
import re

import torch
import torch.fx as fx

from .graph import SDPA, fetch_attr, sdpa_args
from .site import AttentionSite

aten = torch.ops.aten

# ---- op classes ----------------------------------------------------------------------------------

_CASTS = {aten.to, aten._to_copy, aten.type_as, aten.clone, aten.contiguous, aten.alias, aten.detach,
          aten.lift_fresh_copy}
_RESHAPES = {aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.view_as,
             aten.reshape_as, aten.squeeze, aten.unsqueeze}
_LAYOUT = _RESHAPES | {aten.transpose, aten.permute, aten.t, aten.expand, aten.expand_as, aten.repeat,
                       aten.repeat_interleave, aten.slice, aten.select, aten.narrow, aten.split,
                       aten.split_with_sizes, aten.chunk, aten.unbind, aten.tensor_split}
_ROPE_ARITH = {aten.mul, aten.add, aten.sub, aten.neg, aten.cat, aten.stack, aten.view_as_complex,
               aten.view_as_real, aten.div}
# q/k normalization (QK-norm, e.g. OLMo / Qwen3) sits between projection and SDPA
_QK_NORM = {aten.layer_norm, aten.rms_norm, aten.pow, aten.mean, aten.rsqrt, aten.sqrt}
_WALK_BACK = _CASTS | _LAYOUT | _ROPE_ARITH | _QK_NORM | {aten.dropout, operator.getitem}
_WALK_TO_OPROJ = _CASTS | _LAYOUT | {operator.getitem}
_PROJECTIONS = {aten.linear, aten.addmm, aten.mm, aten.matmul}
_WEIGHT_WRAPPERS = _CASTS | {aten.t, aten.transpose, aten.permute}
_ORDER_CMP = {aten.le, aten.lt, aten.ge, aten.gt}

_MAX_WALK = 400        # nodes visited per walk: a transformer block is far smaller; stops runaway walks
_MAX_PARALLEL_ADDS = 3  # parallel blocks (GPT-J: x + attn(ln x) + mlp(ln x)) add branches before x


def _packet(n) -> object | None:
    if not isinstance(n, fx.Node) or n.op != "call_function":
        return None
    return getattr(n.target, "overloadpacket", n.target)


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def _is_data(n) -> bool:
    """A node carrying tensor data (not a shape SymInt such as aten.sym_size)."""
    v = _val(n)
    if v is None:
        return n.op in ("call_function", "get_attr", "placeholder")
    return not isinstance(v, (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool))


def _data_inputs(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if _is_data(a)]


def _int(x) -> int | None:
    """A concrete int from an int or a SymInt (its hint: the size the graph was traced at)."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            hint = x.node.hint
            if hint is None:
                hint = x.node.shape_env.size_hint(x.node.expr)
            return int(hint)
        except Exception:
            return None
    return None


def _is_dropout_identity(n: fx.Node) -> bool:
    """aten.dropout(x, p, train) in an eval-mode trace (train=False) or with p == 0."""
    if _packet(n) is not aten.dropout:
        return False
    p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
    train = n.args[2] if len(n.args) > 2 else n.kwargs.get("train", True)
    return train is False or p == 0


def _strip(n, *, reshapes: bool = True):
    """Follow casts, clones, identity dropout (and shape-only reshapes) back to the value's source."""
    ops = _CASTS | (_RESHAPES if reshapes else set())
    while isinstance(n, fx.Node) and (_packet(n) in ops or _is_dropout_identity(n)) and n.args \
            and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _strip_cast(n):
    return _strip(n, reshapes=False)


# ---- projections ---------------------------------------------------------------------------------

def _projection(n) -> tuple[fx.Node, fx.Node] | None:
    """(data input, weight get_attr) if `n` is a linear / addmm / mm / matmul with a 2-D weight attribute."""
    p = _packet(n)
    if p not in _PROJECTIONS:
        return None
    if p is aten.addmm:
        if len(n.args) < 3:
            return None
        x, w = n.args[1], n.args[2]
    else:
        if len(n.args) < 2:
            return None
        x, w = n.args[0], n.args[1]
    while isinstance(w, fx.Node) and _packet(w) in _WEIGHT_WRAPPERS and w.args:
        w = w.args[0]
    if not (isinstance(w, fx.Node) and w.op == "get_attr" and isinstance(x, fx.Node)):
        return None
    wv = _val(w)
    if isinstance(wv, torch.Tensor) and wv.dim() != 2:
        return None
    return x, w


def _out_features(proj: fx.Node) -> int | None:
    v = _val(proj)
    return _int(v.shape[-1]) if isinstance(v, torch.Tensor) and v.dim() >= 1 else None


def _walk_back(start: fx.Node) -> tuple[list[fx.Node], set[fx.Node]]:
    """Projections reachable from `start` through layout / RoPE / repeat_kv ops (stopping at each
    projection), and every node visited on the way."""
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = [start]
    while stack and len(seen) < _MAX_WALK:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _projection(n) is not None:
            if n not in found:
                found.append(n)
            continue
        if _packet(n) in _WALK_BACK:
            stack.extend(_data_inputs(n))
    return found, seen


def _module_path(n: fx.Node) -> str:
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    last = list(stack.values())[-1]
    path = last[0] if isinstance(last, (tuple, list)) else str(last)
    return str(path)


def _common_prefix(a: str, b: str) -> int:
    k = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        k += 1
    return k


def _pick(cands: list[fx.Node], module: str, what: str, notes: list[str]) -> fx.Node | None:
    if not cands:
        notes.append(f"no projection (linear/addmm/matmul with a weight) was found behind {what}")
        return None
    if len(cands) == 1:
        return cands[0]
    # several: keep those whose module path is nearest the attention module's
    best = max(_common_prefix(_module_path(c), module) for c in cands)
    near = [c for c in cands if _common_prefix(_module_path(c), module) == best]
    if len(near) == 1:
        return near[0]
    notes.append(f"{what} derives from several projections ({', '.join(c.name for c in cands)}); "
                 "none is reported")
    return None


# ---- RoPE ----------------------------------------------------------------------------------------

def _has_rope(path: set[fx.Node]) -> bool:
    """rotate_half (cat/stack of −x₂ and x₁, slices of one tensor) whose result is multiplied,
    or a complex rotation (view_as_complex then mul), on the path from projection to SDPA."""
    for n in path:
        p = _packet(n)
        if p in (aten.cat, aten.stack) and n.args and isinstance(n.args[0], (list, tuple)):
            parts = [a for a in n.args[0] if isinstance(a, fx.Node)]
            negs = [a for a in parts if _packet(a) is aten.neg]
            if negs and any(_packet(_strip_cast(a.args[0])) in (aten.slice, aten.select, aten.narrow,
                                                              operator.getitem) for a in negs):
                if _multiplied(n, path):
                    return True
        if p is aten.view_as_complex and _multiplied(n, path):
            return True
    return False


def _multiplied(n: fx.Node, path: set[fx.Node], depth: int = 4) -> bool:
    """Whether `n` (through a few layout ops) feeds a mul on the path."""
    frontier = [n]
    for _ in range(depth):
        nxt = []
        for m in frontier:
            for u in m.users:
                if u in path and _packet(u) is aten.mul:
                    return True
                if u in path and _packet(u) in _LAYOUT | _CASTS:
                    nxt.append(u)
        frontier = nxt
    return False


# ---- normalization -------------------------------------------------------------------------------

def _args2(n: fx.Node):
    return (n.args[0], n.args[1]) if len(n.args) >= 2 else (None, None)


def _same(a, b) -> bool:
    return isinstance(a, fx.Node) and isinstance(b, fx.Node) and _strip(a) is _strip(b)


def _equiv(a, b) -> bool:
    """The same value, or the same op on the same operands (traces do not de-duplicate `x - mean`)."""
    if _same(a, b):
        return True
    a, b = _strip(a), _strip(b)
    return (isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.op == b.op == "call_function"
            and a.target == b.target and len(a.args) == len(b.args) and a.kwargs == b.kwargs
            and all(_same(x, y) if isinstance(x, fx.Node) else x == y for x, y in zip(a.args, b.args)))


def _is_square_of(sq, x) -> bool:
    sq = _strip_cast(sq)
    if _packet(sq) is aten.pow:
        a, e = _args2(sq)
        return e == 2 and _equiv(a, x)
    if _packet(sq) is aten.mul:
        a, b = _args2(sq)
        return _equiv(a, x) and _equiv(b, x)
    return False


def _denominator_ok(d, inner) -> bool:
    """d = add(inner_stat, eps) with inner(stat) true (eps may be missing)."""
    d = _strip_cast(d)
    if _packet(d) is aten.add:
        a, b = _args2(d)
        return any(isinstance(t, fx.Node) and inner(_strip_cast(t)) for t in (a, b))
    return inner(d)


def _rms_core(n):
    """x · rsqrt(mean(x²) + eps) or x / sqrt(mean(x²) + eps) → x (Zhang & Sennrich, arXiv:1910.07467)."""
    p = _packet(n)
    pairs = []
    if p is aten.mul:
        a, b = _args2(n)
        pairs = [(a, b, aten.rsqrt), (b, a, aten.rsqrt)]
    elif p is aten.div:
        a, b = _args2(n)
        pairs = [(a, b, aten.sqrt)]
    for x, r, fn in pairs:
        if not (isinstance(x, fx.Node) and isinstance(r, fx.Node)):
            continue
        r = _strip_cast(r)
        if _packet(r) is not fn:
            continue
        def is_ms(t, x=x):
            return _packet(t) is aten.mean and _is_square_of(t.args[0], x)
        if _denominator_ok(r.args[0], is_ms):
            return x
    return None


def _ln_core(n):
    """(x − mean(x)) · rsqrt(var + eps) or (x − mean(x)) / sqrt(var + eps) → x (Ba et al., arXiv:1607.06450)."""
    p = _packet(n)
    if p not in (aten.mul, aten.div):
        return None
    a, b = _args2(n)
    for c, r in ((a, b), (b, a)) if p is aten.mul else ((a, b),):
        c, r = _strip_cast(c), _strip_cast(r)
        if _packet(c) is not aten.sub or _packet(r) is not (aten.rsqrt if p is aten.mul else aten.sqrt):
            continue
        x, m = _args2(c)
        if not (isinstance(m, fx.Node) and _packet(_strip_cast(m)) is aten.mean and _same(_strip_cast(m).args[0], x)):
            continue
        def is_var(t, c=c, x=x):
            if _packet(t) in (aten.var, aten.var_mean):
                return _same(t.args[0], x)
            if _packet(t) is operator.getitem and _packet(t.args[0]) is aten.var_mean:
                return _same(t.args[0].args[0], x)
            return _packet(t) is aten.mean and _is_square_of(t.args[0], c)
        if _denominator_ok(r.args[0], is_var):
            return x
    return None


def _is_weightish(w) -> bool:
    """A norm's scale: a weight attribute, possibly cast, or Gemma's (1 + weight)."""
    w = _strip_cast(w)
    if isinstance(w, fx.Node) and w.op == "get_attr":
        return True
    if _packet(w) is aten.add:
        a, b = _args2(w)
        return any(isinstance(t, fx.Node) and _strip_cast(t).op == "get_attr" for t in (a, b)) and \
            any(isinstance(t, (int, float)) for t in (a, b))
    return False


def _norm(n) -> tuple[str, fx.Node] | None:
    if not isinstance(n, fx.Node):
        return None
    n = _strip_cast(n)
    p = _packet(n)
    if p in (aten.layer_norm, aten.native_layer_norm):
        return "layer_norm", n.args[0]
    if p in (aten.rms_norm, getattr(aten, "_fused_rms_norm", None)):
        return "rms_norm", n.args[0]
    if p is operator.getitem and n.args[1] == 0 and _packet(n.args[0]) in (aten.native_layer_norm,
                                                                         getattr(aten, "_fused_rms_norm", None)):
        inner = n.args[0]
        return ("layer_norm" if _packet(inner) is aten.native_layer_norm else "rms_norm"), inner.args[0]
    # written out: core, core · w, w · core, core · w + b
    if p is aten.add:
        a, b = _args2(n)
        for m, bias in ((a, b), (b, a)):
            if isinstance(m, fx.Node) and isinstance(bias, fx.Node) and _strip_cast(bias).op == "get_attr":
                found = _norm_mul(_strip_cast(m))
                if found is not None:
                    return found
        return None
    return _norm_mul(n)


def _norm_mul(n) -> tuple[str, fx.Node] | None:
    for core, kind in ((_ln_core, "layer_norm"), (_rms_core, "rms_norm")):  # LN = RMS of x − mean: LN first
        x = core(n)
        if x is not None:
            return kind, x
    if _packet(n) is aten.mul:
        a, b = _args2(n)
        for c, w in ((a, b), (b, a)):
            if isinstance(c, fx.Node) and _is_weightish(w):
                c = _strip_cast(c)
                for core, kind in ((_ln_core, "layer_norm"), (_rms_core, "rms_norm")):  # LN = RMS of x − mean: LN first
                    x = core(c)
                    if x is not None:
                        return kind, x
    return None


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


def _first_user(start: fx.Node, hit, through, *, depth: int | None = None,
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
                if _packet(u) in through:
                    nxt.append(u)
        frontier, level = nxt, level + 1
    return None


_NORM_WALK = _CASTS | _QK_NORM | {aten.mul, aten.add, aten.sub, aten.div, aten.var, aten.var_mean, operator.getitem}


def _norm_output_after(n: fx.Node, depth: int = 12) -> fx.Node | None:
    """The output node of a normalization that reads `n` directly (through casts), if any: the
    last node of that norm's pattern, e.g. layer_norm, or RMSNorm's final weight multiply."""
    def hit(u, _):
        inp = norm_input(u)
        return inp is not None and _same(inp, n) and not _extends_norm(u)
    return _first_user(n, hit, _NORM_WALK, depth=depth)


norm_output_after = _norm_output_after   # public name, used by rules that find a block's end


def _extends_norm(u: fx.Node) -> bool:
    """Whether a user of `u` is a larger match of the same norm (core → core·w → core·w + b)."""
    inp = norm_input(u)
    for v in u.users:
        for w in [v, *v.users]:
            if w is not u and norm_input(w) is not None and _same(norm_input(w), inp):
                return True
    return False


# ---- output projection and residual --------------------------------------------------------------

def _find_o_proj(sdpa: fx.Node) -> fx.Node | None:
    def hit(u, m):
        pr = _projection(u)
        return pr is not None and pr[0] is m
    return _first_user(sdpa, hit, _WALK_TO_OPROJ, limit=_MAX_WALK)


def _is_branch_passthrough(u: fx.Node, cur: fx.Node) -> bool:
    """dropout, casts, head-merge reshapes, and layer scale (x · γ) on the attention branch."""
    p = _packet(u)
    if p in _CASTS | _RESHAPES or p is aten.dropout or (p is aten.native_dropout):
        return bool(u.args) and u.args[0] is cur
    if p is operator.getitem:
        return _packet(cur) is aten.native_dropout and u.args[1] == 0
    if p is aten.mul:
        a, b = _args2(u)
        other = b if a is cur else a
        return isinstance(other, (int, float)) or (isinstance(other, fx.Node) and _strip_cast(other).op == "get_attr")
    return False


def _find_residual(o_node: fx.Node, stream: list[fx.Node]) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(residual add, branch operand, residual operand): walking forward from the output projection,
    the first aten.add whose other operand is one of the `stream` values."""
    frontier, seen, adds = [o_node], {o_node}, 0
    while frontier and len(seen) < _MAX_WALK:
        nxt = []
        for cur in frontier:
            for u in cur.users:
                if u in seen:
                    continue
                if _packet(u) is aten.add and len(u.args) >= 2 and isinstance(u.args[0], fx.Node) \
                        and isinstance(u.args[1], fx.Node) and cur in u.args[:2]:
                    seen.add(u)
                    other = u.args[1] if u.args[0] is cur else u.args[0]
                    if any(_same(other, s) for s in stream):
                        return u, cur, other
                    if adds < _MAX_PARALLEL_ADDS:
                        adds += 1
                        nxt.append(u)
                elif _is_branch_passthrough(u, cur):
                    seen.add(u)
                    nxt.append(u)
        frontier = nxt
    return None


# ---- mask ----------------------------------------------------------------------------------------

def _ancestors(n: fx.Node) -> set[fx.Node]:
    out, stack = set(), [n]
    while stack:
        m = stack.pop()
        if m in out:
            continue
        out.add(m)
        stack.extend(_data_inputs(m))
    return out


def _is_mask_like(p: fx.Node) -> bool:
    return "mask" in p.name.lower() or "mask" in str(p.target).lower()


def _structural_causal(anc: set[fx.Node]) -> bool:
    """A causal construction among the mask's ancestors: tril/triu, or an ordering comparison
    (le/lt/ge/gt) of two position-index tensors (both derived from aten.arange)."""
    from_arange: dict[fx.Node, bool] = {}

    def positional(m: fx.Node) -> bool:
        if m not in from_arange:
            from_arange[m] = any(_packet(a) is aten.arange for a in _ancestors(m))
        return from_arange[m]

    for n in anc:
        p = _packet(n)
        if p in (aten.tril, aten.triu):
            return True
        if p in _ORDER_CMP and len(n.args) >= 2 and all(isinstance(a, fx.Node) and _is_data(a) for a in n.args[:2]):
            if positional(n.args[0]) and positional(n.args[1]):
                return True
    return False


def _evaluate(gm: fx.GraphModule, mask: fx.Node, anc: set[fx.Node], fill: set[fx.Node]) -> torch.Tensor:
    """Run the mask's subgraph at the traced sizes (SymInt hints), with the `fill` placeholders set
    to ones (an attention_mask with no padding). Raises if something cannot be evaluated."""
    env: dict[fx.Node, object] = {}

    def value(a):
        if a in env:
            return env[a]
        v = _val(a)
        if isinstance(v, (torch.SymInt, int)):
            iv = _int(v)
            if iv is None:
                raise ValueError(f"no size hint for {a.name}")
            return iv
        if isinstance(v, (float, bool)):
            return v
        raise ValueError(f"{a.name} is not a size and not in the mask's subgraph")

    with torch.no_grad():
        for n in gm.graph.nodes:
            if n not in anc:
                continue
            if n.op == "placeholder":
                if n not in fill:
                    raise ValueError(f"mask depends on input {n.name}")
                v = _val(n)
                shape = [_int(s) for s in v.shape]
                if any(s is None for s in shape):
                    raise ValueError(f"no size hint for input {n.name}")
                env[n] = torch.ones(shape, dtype=v.dtype)
            elif n.op == "get_attr":
                env[n] = fetch_attr(gm, n.target)
            elif n.op == "call_function":
                args = fx.node.map_arg(n.args, value)
                kwargs = fx.node.map_arg(n.kwargs, value)
                if "device" in kwargs:   # evaluate on the CPU whatever the trace device was
                    kwargs = {**kwargs, "device": torch.device("cpu")}
                if n.target is aten.to.device:
                    args = (args[0], torch.device("cpu"), *args[2:])
                args = fx.node.map_aggregate(args, lambda x: x.cpu() if isinstance(x, torch.Tensor) else x)
                env[n] = n.target(*args, **kwargs)
            else:
                raise ValueError(f"mask subgraph has a {n.op} node ({n.name})")
    out = env[mask]
    if not isinstance(out, torch.Tensor):
        raise ValueError("mask did not evaluate to a tensor")
    return out


def _classify(m: torch.Tensor, lq: int, lk: int) -> str:
    """"none" (every key allowed), "causal" (key j allowed iff j ≤ i + lk − lq) or "arbitrary"."""
    if m.dtype == torch.bool:
        allowed = m
    elif m.is_floating_point():
        blocked = (m <= -1e4) | torch.isneginf(m)
        if not bool(((m == 0) | blocked).all()):
            return "arbitrary"  # an additive bias (ALiBi, relative position), not a mask
        allowed = ~blocked
    else:
        return "arbitrary"
    allowed = torch.broadcast_to(allowed, (*allowed.shape[:-2], lq, lk))
    if bool(allowed.all()):
        return "none"
    causal = torch.ones(lq, lk, dtype=torch.bool).tril(lk - lq)
    return "causal" if bool((allowed == causal).all()) else "arbitrary"


def _mask_kind(gm: fx.GraphModule, sdpa: fx.Node, q, k, notes: list[str], cache: dict) -> str:
    """Mask kind of one SDPA node.

    "causal" when is_causal=True or the mask is causal; "padding" when the mask reads a user input
    whose name says it is a mask (attention_mask); "causal+padding" both — a user-supplied
    attention_mask makes a causal LM's mask causal+padding even if the example held only ones,
    because at run time it may not; "none" when there is no mask or it allows every key;
    "arbitrary" otherwise (sliding windows, biases, masks computed from other inputs).

    Decided by evaluating the mask's subgraph at the traced sizes with the attention_mask input
    set to ones (no padding) and comparing against all-true and the causal triangle; when that
    cannot run, by structure (tril/triu or an ordering comparison of two arange-derived tensors).
    """
    a = sdpa_args(sdpa)
    mask, is_causal = a["attn_mask"], a["is_causal"]
    if mask is None:
        return "causal" if is_causal is True else "none"
    if not isinstance(mask, fx.Node):
        notes.append("attn_mask is not a graph value; mask kind reported as arbitrary")
        return "arbitrary"
    lq = _int(q.shape[-2]) if isinstance(q, torch.Tensor) else None
    lk = _int(k.shape[-2]) if isinstance(k, torch.Tensor) else None
    key = (mask, lq, lk, is_causal)
    if key in cache:
        kind, note = cache[key]
        if note:
            notes.append(note)
        return kind
    anc = _ancestors(mask)
    inputs = [n for n in anc if n.op == "placeholder"]
    mask_inputs = {n for n in inputs if _is_mask_like(n)}
    other_inputs = [n.name for n in inputs if n not in mask_inputs]
    padding = bool(mask_inputs)
    base, note = None, None
    if not other_inputs and lq is not None and lk is not None:
        try:
            base = _classify(_evaluate(gm, mask, anc, mask_inputs), lq, lk)
            if lq <= 1 and base == "none":
                base = None  # one query row cannot tell causal from full attention
        except Exception as e:
            note = f"mask {mask.name} could not be evaluated ({type(e).__name__}: {e}); kind decided by structure"
    if base is None:
        causal = is_causal is True or _structural_causal(anc)
        if other_inputs:
            base = "arbitrary"
            note = (f"mask {mask.name} is computed from input(s) {', '.join(sorted(other_inputs))}, "
                    "which are not attention masks; reported as arbitrary")
        else:
            base = "causal" if causal else ("none" if padding else "arbitrary")
    kind = {"none": "padding" if padding else "none",
            "causal": "causal+padding" if padding else "causal"}.get(base, "arbitrary")
    if base == "arbitrary" and note is None:
        note = f"mask {mask.name} is neither causal nor padding-only (e.g. a sliding window, a bias or a fixed buffer)"
    cache[key] = (kind, note)
    if note:
        notes.append(note)
    return kind


# ---- analyze -------------------------------------------------------------------------------------

def _layer_of(path: str) -> int | None:
    for part in path.split("."):
        if re.fullmatch(r"\d+", part):
            return int(part)
    return None


def analyze(gm: fx.GraphModule) -> list[AttentionSite]:
    """One AttentionSite per aten.scaled_dot_product_attention node of `gm`, in graph order.
    The graph is not modified."""
    sites: list[AttentionSite] = []
    mask_cache: dict = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is SDPA:
            try:
                sites.append(_site(gm, n, len(sites), mask_cache))
            except Exception as e:  # an unforeseen graph shape must not stop inspect/optimize
                sites.append(_bare_site(n, len(sites), e))
    return sites


def _bare_site(sdpa: fx.Node, index: int, error: Exception) -> AttentionSite:
    """What is certain about an SDPA node whose analysis failed: shapes, scale; mask "arbitrary"
    so that no rule relies on it."""
    a = sdpa_args(sdpa)
    qv, kv = _val(a["query"]), _val(a["key"])
    four = isinstance(qv, torch.Tensor) and qv.dim() == 4
    head_dim = _int(qv.shape[-1]) if isinstance(qv, torch.Tensor) else 0
    scale = a["scale"] if isinstance(a["scale"], (int, float)) else (1 / math.sqrt(head_dim) if head_dim else float("nan"))
    module = _module_path(sdpa)
    return AttentionSite(
        index=index, node=sdpa.name, module=module, layer=_layer_of(module),
        heads=(_int(qv.shape[1]) or 0) if four else 0,
        kv_heads=(_int(kv.shape[1]) or 0) if isinstance(kv, torch.Tensor) and kv.dim() == 4 else 0,
        head_dim=head_dim or 0, scale=float(scale), mask="arbitrary",
        extra={"notes": [f"analysis of {sdpa.name} failed ({type(error).__name__}: {error}); "
                         "only its shapes are reported"], "proj_input": None, "gqa_repeat": False})


def _site(gm: fx.GraphModule, sdpa: fx.Node, index: int, mask_cache: dict) -> AttentionSite:
    notes: list[str] = []
    a = sdpa_args(sdpa)
    qn, kn, vn = a["query"], a["key"], a["value"]
    qv, kv = _val(qn), _val(kn)
    module = _module_path(sdpa)
    if not sdpa.meta.get("nn_module_stack"):
        notes.append("the SDPA node has no nn_module_stack; module path unknown")

    # projections
    q_cands, q_path = _walk_back(qn)
    k_cands, k_path = _walk_back(kn)
    v_cands, _ = _walk_back(vn)
    q_proj = _pick(q_cands, module, "q", notes)
    k_proj = _pick(k_cands, module, "k", notes)
    v_proj = _pick(v_cands, module, "v", notes)
    fused = q_proj is not None and q_proj is k_proj is v_proj
    if not fused and k_proj is not None and k_proj is v_proj:
        notes.append("k and v come from one fused kv projection")

    def weight(p):
        return _projection(p)[1].target if p is not None else None

    # shapes
    head_dim = _int(qv.shape[-1]) if isinstance(qv, torch.Tensor) else None
    if isinstance(qv, torch.Tensor) and qv.dim() == 4:
        heads = _int(qv.shape[1])
    else:
        out = _out_features(q_proj) if q_proj is not None and not fused else None
        heads = out // head_dim if out and head_dim else None
        notes.append("q is not [B, H, T, D]; heads " + ("from the q projection width" if heads else "unknown"))
    sdpa_kv = _int(kv.shape[1]) if isinstance(kv, torch.Tensor) and kv.dim() == 4 else heads
    k_dim = _int(kv.shape[-1]) if isinstance(kv, torch.Tensor) else head_dim
    kv_heads = sdpa_kv
    if k_proj is not None and k_dim:
        width = _out_features(k_proj)
        if fused and width and head_dim and heads:
            rest = width // head_dim - heads          # (H + 2·KV)·D wide
            if width % head_dim == 0 and rest > 0 and rest % 2 == 0:
                kv_heads = rest // 2
        elif width and width % k_dim == 0:
            kv_heads = width // k_dim
    if kv_heads and heads and (heads % kv_heads or kv_heads > heads):
        notes.append(f"k projection width gives {kv_heads} kv heads, which does not divide {heads} heads; "
                     f"using the SDPA key's {sdpa_kv}")
        kv_heads = sdpa_kv
    gqa_repeat = bool(kv_heads and sdpa_kv and kv_heads < sdpa_kv)
    if heads is None or kv_heads is None or head_dim is None:
        notes.append("q/k shapes are unknown (no meta['val']); heads/head_dim reported as 0")
    scale = a["scale"]
    if not isinstance(scale, (int, float)):
        if scale is not None:
            notes.append("the SDPA scale is not a constant; reporting the default 1/sqrt(head_dim)")
        scale = 1.0 / math.sqrt(head_dim) if head_dim else float("nan")

    # positional encoding
    positional = "rope" if _has_rope(q_path) else None
    if positional != ("rope" if _has_rope(k_path) else None):
        notes.append("q and k disagree on the rotary embedding; reported from q")

    # output projection, residual add, norm
    o_proj = _find_o_proj(sdpa)
    if o_proj is None:
        notes.append("no output projection (linear/addmm/matmul with a weight) follows the SDPA output")
    x_in = _projection(q_proj)[0] if q_proj is not None else (
        _projection(k_proj)[0] if k_proj is not None else None)
    stream: list[fx.Node] = []
    pre = None
    if x_in is not None:
        x = _strip(x_in)
        stream.append(x)
        if norm_kind(x) is not None:
            pre = x
            stream.append(norm_input(x))
    residual = _find_residual(o_proj, stream) if o_proj is not None and stream else None
    residual_add = branch = res_in = None
    norm, norm_node = "none", None
    if residual is not None:
        residual_add, branch, res_in = residual
        if pre is not None and _same(res_in, norm_input(pre)) and not _same(res_in, pre):
            norm, norm_node = "pre", pre
        else:
            post = _norm_output_after(residual_add)
            if post is not None:
                norm, norm_node = "post", post
    else:
        if o_proj is not None:
            notes.append("no residual add whose other operand is the attention's input stream was found "
                         "after the output projection")
        if pre is not None:
            norm, norm_node = "pre", pre
            notes.append("pre-norm reported from the projection input alone (no residual add found)")

    mask = _mask_kind(gm, sdpa, qv, kv, notes, mask_cache)

    return AttentionSite(
        index=index, node=sdpa.name, module=module, layer=_layer_of(module),
        heads=heads or 0, kv_heads=kv_heads or 0, head_dim=head_dim or 0, scale=float(scale),
        mask=mask, positional=positional,
        q_proj=q_proj.name if q_proj is not None else None,
        k_proj=k_proj.name if k_proj is not None else None,
        v_proj=v_proj.name if v_proj is not None else None,
        o_proj=o_proj.name if o_proj is not None else None,
        q_weight=weight(q_proj), k_weight=weight(k_proj), v_weight=weight(v_proj), o_weight=weight(o_proj),
        fused_qkv=fused,
        residual_add=residual_add.name if residual_add is not None else None,
        residual_input=res_in.name if res_in is not None else None,
        norm=norm, norm_node=norm_node.name if norm_node is not None else None,
        branch_output=branch.name if branch is not None else None,
        extra={"notes": notes, "proj_input": x_in.name if x_in is not None else None,
               "gqa_repeat": gqa_repeat},
    )
