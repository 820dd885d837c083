"""The kind of an SDPA node's attention mask: "none", "padding", "causal", "causal+padding" or
"arbitrary" (sliding windows, biases, masks computed from other inputs).

Decided by evaluating the mask's subgraph at the traced sizes with the mask inputs (the graph
inputs the model's I/O names attention masks) set to ones, i.e. no padding, and comparing against
all-true and the causal triangle; when that cannot run, by structure (tril/triu, or an ordering
comparison of two arange-derived tensors). A mask built from a mask input is a padding mask whatever
values the example held: a causal LM's mask is "causal+padding" even if the example had only ones.

What counts as masked is rewriter.kernels.keymask's one definition (bool False; additive ≤ −1e4,
−inf included), the one the rules read their key masks with: a mask the analyzer calls padding is
a mask whose padded keys every rule drops.
"""
from __future__ import annotations

from collections.abc import Collection

import torch
import torch.fx as fx

from rewriter.kernels.keymask import is_masked

from .graph import data_inputs, fetch_attr, is_data, is_op, sdpa_args, size_hint, value

aten = torch.ops.aten


def _ancestors(n: fx.Node) -> set[fx.Node]:
    out, stack = set(), [n]
    while stack:
        m = stack.pop()
        if m not in out:
            out.add(m)
            stack.extend(data_inputs(m))
    return out


def _structural_causal(anc: set[fx.Node]) -> bool:
    """A causal construction among the mask's ancestors: tril/triu, or an ordering comparison
    (le/lt/ge/gt) of two position-index tensors (both derived from aten.arange)."""
    from_arange: dict[fx.Node, bool] = {}

    def positional(m: fx.Node) -> bool:
        if m not in from_arange:
            from_arange[m] = any(is_op(a, aten.arange) for a in _ancestors(m))
        return from_arange[m]

    for n in anc:
        if is_op(n, aten.tril, aten.triu):
            return True
        if is_op(n, aten.le, aten.lt, aten.ge, aten.gt) and len(n.args) >= 2 and \
                all(isinstance(a, fx.Node) and is_data(a) for a in n.args[:2]):
            if positional(n.args[0]) and positional(n.args[1]):
                return True
    return False


def _evaluate(gm: fx.GraphModule, mask: fx.Node, anc: set[fx.Node], fill: set[fx.Node]) -> torch.Tensor:
    """Run the mask's subgraph at the traced sizes (SymInt hints), with the `fill` placeholders set
    to ones (an attention_mask with no padding). Raises if something cannot be evaluated."""
    env: dict[fx.Node, object] = {}

    def read(a):
        if a in env:
            return env[a]
        v = value(a)
        if isinstance(v, (torch.SymInt, int)):
            iv = size_hint(v)
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
                v = value(n)
                sizes = [size_hint(s) for s in v.shape]
                if any(s is None for s in sizes):
                    raise ValueError(f"no size hint for input {n.name}")
                env[n] = torch.ones(sizes, dtype=v.dtype)
            elif n.op == "get_attr":
                env[n] = fetch_attr(gm, n.target)
            elif n.op == "call_function":
                args, kwargs = fx.node.map_arg(n.args, read), fx.node.map_arg(n.kwargs, read)
                if "device" in kwargs:   # evaluate on the CPU whatever the trace device was
                    kwargs = {**kwargs, "device": torch.device("cpu")}
                if n.target is aten.to.device:
                    args = (args[0], torch.device("cpu"), *args[2:])
                args = fx.node.map_aggregate(args, lambda x: x.cpu() if isinstance(x, torch.Tensor) else x)
                env[n] = n.target(*args, **kwargs)
            else:
                raise ValueError(f"mask subgraph has a {n.op} node ({n.name})")
    if not isinstance(env[mask], torch.Tensor):
        raise ValueError("mask did not evaluate to a tensor")
    return env[mask]


def _classify(m: torch.Tensor, lq: int, lk: int) -> str:
    """"none" (every key allowed), "causal" (key j allowed iff j ≤ i + lk − lq) or "arbitrary"."""
    if m.dtype == torch.bool:
        allowed = m
    elif m.is_floating_point():
        blocked = is_masked(m)
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


def mask_kind(gm: fx.GraphModule, sdpa: fx.Node, q, k, notes: list[str], cache: dict,
              mask_inputs: Collection[str] = ()) -> str:
    """Mask kind of one SDPA node (see the module docstring); `q`, `k` are the query and key values,
    `mask_inputs` the names of the graph inputs that are attention masks. A reason for an
    "arbitrary" kind goes to `notes`; `cache` is shared by the SDPA nodes of one graph."""
    a = sdpa_args(sdpa)
    mask, is_causal = a["attn_mask"], a["is_causal"]
    if mask is None:
        return "causal" if is_causal is True else "none"
    if not isinstance(mask, fx.Node):
        notes.append("attn_mask is not a graph value; mask kind reported as arbitrary")
        return "arbitrary"
    lq = size_hint(q.shape[-2]) if isinstance(q, torch.Tensor) else None
    lk = size_hint(k.shape[-2]) if isinstance(k, torch.Tensor) else None
    key = (mask, lq, lk, is_causal)
    if key not in cache:
        cache[key] = _kind(gm, mask, lq, lk, is_causal, mask_inputs)
    kind, note = cache[key]
    if note:
        notes.append(note)
    return kind


def _kind(gm, mask: fx.Node, lq, lk, is_causal, mask_inputs: Collection[str]) -> tuple[str, str | None]:
    anc = _ancestors(mask)
    inputs = [n for n in anc if n.op == "placeholder"]
    masks = {n for n in inputs if n.name in mask_inputs or n.target in mask_inputs}
    others = [n.name for n in inputs if n not in masks]
    base, note = None, None
    if not others and lq is not None and lk is not None:
        try:
            base = _classify(_evaluate(gm, mask, anc, masks), lq, lk)
            if lq <= 1 and base == "none":
                base = None  # one query row cannot tell causal from full attention
        except Exception as e:
            note = f"mask {mask.name} could not be evaluated ({type(e).__name__}: {e}); kind decided by structure"
    if base is None and others:
        base = "arbitrary"
        note = (f"mask {mask.name} is computed from input(s) {', '.join(sorted(others))}, "
                "which are not attention masks; reported as arbitrary")
    elif base is None:
        base = "causal" if is_causal is True or _structural_causal(anc) else ("none" if masks else "arbitrary")
    kind = {"none": "padding" if masks else "none",
            "causal": "causal+padding" if masks else "causal"}.get(base, "arbitrary")
    if base == "arbitrary" and note is None:
        note = f"mask {mask.name} is neither causal nor padding-only (e.g. a sliding window, a bias or a fixed buffer)"
    return kind, note
