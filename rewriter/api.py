"""Public API: inspect, optimize, load — and the OptimizedModel they return."""
from __future__ import annotations

import contextlib
import copy
import json
import time
from pathlib import Path

import torch
import torch.fx as fx

from . import graph as G
from .analyze import analyze
from .canonicalize import canonicalize, explain_unmatched
from .driver import Driver, Record, replay
from .gate import Gate
from .report import Report, attention_flops, latency, unique_numel
from .trace import dynamic_shapes, trace


class SiteList(list):
    """The attention sites of a model, plus notes on what was canonicalized and what did not match."""

    def __init__(self, sites, notes=(), canonicalized=()):
        super().__init__(sites)
        self.notes = list(notes)
        self.canonicalized = list(canonicalized)


# ---- model resolution ----------------------------------------------------------------------------

def _resolve(model, spec: str | None):
    """A rewriter.models.Loaded (the model with its I/O) for a name, a Loaded, or a bare nn.Module."""
    from .models import Loaded, load_model, wrap_module
    if model is None:
        if not spec:
            raise ValueError("no model: pass one to optimize() or name it under `model:` in the recipe")
        return load_model(spec)
    if isinstance(model, str):
        return load_model(model)
    if isinstance(model, Loaded):
        return model
    if isinstance(model, torch.nn.Module):
        return wrap_module(model)
    raise TypeError(f"model must be an nn.Module, a rewriter.models.Loaded or a model name, not {type(model).__name__}")


def _split(example_inputs) -> tuple[tuple, dict]:
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def _prepare(loaded, example_inputs):
    """Trace, canonicalize, clean and analyze; returns (gm, sites, example (args, kwargs), records)."""
    args, kwargs = _split(example_inputs)
    if not args and not kwargs:
        kwargs = loaded.example_inputs(batch=2, seq_len=16)
    gm = trace(loaded.model, args, kwargs, io=loaded, name=loaded.name)
    canon = canonicalize(gm)
    G.clean(gm)
    sites = analyze(gm, mask_inputs=loaded.mask_inputs())
    return gm, sites, (args, kwargs), canon


def inspect(model, example_inputs=None) -> SiteList:
    """The attention sites of `model` (a module, a Loaded or a registered name); nothing is changed."""
    loaded = _resolve(model, None)
    gm, sites, _, canon = _prepare(loaded, example_inputs)
    notes = explain_unmatched(gm)
    if not sites:
        notes = notes or [_what_it_saw(gm)]
    return SiteList(sites, notes, canon)


def _what_it_saw(gm: fx.GraphModule) -> str:
    from collections import Counter
    ops = Counter(str(n.target).replace("aten.", "").split(".")[0] for n in gm.graph.nodes if n.op == "call_function")
    top = ", ".join(f"{k}×{v}" for k, v in ops.most_common(8))
    return ("no attention found: the graph has no scaled_dot_product_attention and no softmax over a q·kᵀ "
            f"product; its most common ops are {top}")


# ---- optimize: prepare → run → report ------------------------------------------------------------

def optimize(model=None, recipe=None, *, example_inputs=None, calibration=None, progress=True,
             measure_latency: bool = True) -> "OptimizedModel":
    """Trace `model`, apply `recipe` (path, dict or Recipe) candidate by candidate with an accuracy gate,
    and return an OptimizedModel with the same call signature. The input model is never modified.
    `progress`: True prints each decision and a live bar on stderr; a callable gets each Record."""
    from .models import make_calibration
    from .recipe import default_gate, load_recipe

    t_start = time.perf_counter()
    rec = load_recipe(recipe)
    loaded = _resolve(model, rec.model)
    calib = calibration or make_calibration(loaded, **rec.calibration.model_dump())
    gm, sites, example, canon = _prepare(loaded, calib.batches[0] if example_inputs is None else example_inputs)
    if not sites:
        raise ValueError(f"{loaded.name}: no attention sites to rewrite. " + " ".join(explain_unmatched(gm) or [_what_it_saw(gm)]))
    gate_spec = rec.gate or default_gate(loaded.kind)
    original = copy.deepcopy(loaded.model).eval()   # the user's module stays untouched (and in its mode)
    gate = Gate.from_model(gate_spec, original, calib.gate_batches, loaded)
    with _progress(progress, loaded.name) as on_record:
        result = Driver(gm, sites, calib, loaded, gate, rec.budget, on_record).run(rec.steps)
    report = _report(loaded, original, gm, sites, result, gate_spec, calib, canon, measure_latency, t_start)
    return OptimizedModel(gm, report, rec, sites, example, base=loaded.name, io=loaded)


@contextlib.contextmanager
def _progress(progress, name: str):
    if callable(progress):
        yield progress
    elif progress:
        from .cli import rich_progress
        with rich_progress(f"optimizing {name}") as on_record:
            yield on_record
    else:
        yield None


def _report(loaded, original, gm, sites, result, gate_spec, calib, canon, measure_latency, t_start) -> Report:
    heldout = {}
    if calib.heldout:
        m = Gate.from_model(gate_spec, original, calib.heldout, loaded).measure(gm)
        heldout = {"metric": m.metric, "value": m.value, "worst": m.worst, "ok": m.ok, "why": m.why}
    fb, fa = attention_flops(sites, result.records)
    return Report(
        model=loaded.name, kind=loaded.kind, sites=sites, records=result.records,
        params_before=unique_numel(original), params_after=unique_numel(gm),
        flops_before=fb, flops_after=fa, latency=latency(original, gm, calib.batches[0]) if measure_latency else {},
        heldout=heldout, gate=gate_spec.model_dump(exclude_none=True),
        calibration={"source": calib.source, "samples": calib.samples, "seq_len": calib.seq_len,
                     "heldout_batches": len(calib.heldout), "validation_batches": len(calib.validation)},
        stop_reason=result.stop_reason, canonicalized=canon, notes=explain_unmatched(gm),
        seconds=time.perf_counter() - t_start)


# ---- the result ----------------------------------------------------------------------------------

class OptimizedModel(torch.nn.Module):
    """The rewritten model: call it like the original; .report, .save(), .export_onnx()."""

    def __init__(self, gm: fx.GraphModule, report: Report, recipe, sites, example, base: str | None, io=None):
        super().__init__()
        self.graph_module = gm
        self.report, self.recipe, self.sites, self.example, self.base = report, recipe, sites, example, base
        self.io = io

    def forward(self, *args, **kwargs):
        return self.graph_module(*args, **kwargs)

    @property
    def records(self) -> list:
        return self.report.records

    def materialize(self) -> "OptimizedModel":
        """Compute once, in place, whatever the graph rebuilds from stored tensors on every call
        (MASA's weights from atoms and coefficients, feature-map constants): exact and faster, but
        the model then holds the dense weights in memory. `save` still writes the compact records."""
        G.fold_constants(self.graph_module)
        return self

    def save(self, path: str | Path) -> Path:
        """Write recipe.yaml, report.json, records.json, example inputs and built tensors (safetensors)."""
        import yaml
        from safetensors.torch import save_file
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "recipe.yaml").write_text(yaml.safe_dump(self.recipe.to_dict(), sort_keys=False))
        (path / "report.json").write_text(self.report.to_json())
        recs = [r.to_dict() for r in self.report.records]
        (path / "records.json").write_text(json.dumps({"base": self.base, "records": recs}, indent=2, default=str))
        tensors = {f"built.{i}.{k}": v.contiguous() for i, r in enumerate(self.report.records)
                   for k, v in r.built.items()}
        args, kwargs = self.example
        tensors.update({f"example.kw.{k}": v.contiguous() for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        tensors.update({f"example.arg.{i}": v.contiguous() for i, v in enumerate(args)})
        save_file(tensors, str(path / "tensors.safetensors"))
        return path

    def export_onnx(self, path: str | Path, example_inputs: dict | None = None, *, dynamic: bool = True) -> Path:
        """Export through torch.onnx (dynamo) with the custom ops' onnxscript translations. `dynamic`
        keeps batch and sequence symbolic (tested for every rule at other batch sizes and lengths);
        dynamic=False fixes them to the example's shapes."""
        import rewriter.kernels as K
        args, kwargs = self.example
        if example_inputs is not None:
            args, kwargs = _split(example_inputs)
        # the ONNX inputs are named in the traced order; kwargs in another order would be mislabelled
        kwargs = {k: kwargs[k] for k in self.example[1] if k in kwargs} | kwargs
        # the dims the model's I/O calls dynamic stay so, as in the trace (else ONNX takes only the example's shapes)
        from .io import PlainIO
        shapes = dynamic_shapes(self.io or PlainIO(), self.graph_module, tuple(args), kwargs)
        torch.onnx.export(self.graph_module, tuple(args), str(path), kwargs=kwargs, dynamo=True,
                          dynamic_shapes=shapes if dynamic else None,
                          custom_translation_table=K.ONNX_TRANSLATIONS, optimize=False)
        return Path(path)


def load(path: str | Path, model=None, *, materialize: bool = False) -> OptimizedModel:
    """Rebuild a saved OptimizedModel from its base model by replaying the records (no calibration);
    `materialize=True` then folds the stored factors into dense tensors (`OptimizedModel.materialize`)."""
    from safetensors.torch import load_file

    from .recipe import load_recipe
    path = Path(path)
    meta = json.loads((path / "records.json").read_text())
    rec = load_recipe(path / "recipe.yaml")
    loaded = _resolve(model, rec.model or meta.get("base"))
    tensors = load_file(str(path / "tensors.safetensors"))
    kwargs = {k[len("example.kw."):]: v for k, v in tensors.items() if k.startswith("example.kw.")}
    args = tuple(v for k, v in sorted(tensors.items()) if k.startswith("example.arg."))
    gm, sites, example, canon = _prepare(loaded, (args if args else kwargs))
    records = [Record.from_dict(r, {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"built.{i}.")})
               for i, r in enumerate(meta["records"])]
    replay(gm, sites, records)
    report = Report.from_dict(json.loads((path / "report.json").read_text()))
    report.records, report.sites = records, sites
    out = OptimizedModel(gm, report, rec, sites, example, base=loaded.name, io=loaded)
    return out.materialize() if materialize else out
