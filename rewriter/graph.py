"""The graph vocabulary: reading a traced graph, and the edits rules make to it.

Reading: `value` / `shape` / `rank` / `dtype` of a node as the trace saw it, `same_size` /
`same_shape` (sizes that are statically equal, ints or SymInts), `size_hint` (the size traced at),
`is_data` / `data_inputs` (tensors, not shape arithmetic), `is_op` and the op families
`CASTS` / `COPIES` with `strip_casts`, `arg`, `const_value`, `attr_value`, `module_path`,
`node` / `find`, `sdpa_args`, `unrepeat_kv` / `gqa_kv`. canonicalize, analyze and the rules all speak it, so a word means
one thing everywhere.

Editing: every node an edit creates carries provenance in node.meta["rewriter"] = {"rule", "site"}.
Tensors a rule builds are registered on the traced GraphModule as buffers named
`rw_<rule>_<site>_<key>` and read through get_attr nodes. Rules never reach into the user's modules.
The graph's own parameters share their storage with the user's model (`rewriter.trace`): a rule
replaces a weight by registering a new tensor, and one that must edit a weight in place first takes
a private copy of it with `writable` (copy-on-write); an in-place write into a shared tensor is
caught after the decision (`rewriter.trace.WeightGuard`) and fails the run.
"""
from __future__ import annotations

import functools
import math
import operator
import re
from collections.abc import Callable, Collection

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from . import offload

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default

CASTS = frozenset({aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.type_as.default})
COPIES = frozenset({aten.contiguous.default, aten.clone.default, aten.alias.default})  # the same values
SYMBOLIC = (torch.SymInt, torch.SymFloat, torch.SymBool)   # shape arithmetic, not tensor data


# ---------------------------------------------------------------- reading a graph

def find(gm: fx.GraphModule, name: str | None) -> fx.Node | None:
    """The node called `name`, or None (also for name=None)."""
    if name is None:
        return None
    return next((n for n in gm.graph.nodes if n.name == name), None)


def node(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node called `name`; KeyError if the graph has none."""
    n = find(gm, name)
    if n is None:
        raise KeyError(f"no node named {name!r} in the traced graph")
    return n


def is_op(n, *ops) -> bool:
    """Whether `n` is a node calling one of `ops`: an op overload (aten.mul.Tensor), an op packet
    (aten.mul: any of its overloads), a python callable (operator.getitem), or a set of these."""
    if not (isinstance(n, fx.Node) and n.op == "call_function"):
        return False
    t = n.target
    packet = getattr(t, "overloadpacket", None)
    for o in ops:
        group = o if isinstance(o, (set, frozenset, tuple, list)) else (o,)
        if t in group or (packet is not None and packet in group):
            return True
    return False


def strip_casts(n, ops: Collection | Callable[[fx.Node], bool] = CASTS):
    """Follow `n` back through the casts in `ops` to the value's source: dtype casts by default,
    `CASTS | COPIES` to pass clones too; `ops` may also be a test of a node."""
    passes = ops if callable(ops) else (lambda m: is_op(m, ops))
    while isinstance(n, fx.Node) and passes(n) and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def arg(n: fx.Node, i: int, name: str, default=None):
    """Argument `name` of a call, given at position `i` or by keyword."""
    return n.args[i] if len(n.args) > i else n.kwargs.get(name, default)


def value(n):
    """What `n` computes as the trace saw it (meta["val"]: a fake tensor, a SymInt, ...); an argument
    that is not a node (a python number) stands for itself."""
    return n.meta.get("val") if isinstance(n, fx.Node) else n


def shape(n) -> tuple:
    v = value(n)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def rank(n) -> int:
    return len(shape(n))


def dtype(n):
    v = value(n)
    return v.dtype if isinstance(v, torch.Tensor) else None


def same_size(a, b) -> bool:
    """Statically equal sizes (ints or SymInts): equal for every input the graph accepts."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    try:
        return bool(statically_known_true(a == b))
    except Exception:  # noqa: BLE001 - a size we cannot compare is not provably equal
        return False


def same_shape(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def is_data(n) -> bool:
    """A node carrying tensor data (not a shape SymInt such as aten.sym_size)."""
    v = value(n)
    if v is None:
        return n.op in ("call_function", "get_attr", "placeholder")
    return not isinstance(v, (int, float, bool, *SYMBOLIC))


def data_inputs(n: fx.Node) -> list[fx.Node]:
    return [a for a in n.all_input_nodes if is_data(a)]


def size_hint(x) -> int | None:
    """A concrete int from an int or a SymInt (its hint: the size the graph was traced at)."""
    if not isinstance(x, torch.SymInt):
        return x if isinstance(x, int) else None
    try:
        hint = x.node.hint
        return int(hint if hint is not None else x.node.shape_env.size_hint(x.node.expr))
    except Exception:  # noqa: BLE001 - a size without a hint (data-dependent)
        return None


def module_path(n: fx.Node) -> str:
    """The module that made `n`, from its nn_module_stack, e.g. "encoder.layer.0.attention.self"."""
    if not (stack := n.meta.get("nn_module_stack")):
        return ""
    last = list(stack.values())[-1]
    return str(last[0] if isinstance(last, (tuple, list)) else last)


def module_pattern(path: str) -> str:
    """A module path with its list indices replaced by "*" ("decoder.layers.3.encoder_attn" →
    "decoder.layers.*.encoder_attn"): the list an item belongs to, at every level."""
    return ".".join("*" if p.isdigit() else p for p in path.split("."))


def attr_value(n: fx.Node):
    """The tensor (or module) a get_attr node reads, or None if its module has no such attribute."""
    try:
        return fetch_attr(n.graph.owning_module, n.target)
    except AttributeError:
        return None


_UNARY = {aten.sqrt.default: math.sqrt, aten.rsqrt.default: lambda z: 1 / math.sqrt(z),
          aten.reciprocal.default: lambda z: 1 / z, aten.neg.default: operator.neg, aten.exp.default: math.exp,
          aten.log.default: math.log, math.sqrt: math.sqrt, torch.sym_float: float, torch.sym_sqrt: math.sqrt}
_BINARY = {aten.mul.Tensor: operator.mul, aten.mul.Scalar: operator.mul, aten.div.Tensor: operator.truediv,
           aten.div.Scalar: operator.truediv, aten.add.Tensor: operator.add, aten.sub.Tensor: operator.sub,
           aten.pow.Tensor_Scalar: operator.pow, aten.pow.Scalar: operator.pow, aten.pow.Tensor_Tensor: operator.pow,
           operator.mul: operator.mul, operator.truediv: operator.truediv, operator.pow: operator.pow,
           operator.add: operator.add, operator.sub: operator.sub}
_SAME_VALUE = CASTS | COPIES | {aten.lift_fresh_copy.default, aten.detach.default, aten.detach_.default,
                                aten.lift_fresh.default, aten.scalar_tensor.default}


def const_value(x) -> float | None:
    """The value of a constant scalar expression (python number, 0-d constant tensor, sqrt of a
    static head_dim computed in the graph, a static sym value), or None when it is not constant."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, (torch.SymInt, torch.SymFloat)):
        return float(x.node.expr) if x.node.expr.is_number else None
    if not isinstance(x, fx.Node):
        return None
    v = x.meta.get("val")
    if isinstance(v, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(v, bool):
        return const_value(v)
    if x.op == "get_attr":  # a lifted constant or buffer; a parameter may still be trained, so it is not
        t = attr_value(x)
        ok = isinstance(t, torch.Tensor) and not isinstance(t, nn.Parameter) and t.numel() == 1
        return float(t.reshape(()).item()) if ok else None
    if x.op != "call_function":
        return None
    t, a = x.target, x.args
    if t in _SAME_VALUE:
        return const_value(a[0])
    if t in _UNARY:
        z = const_value(a[0])
        return None if z is None else float(_UNARY[t](z))
    if t in _BINARY and len(a) == 2:
        y, z = const_value(a[0]), const_value(a[1])
        return None if y is None or z is None else float(_BINARY[t](y, z))
    if t is aten.full.default and all(const_value(s) == 1 for s in a[0]):
        return const_value(a[1])
    return None


_SDPA_DEFAULTS = {"query": None, "key": None, "value": None, "attn_mask": None, "dropout_p": 0.0,
                  "is_causal": False, "scale": None, "enable_gqa": False}


def sdpa_args(n: fx.Node) -> dict:
    """q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa of an SDPA node, by name."""
    return {**_SDPA_DEFAULTS, **dict(zip(_SDPA_DEFAULTS, n.args)), **n.kwargs}


def _full_slices(n):
    """`n` below any slices that keep their whole input (HF writes x[:, :, None, :, :])."""
    while is_op(n, aten.slice.Tensor) and arg(n, 2, "start") in (None, 0) and arg(n, 4, "step", 1) == 1 \
            and same_shape(shape(n), shape(n.args[0])):
        n = n.args[0]
    return n


def unrepeat_kv(n) -> tuple[fx.Node, int] | None:
    """(x, r) when the [B, H, T, D] node `n` is GQA's repeat_kv of x [B, H/r, T, D]: HF's
    x[:, :, None].expand(B, Hkv, r, T, D).reshape(B, Hkv·r, T, D), or x.repeat_interleave(r, dim=1),
    through whole slices. Query head h then reads kv head h // r, which is SDPA's enable_gqa;
    None for anything else."""
    n = _full_slices(n)
    if rank(n) != 4:
        return None
    if is_op(n, aten.repeat_interleave.self_int) and arg(n, 2, "dim") in (1, -3) \
            and isinstance(n.args[1], int) and rank(n.args[0]) == 4:
        return n.args[0], n.args[1]
    if not is_op(n, aten.reshape, aten.view, aten._unsafe_view):
        return None
    e = _full_slices(n.args[0])
    if not (is_op(e, aten.expand.default) and rank(e) == 5):
        return None
    u = _full_slices(e.args[0])
    if not (is_op(u, aten.unsqueeze.default) and u.args[1] in (2, -3)):
        return None
    x = _full_slices(u.args[0])
    es, xs, reps = shape(e), shape(x), shape(e)[2] if rank(e) == 5 else None
    if not isinstance(reps, int) or len(xs) != 4 \
            or not all(same_size(es[i], xs[j]) for i, j in ((0, 0), (1, 1), (3, 2), (4, 3))):
        return None
    return x, reps


def gqa_kv(q, k, v, enable_gqa: bool) -> tuple:
    """(k, v, enable_gqa) for an attention over q [B, H, T, D]: k and v before repeat_kv with
    enable_gqa=True where both repeat by the same r and H = Hkv·r (the same function; the
    repeated copies are never made), else as they are."""
    rk, rv = unrepeat_kv(k), unrepeat_kv(v)
    if enable_gqa or not (rk and rv and rk[1] == rv[1] and rank(q) == 4
                          and same_size(shape(q)[1], shape(rk[0])[1] * rk[1])):
        return k, v, enable_gqa
    return rk[0], rv[0], True


def fetch_attr(gm: torch.nn.Module, qual: str):
    """The attribute a get_attr target names, e.g. "layers.0.weight"."""
    return functools.reduce(getattr, qual.split("."), gm)


# ---------------------------------------------------------------- editing a graph

def buffer_name(rule: str, site: int | None, key: str) -> str:
    return re.sub(r"\W", "_", f"rw_{rule}_{'x' if site is None else site}_{key}")


def _storages(gm: nn.Module) -> set:
    return {t.untyped_storage().data_ptr() for t in [*gm.parameters(), *gm.buffers()]
            if offload.holds_data(t)}


def register_tensor(gm: fx.GraphModule, name: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register `tensor` as a buffer of gm and return a get_attr node placed before `before`. The
    buffer is `tensor` itself (no second copy of what a rule built) unless it is a view of a larger
    storage (a slice of a capture would keep all of it alive) or shares storage with a tensor the
    graph already holds (a weight shared with the user's model): then a compact private copy."""
    t = tensor.detach()
    if offload.is_offloaded(t):              # a weight read from disk: registered in memory
        t = t.load()
    elif not t.is_meta:
        view = t.untyped_storage().nbytes() > t.numel() * t.element_size()
        if view or t.untyped_storage().data_ptr() in _storages(gm):
            t = t.clone(memory_format=torch.contiguous_format)
    gm.register_buffer(name, t, persistent=True)
    with gm.graph.inserting_before(before):
        n = gm.graph.get_attr(name)
    n.meta["val"] = tensor
    return n


def writable(gm: fx.GraphModule, qual: str) -> torch.Tensor:
    """Copy-on-write: replace the parameter or buffer `qual` of gm (e.g. "layers.3.mlp.up.weight") by
    a private copy of itself (same kind, dtype, `requires_grad`) and return it, for a rule that
    edits a weight in place; the user's tensor, which the graph shared, stays as it was. Other names
    tied to the same tensor keep reading the shared one. A second call returns the same copy."""
    prefix, _, leaf = qual.rpartition(".")
    owner = gm.get_submodule(prefix) if prefix else gm
    t = fetch_attr(gm, qual)
    if not isinstance(t, torch.Tensor):
        raise KeyError(f"writable: {qual!r} is not a tensor of the traced graph")
    if getattr(t, "_rewriter_private", False):
        return t
    copy = t.detach().clone()
    if isinstance(t, nn.Parameter):
        copy = nn.Parameter(copy, requires_grad=t.requires_grad)
        owner.register_parameter(leaf, copy)
    else:
        owner.register_buffer(leaf, copy, persistent=leaf not in owner._non_persistent_buffers_set)
    copy._rewriter_private = True
    return copy


def replace_with_op(gm: fx.GraphModule, old: fx.Node, op, args: tuple, kwargs: dict | None = None,
                    *, rule: str, site: int | None) -> fx.Node:
    """Insert `op(*args, **kwargs)` before `old`, route old's users to it, erase old."""
    with gm.graph.inserting_before(old):
        new = gm.graph.call_function(op, tuple(args), kwargs or {})
    new.meta.update({k: v for k, v in old.meta.items() if k in ("nn_module_stack", "stack_trace", "val")})
    new.meta["rewriter"] = {"rule": rule, "site": site}
    old.replace_all_uses_with(new)
    gm.graph.erase_node(old)
    return new


def rewire(gm: fx.GraphModule, old: fx.Node, replacement: fx.Node) -> None:
    """Route every use of `old` to `replacement` and remove what becomes dead."""
    old.replace_all_uses_with(replacement)
    clean(gm)


# Shape guards stay even when unused: they check the symbolic sizes the graph was traced under.
_KEEP = {aten._assert_scalar.default, aten.sym_constrain_range.default, aten.sym_constrain_range_for_size.default}


def _removable(n: fx.Node) -> bool:
    """fx calls dropout, SDPA (its dropout_p) and metadata asserts impure, yet unused in an eval graph
    they have no effect; only ops that write to an argument, and shape guards, must stay."""
    if not n.is_impure():
        return True
    t = n.target
    return (n.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t not in _KEEP
            and not t._schema.is_mutable)


def remove_dead(graph: fx.Graph) -> int:
    """Erase nodes whose values nobody uses, in reverse order so whole chains go; returns the count."""
    removed = 0
    for n in reversed(list(graph.nodes)):
        if n.op not in ("placeholder", "output") and not n.users and _removable(n):
            graph.erase_node(n)
            removed += 1
    return removed


def clean(gm: fx.GraphModule) -> None:
    """Dead-code elimination, then drop every parameter and buffer no node reads any more (so a
    removed subgraph really frees its weights), then recompile. Snapshots keep references to the
    dropped tensors, so a rollback brings them back."""
    remove_dead(gm.graph)
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for qual in names:
        if qual not in used:
            prefix, _, leaf = qual.rpartition(".")
            owner = gm.get_submodule(prefix) if prefix else gm
            if hasattr(owner, leaf):
                delattr(owner, leaf)
    gm.graph.lint()
    gm.recompile()


def fold_constants(gm: fx.GraphModule, prefix: str = "rw_folded") -> int:
    """Evaluate once every subgraph that reads only parameters and buffers (no input), store each
    result that an input-dependent node uses as a buffer, and drop what becomes dead. Exact (the
    same ops, run once instead of per call); trades memory for speed, e.g. MASA's weights rebuilt
    from atoms and coefficients become dense again. Returns the number of folded results."""
    values: dict[fx.Node, object] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            values[n] = fetch_attr(gm, n.target)
        elif n.op == "call_function" and _removable(n) and not isinstance(value(n), SYMBOLIC):
            inputs = n.all_input_nodes
            if inputs and all(i in values for i in inputs):
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: values[a])
                with torch.no_grad():
                    values[n] = n.target(*args, **kwargs)
    folded = 0
    for n, v in values.items():
        if n.op == "get_attr" or not isinstance(v, torch.Tensor) or all(u in values for u in n.users):
            continue
        name = f"{prefix}_{folded}"
        while hasattr(gm, name):
            name += "_"
        n.replace_all_uses_with(register_tensor(gm, name, v, before=n))
        folded += 1
    clean(gm)
    return folded
