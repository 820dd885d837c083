"""Graph-edit helpers that rules use; rules never reach into the user's modules.

Every node an edit creates carries provenance in node.meta["rewriter"] = {"rule", "site"}.
Tensors a rule builds are registered on the traced GraphModule as buffers named
`rw_<rule>_<site>_<key>` and read through get_attr nodes.
"""
from __future__ import annotations

import re

import torch
import torch.fx as fx

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def node(gm: fx.GraphModule, name: str) -> fx.Node:
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    raise KeyError(f"no node named {name!r} in the traced graph")


def find(gm: fx.GraphModule, name: str | None) -> fx.Node | None:
    if name is None:
        return None
    for n in gm.graph.nodes:
        if n.name == name:
            return n
    return None


def is_op(n: fx.Node, *targets) -> bool:
    return n.op == "call_function" and n.target in targets


def sdpa_args(n: fx.Node) -> dict:
    """q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa of an SDPA node, by name."""
    names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
    defaults = [None, None, None, None, 0.0, False, None, False]
    out = dict(zip(names, defaults))
    out.update(dict(zip(names, n.args)))
    out.update(n.kwargs)
    return out


def buffer_name(rule: str, site: int | None, key: str) -> str:
    return re.sub(r"\W", "_", f"rw_{rule}_{'x' if site is None else site}_{key}")


def register_tensor(gm: fx.GraphModule, name: str, tensor: torch.Tensor, before: fx.Node) -> fx.Node:
    """Register `tensor` as a buffer of gm and return a get_attr node placed before `before`."""
    gm.register_buffer(name, tensor.detach().clone(), persistent=True)
    with gm.graph.inserting_before(before):
        n = gm.graph.get_attr(name)
    n.meta["val"] = tensor
    return n


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
_KEEP = {torch.ops.aten._assert_scalar.default, torch.ops.aten.sym_constrain_range.default,
         torch.ops.aten.sym_constrain_range_for_size.default}


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
    value: dict[fx.Node, object] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            value[n] = fetch_attr(gm, n.target)
        elif n.op == "call_function" and _removable(n) and not _symbolic(n):
            inputs = n.all_input_nodes
            if inputs and all(i in value for i in inputs):
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: value[a])
                with torch.no_grad():
                    value[n] = n.target(*args, **kwargs)
    folded = 0
    for n, v in value.items():
        if n.op == "get_attr" or not isinstance(v, torch.Tensor) or all(u in value for u in n.users):
            continue
        name = f"{prefix}_{folded}"
        while hasattr(gm, name):
            name += "_"
        n.replace_all_uses_with(register_tensor(gm, name, v, before=n))
        folded += 1
    clean(gm)
    return folded


def fetch_attr(gm: torch.nn.Module, qual: str):
    """The attribute a get_attr target names, e.g. "layers.0.weight"."""
    obj = gm
    for part in qual.split("."):
        obj = getattr(obj, part)
    return obj


def _symbolic(n: fx.Node) -> bool:
    val = n.meta.get("val")
    return isinstance(val, (torch.SymInt, torch.SymFloat, torch.SymBool))
