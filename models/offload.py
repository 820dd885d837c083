"""Models larger than memory, loaded with accelerate's offloading (issue 16; rewriter/offload.py).

`load_model(spec, max_memory="300MB")` loads a Hugging Face folder (or a registered HF model) with
`device_map="auto"` and that cap on CPU memory: accelerate fills the cap with the first modules
and leaves the rest on disk (read back from the checkpoint's safetensors, or from an offload
folder it writes for other formats). `offloaded_weights(model)` gives the engine, for each weight
left on disk, a `rewriter.offload.DiskTensor` reading it through accelerate's own weights map; a
model the user dispatched themselves (`from_pretrained(..., device_map=..., max_memory=...)`,
`accelerate.dispatch_model`, `cpu_offload`) goes in the same way.
"""
from __future__ import annotations

import re
import tempfile

import torch

from rewriter.offload import DiskTensor, named_tensors

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(v, what: str = "max_memory") -> int:
    """`v` as a number of bytes: an int, or a string such as "300MB", "1.5GiB"."""
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        return v
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMG]I?B|B)?\s*", str(v), re.IGNORECASE)
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{what}: expected a positive size such as 300MB or 2GiB, got {v!r}")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])


def offload_kwargs(max_memory) -> dict:
    """from_pretrained's arguments for a CPU cap of `max_memory` (the rest on disk)."""
    return {"device_map": "auto", "max_memory": {"cpu": parse_bytes(max_memory)},
            "offload_folder": tempfile.mkdtemp(prefix="rewriter-offload-")}


def is_dispatched(model: torch.nn.Module) -> bool:
    """True when accelerate's hooks move some of `model`'s weights in for each forward."""
    return any(getattr(getattr(m, "_hf_hook", None), "offload", False) for m in model.modules())


def _weights_map(model: torch.nn.Module):
    """accelerate's loader of the offloaded weights by full name (one shared by every hook)."""
    for m in model.modules():
        hook = getattr(m, "_hf_hook", None)
        wm = getattr(hook, "weights_map", None) if getattr(hook, "offload", False) else None
        if wm is not None:
            return getattr(wm, "dataset", wm)
    return None


def offloaded_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{qualified name: DiskTensor} for every meta parameter or buffer of `model` whose values
    accelerate's weights map holds (tied names share one DiskTensor)."""
    wm = _weights_map(model)
    if wm is None:
        return {}
    keys = set(wm.keys()) if hasattr(wm, "keys") else set(wm)
    names: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for n, t in named_tensors(model):
        if t.is_meta:
            names.setdefault(id(t), []).append(n)
            tensors[id(t)] = t
    out = {}
    for i, ns in names.items():
        key = next((n for n in ns if n in keys), None)
        if key is None:
            continue
        t = tensors[i]
        lazy = DiskTensor(lambda key=key: torch.as_tensor(wm[key]), t.shape, t.dtype, key)
        out.update({n: lazy for n in ns})
    return out
