"""Trace an nn.Module to an fx graph with torch.export (non-strict), the dims the model's I/O names dynamic.

The traced module is an unlifted GraphModule whose call signature and output pytree equal the
model's (HF ModelOutputs come back as ModelOutputs). It is traced from a deep copy, so edits to
the graph and its parameters can never reach the user's model.

Batch and length stay dynamic whatever the example's sizes: torch.export specializes every dim
whose example size is 0 or 1 ("0/1 specialization": a size-1 dim might broadcast), so a model
traced on a batch of one would accept batch 1 only. `widen` repeats such dims of the example to
size 2 before tracing (the graph traced at 2 is the general one: it runs at 1 and at any other
size, exactly); where the widened example does not trace (a size-1 dim that really is a broadcast
dim) it falls back to widening the batch dim only, then to the example as given.
"""
from __future__ import annotations

import copy
import inspect as _inspect
import logging

import torch
import torch.fx as fx

from .io import ModelIO, PlainIO

log = logging.getLogger(__name__)


class TraceError(RuntimeError):
    """torch.export could not trace the model; the message says what it said and what to try."""


def dynamic_shapes(io: ModelIO, model: torch.nn.Module, args: tuple, kwargs: dict):
    """torch.export dynamic_shapes for the call (args, kwargs): the dims the model's I/O says vary,
    keyed by forward() parameter name (None where args cannot be named)."""
    spec = lambda x: io.dynamic_dims(x) if isinstance(x, torch.Tensor) else None  # noqa: E731
    dyn_args, dyn_kwargs = tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()}
    if not dyn_args:
        return dyn_kwargs
    named = dict(zip(_inspect.signature(model.forward).parameters, dyn_args)) | dyn_kwargs
    return named if len(named) == len(dyn_args) + len(dyn_kwargs) else None


def widen(io: ModelIO, args: tuple, kwargs: dict, *, dims: str = "all",
          module: torch.nn.Module | None = None) -> tuple[tuple, dict, list[str]]:
    """The example (args, kwargs) with every dynamic dim of size 1 (`dims="all"`; `"batch"`: dim 0
    only) repeated to size 2, and the names of the widened dims (e.g. "input_ids.shape[0]"; positional
    inputs named after `module.forward`'s parameters when given). Repeating a row keeps every input
    consistent with the others (ids, mask, positions alike)."""
    widened: list[str] = []
    try:
        params = list(_inspect.signature(module.forward).parameters) if module is not None else []
    except (TypeError, ValueError):
        params = []

    def grow(x, label):
        if not isinstance(x, torch.Tensor):
            return x
        for d in sorted(io.dynamic_dims(x) or {}):
            if x.shape[d] == 1 and (dims == "all" or d == 0):
                x = torch.cat((x, x), d)
                widened.append(f"{label}.shape[{d}]")
        return x

    return (tuple(grow(a, params[i] if i < len(params) else f"args[{i}]") for i, a in enumerate(args)),
            {k: grow(v, k) for k, v in kwargs.items()}, widened)


def export(module: torch.nn.Module, args: tuple, kwargs: dict, io: ModelIO, export_fn=None):
    """`export_fn(module, args, kwargs, dynamic_shapes)` (default: torch.export.export, non-strict)
    on the example widened by `widen`, so that no dynamic dim is specialized to 1; where that does
    not trace, the batch dim alone is widened, then the example is taken as given (a warning names
    the dims that then stay fixed at 1). The last attempt's exception propagates."""
    export_fn = export_fn or (lambda m, a, k, d: torch.export.export(m, a, k, strict=False, dynamic_shapes=d))
    attempts, seen = [], set()
    for dims in ("all", "batch"):
        a, k, widened = widen(io, tuple(args), dict(kwargs), dims=dims, module=module)
        if widened and tuple(widened) not in seen:
            seen.add(tuple(widened))
            attempts.append((a, k, widened))
    for a, k, widened in attempts:
        try:
            ep = _export_once(export_fn, module, a, k, io)
        except Exception as e:  # noqa: BLE001 (a widened example may not trace: try with fewer)
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            log.info("%s: tracing with %s widened to 2 failed (%s: %s); trying with fewer",
                     io.name, ", ".join(widened), type(e).__name__, first)
            continue
        _warn_fixed(io, attempts[0][2], widened)
        return ep
    ep = _export_once(export_fn, module, tuple(args), dict(kwargs), io)     # its exception propagates
    _warn_fixed(io, attempts[0][2] if attempts else [], [])
    return ep


def _warn_fixed(io, wanted: list[str], widened: list[str]) -> None:
    left = [d for d in wanted if d not in widened]
    if left:
        log.warning("%s: %s stay(s) fixed at size 1 in the traced graph: widened to 2, the example "
                    "did not trace", io.name, ", ".join(left))


def _export_once(export_fn, module, args, kwargs, io):
    dynamic = dynamic_shapes(io, module, args, kwargs)
    with torch.no_grad():
        return export_fn(module, args, kwargs, dynamic if dynamic else None)


def trace(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *,
          io: ModelIO | None = None, name: str | None = None, copy_model: bool = True) -> fx.GraphModule:
    """Export `model` on example inputs (widened, see `export`) and return the unlifted GraphModule."""
    kwargs = dict(kwargs or {})
    io = io or PlainIO(name or type(model).__name__)
    name = name or io.name
    subject = copy.deepcopy(model) if copy_model else model
    subject.eval()
    io.prepare_trace(subject)      # e.g. no KV cache in the outputs: this is the copy, not the user's
    try:
        ep = export(subject, tuple(args), kwargs, io)
    except Exception as e:  # torch.export raises many types; all end in one clear message
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TraceError(
            f"could not trace {name} with torch.export (non-strict): {type(e).__name__}: {first}\n"
            "hint: check that the example inputs are what the model's forward() takes, that the forward "
            "has no data-dependent Python control flow on tensor values, and for HF models load with "
            'attn_implementation="sdpa" or "eager".') from e
    gm = ep.module()
    gm.meta = getattr(gm, "meta", {})
    gm.meta["rewriter_source"] = name
    return gm


def snapshot(gm: fx.GraphModule):
    """A cheap restorable state: a copy of the graph plus references to every tensor attribute.
    Rules never mutate tensors in place, so references suffice."""
    g = fx.Graph()
    g._codegen = gm.graph._codegen  # immutable pytree specs: shared, not copied
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    val = g.graph_copy(gm.graph, {})
    g.output(val, type_expr=out_node.type)
    tensors = dict(_tensor_attrs(gm))
    return g, tensors


def restore(gm: fx.GraphModule, snap) -> None:
    g, tensors = snap
    now = dict(_tensor_attrs(gm))
    for qual in now.keys() - tensors.keys():
        _delattr(gm, qual)
    for qual, t in tensors.items():
        if now.get(qual) is not t:
            _setattr(gm, qual, t)
    fresh = fx.Graph(owning_module=gm)
    fresh._codegen = g._codegen
    out_node = next(n for n in reversed(g.nodes) if n.op == "output")
    fresh.output(fresh.graph_copy(g, {}), type_expr=out_node.type)
    gm.graph = fresh
    gm.recompile()


def _tensor_attrs(gm: torch.nn.Module):
    yield from gm.named_parameters(remove_duplicate=False)
    yield from gm.named_buffers(remove_duplicate=False)


def _owner(gm: torch.nn.Module, qual: str):
    prefix, _, leaf = qual.rpartition(".")
    return (gm.get_submodule(prefix) if prefix else gm), leaf


def _delattr(gm, qual):
    mod, leaf = _owner(gm, qual)
    delattr(mod, leaf)


def _setattr(gm, qual, t):
    mod, leaf = _owner(gm, qual)
    if isinstance(t, torch.nn.Parameter):
        mod.register_parameter(leaf, t)
    else:
        mod.register_buffer(leaf, t)
