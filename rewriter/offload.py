"""Weights that stay on disk: optimizing a model larger than memory (issue 16).

A model loaded with accelerate's offloading (`from_pretrained(..., device_map="auto",
max_memory={"cpu": "300MB"})`, or `rewriter.models.load_model(spec, max_memory=...)`) keeps its
first modules in memory and the rest as meta tensors whose values a weights map reads from disk
(the checkpoint's safetensors, or accelerate's offload folder). The engine traces such a model on
meta tensors and gives the graph, for every offloaded weight, a `DiskTensor`: a tensor of the
weight's shape and dtype that holds no data and reads the weight from disk for each op that uses it,
dropping it when the op returns. So every run of the graph (the gate's, a rule's capture, the
activation cache's, the held-out check's) is a sequential pass in the sense of llm-compressor's
sequential pipeline and GPTQ: one layer's weights (one op's, in fact) are resident at a time.
Under the cap nothing else changes: the decisions are computed by the same code on the same values.

What it costs: every forward reads the offloaded weights once (at page-cache speed after the
first). The gate judges the whole model's output, computed this way; the activation cache
(rewriter/cache.py) resumes a trial at the cut before its site, so a trial reads only the weights
from that layer on. `DiskTensor.stats` counts the reads, and `resident_peak` the most bytes of
offloaded weights that were ever in memory at once.

Offloaded weights are read-only: an in-place op on one raises (it would write into a copy that is
thrown away). A rewrite registers new tensors (rewriter.graph.register_tensor), which stay in memory.
"""
from __future__ import annotations

import copy
import itertools
import threading
import weakref
from typing import Callable

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

aten = torch.ops.aten
_ALIASES = (aten.detach.default, aten.alias.default, aten.lift_fresh.default)


class OffloadError(RuntimeError):
    """An offloaded weight was written in place, or has nothing to read it from."""


class DiskTensor(torch.Tensor):
    """A weight whose values stay on disk: `load()` returns them (a fresh CPU tensor) and every aten
    op on a DiskTensor loads it, runs on the loaded values and drops them. `weight_name` is the
    weight's qualified name in the user's model (for messages)."""

    stats = {"loads": 0, "bytes": 0}
    _live = {"bytes": 0, "peak": 0}
    _lock = threading.Lock()

    @staticmethod
    def __new__(cls, load: Callable[[], torch.Tensor], shape, dtype: torch.dtype, name: str,
                device: torch.device | str = "cpu"):
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device=device)
        t._load, t.weight_name = load, name
        return t

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"DiskTensor({self.weight_name}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def load(self) -> torch.Tensor:
        v = self._load()
        if tuple(v.shape) != tuple(self.shape):
            raise OffloadError(f"offloaded weight {self.weight_name}: read shape {tuple(v.shape)}, expected "
                               f"{tuple(self.shape)}")
        v = v.to(device=self.device, dtype=self.dtype)
        n = v.numel() * v.element_size()
        with DiskTensor._lock:
            DiskTensor.stats["loads"] += 1
            DiskTensor.stats["bytes"] += n
            live = DiskTensor._live
            live["bytes"] += n
            live["peak"] = max(live["peak"], live["bytes"])
        weakref.finalize(v, _released, n)
        return v

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _ALIASES and isinstance(args[0], DiskTensor):
            a = args[0]
            return DiskTensor(a._load, a.shape, a.dtype, a.weight_name, a.device)
        if func._schema.is_mutable:
            for i, arg in enumerate(func._schema.arguments):
                v = args[i] if i < len(args) else kwargs.get(arg.name)
                if isinstance(v, DiskTensor) and arg.alias_info is not None and arg.alias_info.is_write:
                    raise OffloadError(f"{func} writes in place into the offloaded weight {v.weight_name}; "
                                       "offloaded weights are read-only: register a new tensor instead "
                                       "(rewriter.graph.register_tensor)")
        def real(x):
            return x.load() if isinstance(x, DiskTensor) else x
        return func(*tree_map(real, args), **tree_map(real, kwargs))


def _released(n: int) -> None:
    with DiskTensor._lock:
        DiskTensor._live["bytes"] -= n


def resident_peak() -> int:
    """The most bytes of offloaded weights this process held in memory at once."""
    with DiskTensor._lock:
        return DiskTensor._live["peak"]


def is_offloaded(t) -> bool:
    return isinstance(t, DiskTensor)


def holds_data(t) -> bool:
    """A tensor whose bytes are in memory (not meta, not offloaded to disk)."""
    return isinstance(t, torch.Tensor) and not t.is_meta and not is_offloaded(t)


def named_tensors(module: torch.nn.Module):
    """Every (qualified name, tensor) of the module's parameters and buffers, tied names included."""
    return itertools.chain(module.named_parameters(remove_duplicate=False),
                           module.named_buffers(remove_duplicate=False))


def meta_names(model: torch.nn.Module) -> list[str]:
    """Qualified names of the model's parameters and buffers that hold no data (meta tensors)."""
    return [n for n, t in named_tensors(model) if t.is_meta]


def meta_twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model`'s modules and configuration whose every parameter and buffer is a meta
    tensor of the same shape and dtype (tied tensors stay tied): what torch.export traces when some of
    the model's weights are on disk (fake tensors never read values). The user's model is untouched."""
    memo: dict[int, torch.Tensor] = {}
    for _, t in named_tensors(model):
        if id(t) not in memo:
            m = torch.empty_like(t, device="meta")
            param = isinstance(t, torch.nn.Parameter)
            memo[id(t)] = torch.nn.Parameter(m, requires_grad=False) if param else m
    twin = copy.deepcopy(model, memo)
    # accelerate's hooks would move weights in and out around every forward: the twin runs plain
    for mod in twin.modules():
        if hasattr(mod, "_hf_hook") and hasattr(mod, "_old_forward"):
            mod.forward = mod._old_forward
            del mod._hf_hook, mod._old_forward
    return twin


def _no_values(name: str, others: list[str] = ()) -> OffloadError:
    more = f" (so are {', '.join(others[:3])}{' …' if len(others) > 3 else ''})" if others else ""
    return OffloadError(
        f"{name}: a meta tensor with no values{more}: the model's weights map (accelerate's offload hooks) "
        "gives nothing to read it from; load the model with device_map/max_memory so that every weight is "
        "either in memory or offloaded")


def check_sources(meta: list[str], lazy: dict) -> None:
    """Raise OffloadError naming the first meta weight that `lazy` cannot read (before tracing)."""
    missing = [n for n in meta if n not in lazy]
    if missing:
        raise _no_values(missing[0], missing[1:])


def attach(gm: fx.GraphModule, model: torch.nn.Module, lazy: dict[str, torch.Tensor],
           device: torch.device | str) -> None:
    """Give `gm` (traced from `meta_twin(model)`) real tensors under the same qualified names: the
    user's own tensor where it holds data (shared, never copied), its `lazy[name]` (a DiskTensor)
    where it is a meta tensor. Then move every device argument of the graph from meta to `device`.
    Raises OffloadError naming a weight that has neither."""
    own = dict(named_tensors(model))
    for mod_name, mod in gm.named_modules():
        for table, param in ((mod._parameters, True), (mod._buffers, False)):
            for key, t in list(table.items()):
                if t is None or not t.is_meta:
                    continue
                qual = f"{mod_name}.{key}" if mod_name else key
                src = own.get(qual)
                if src is not None and not src.is_meta:
                    v = src.detach()
                elif qual in lazy:
                    v = lazy[qual]
                else:
                    raise _no_values(qual)
                table[key] = torch.nn.Parameter(v, requires_grad=False) if param else v
    to = torch.device(device)
    def moved(v):
        return to if isinstance(v, torch.device) and v.type == "meta" else v
    for n in gm.graph.nodes:          # arange(device=meta), mask.to(meta, bool): traced on the twin
        if n.op == "call_function":
            n.args, n.kwargs = tree_map(moved, n.args), tree_map(moved, n.kwargs)
    gm.recompile()


def execution_device(model: torch.nn.Module) -> torch.device:
    """The device the model's data-holding weights are on (cpu when none holds data)."""
    return next((t.device for _, t in named_tensors(model) if not t.is_meta), torch.device("cpu"))


def offloaded_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's offloaded weights (each tensor once)."""
    seen, n = set(), 0
    for _, t in named_tensors(module):
        if isinstance(t, DiskTensor) and id(t) not in seen:
            seen.add(id(t))
            n += t.numel() * t.element_size()
    return n
