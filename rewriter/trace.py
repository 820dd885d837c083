"""Trace an nn.Module to an fx graph with torch.export (non-strict), the dims the model's I/O names dynamic.

The traced module is an unlifted GraphModule whose call signature and output pytree equal the
model's (HF ModelOutputs come back as ModelOutputs). It is traced from a deep copy, so edits to
the graph and its parameters can never reach the user's model.
"""
from __future__ import annotations

import copy
import inspect as _inspect

import torch
import torch.fx as fx

from .io import ModelIO, PlainIO


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


def trace(model: torch.nn.Module, args: tuple = (), kwargs: dict | None = None, *,
          io: ModelIO | None = None, name: str | None = None, copy_model: bool = True) -> fx.GraphModule:
    """Export `model` on example inputs and return the unlifted GraphModule."""
    kwargs = dict(kwargs or {})
    io = io or PlainIO(name or type(model).__name__)
    name = name or io.name
    subject = copy.deepcopy(model) if copy_model else model
    subject.eval()
    io.prepare_trace(subject)      # e.g. no KV cache in the outputs: this is the copy, never the user's module
    try:
        dynamic = dynamic_shapes(io, subject, tuple(args), kwargs)
        with torch.no_grad():
            ep = torch.export.export(subject, tuple(args), kwargs, strict=False,
                                     dynamic_shapes=dynamic if dynamic else None)
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
