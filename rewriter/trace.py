"""Trace an nn.Module to an fx graph with torch.export (non-strict), the dims the model's I/O names dynamic.

The traced module is an unlifted GraphModule whose call signature and output pytree equal the
model's (HF ModelOutputs come back as ModelOutputs). It is traced from a copy of the model's
modules and configuration (`share_copy`) whose parameters and buffers are the model's own tensors,
so the graph holds no second copy of the weights: its parameters are its own `nn.Parameter`
objects (own `requires_grad`, own `.grad`) over the user's storage. Rewrites replace what they
rewrite (copy-on-write: `rewriter.graph.register_tensor` adds new tensors, `rewriter.graph.writable`
gives a private copy of one shared tensor) and never write into a shared one; `WeightGuard` checks that
(version counters and checksums of the user's tensors) after the trace and after every decision.

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
import itertools
import logging

import torch
import torch.fx as fx

from . import offload
from .graph import remove_dead
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
    """Export `model` on example inputs (widened, see `export`) and return the unlifted GraphModule,
    its dead code removed. A model with weights offloaded to disk (meta tensors; rewriter/offload.py)
    is traced on a meta copy and the graph gets the user's tensors where they hold data and the
    I/O's disk-backed tensors for the rest."""
    kwargs = dict(kwargs or {})
    io = io or PlainIO(name or type(model).__name__)
    name = name or io.name
    on_disk = offload.meta_names(model)
    lazy = io.offloaded_weights(model) if on_disk else {}
    offload.check_sources(on_disk, lazy)
    subject = offload.meta_twin(model) if on_disk else share_copy(model) if copy_model else model
    subject.eval()                 # the copy's modes and config: the user's module keeps its own
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
    del ep, subject
    if on_disk:
        offload.attach(gm, model, lazy, offload.execution_device(model))
    # values nobody reads (nn.MultiheadAttention's head-averaged weights behind `[0]`, as in SigLIP's
    # pooling head) would hold a softmax to a second user and keep its attention from being raised
    if remove_dead(gm.graph):
        gm.recompile()
    _own_handles(gm)
    gm.meta = getattr(gm, "meta", {})
    gm.meta["rewriter_source"] = name
    return gm


def share_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of `model`'s modules, configuration and plain attributes whose parameters and
    buffers are the model's own tensor objects (entered in deepcopy's memo): what the trace may
    switch (eval mode, `use_cache`) changes the copy only, and no weight is duplicated."""
    memo = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


def _own_handles(gm: torch.nn.Module) -> None:
    """Give every parameter and buffer of `gm` its own tensor object over the same storage (an
    `nn.Parameter` of `t.detach()`; tied tensors stay tied): gradients, `requires_grad_` and attribute
    swaps on the graph stay off the user's tensors, while the bytes are shared. `detach` shares the
    version counter, so an in-place write through the graph still shows on the user's tensor."""
    made: dict[int, torch.Tensor] = {}
    for mod in gm.modules():
        for table, param in ((mod._parameters, True), (mod._buffers, False)):
            for key, t in table.items():
                if t is None:
                    continue
                if id(t) not in made:
                    made[id(t)] = (torch.nn.Parameter(t.detach(), requires_grad=t.requires_grad) if param
                                   else t.detach())
                table[key] = made[id(t)]


class SharedWriteError(RuntimeError):
    """The engine or a rule wrote into a tensor the traced graph shares with the user's model."""


def _checksum(t: torch.Tensor) -> int | None:
    """A checksum of `t`'s bytes: their 8-byte words summed as int64 (wrapping, so exact and
    order-free), the tail bytes added one by one. One pass over memory at memory speed (~25 ms for
    SmolLM2's 540 MB here; summing narrower integer views is 60-100× slower), equal for equal
    contents; None for a meta, quantized or offloaded tensor (then the version counter alone is
    compared; an offloaded one cannot be written: rewriter/offload.py)."""
    try:
        if t.is_meta or t.is_quantized or offload.is_offloaded(t):
            return None
        x = t.detach().contiguous().reshape(-1).view(torch.uint8)
        whole = x.numel() // 8 * 8
        head = x[:whole].view(torch.int64).sum().item() if whole else 0
        return head + (x[whole:].sum(dtype=torch.int64).item() << 64)
    except (RuntimeError, TypeError):
        return None


class WeightGuard:
    """The user's parameters and buffers as they were: each tensor's version counter (every in-place
    op through it or an alias made by `detach` / a view bumps it) and checksum (which also sees a
    write through `.data`, which bumps no counter). `check(where)` raises SharedWriteError naming the
    tensors that changed since and `where` (the rule and sites of the decision just made)."""

    def __init__(self, model: torch.nn.Module):
        seen, self.tensors = set(), {}
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                self.tensors[name] = (t, t._version, _checksum(t))

    def changed(self, checksums: bool = True) -> list[str]:
        """Names of the tensors whose version counter (and, with `checksums`, contents) changed. The
        checksums run on one thread: a memory-bound sum gains nothing from a second one, which
        under load only makes it wait."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return [n for n, (t, v, c) in self.tensors.items()
                    if t._version != v or (checksums and _checksum(t) != c)]
        finally:
            torch.set_num_threads(threads)

    def check(self, where: str, checksums: bool = True) -> None:
        bad = self.changed(checksums)
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise SharedWriteError(
                f"{where} wrote in place into the user's model: {', '.join(bad[:5])}{more} changed. The "
                "traced graph shares these tensors with the model; a rewrite must register new tensors "
                "(rewriter.graph.register_tensor) or take a private copy first (rewriter.graph.writable)")


def snapshot(gm: fx.GraphModule):
    """A cheap restorable state: a copy of the graph plus references to every tensor attribute.
    Rules never mutate tensors in place, so references suffice."""
    g = fx.Graph()
    g._codegen = gm.graph._codegen  # immutable pytree specs: shared, not copied
    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    val = g.graph_copy(gm.graph, {})
    g.output(val, type_expr=out_node.type)
    tensors = dict(offload.named_tensors(gm))
    return g, tensors


def restore(gm: fx.GraphModule, snap) -> None:
    g, tensors = snap
    now = dict(offload.named_tensors(gm))
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
