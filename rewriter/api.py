"""Public API: inspect, optimize, load — and the OptimizedModel they return."""
from __future__ import annotations

import contextlib
import inspect as _inspect
import json
import time
from pathlib import Path

import torch
import torch.fx as fx

from . import distributed
from . import graph as G
from .analyze import analyze
from .canonicalize import canonicalize, explain_unmatched
from .driver import Driver, Record, replay
from .calibrate import row_labels
from .gate import Gate
from .generate import decoded_runner
from .cost import graph_flops, report_cost
from .lower import generation_summary
from .report import MemoryMeter, Report, attention_flops, latency, unique_numel
from .trace import WeightGuard, trace


class SiteList(list):
    """The attention sites of a model, plus notes on what was canonicalized and what did not match."""

    def __init__(self, sites, notes=(), canonicalized=()):
        super().__init__(sites)
        self.notes = list(notes)
        self.canonicalized = list(canonicalized)


# ---- model resolution ----------------------------------------------------------------------------

def _resolve(model, spec: str | None, tokenizer=None):
    """A rewriter.models.Loaded (the model with its I/O) for a name, a Loaded, a SentenceTransformer or
    a bare nn.Module; `tokenizer` (if given) replaces the one it would have."""
    import dataclasses

    from .models import Loaded, is_sentence_transformer, load_model, sentence_loaded, wrap_module
    if model is None:
        if not spec:
            raise ValueError("no model: pass one to optimize() or name it under `model:` in the recipe")
        loaded = load_model(spec)
    elif isinstance(model, str):
        loaded = load_model(model)
    elif isinstance(model, Loaded):
        loaded = model
    elif is_sentence_transformer(model):
        return sentence_loaded(model, tokenizer)
    elif isinstance(model, torch.nn.Module):
        return wrap_module(model, tokenizer=tokenizer)
    else:
        raise TypeError(f"model must be an nn.Module, a SentenceTransformer, a rewriter.models.Loaded or a "
                        f"model name, not {type(model).__name__}")
    return dataclasses.replace(loaded, tokenizer=tokenizer) if tokenizer is not None else loaded


def _named(loaded, example_inputs):
    """Example inputs as forward() keyword arguments (positional ones named after its parameters), so
    that the graph is traced with the names the calibration batches use."""
    from .models import bind_batch
    if example_inputs is None or isinstance(example_inputs, dict):
        return example_inputs
    try:
        return bind_batch(loaded.model, example_inputs, where="example_inputs")
    except ValueError:              # e.g. a forward(*args): keep them positional
        return example_inputs


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


def inspect(model, example_inputs=None, *, tokenizer=None) -> SiteList:
    """The attention sites of `model` (a module, a SentenceTransformer, a Loaded or a registered name);
    nothing is changed. Without example inputs they are built from the model's signature and config."""
    loaded = _resolve(model, None, tokenizer)
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

def optimize(model=None, recipe=None, *, tokenizer=None, calibration=None, example_inputs=None,
             progress=True, measure_latency: bool = True):
    """Trace `model`, apply `recipe` (path, dict or Recipe) candidate by candidate with an accuracy gate,
    and return an OptimizedModel with the same call signature. The input model is never modified.

    `model`: a registered name, a Loaded, an nn.Module (a Hugging Face model or your own) or a
    SentenceTransformer (then a SentenceTransformer comes back, `.report` on it). `tokenizer` turns
    text into inputs; without one, a model loaded from a local folder uses that folder's (the report
    says so). `calibration`: a Calibration, a list of strings, or an iterable of batches (dicts or
    tuples of inputs, e.g. a DataLoader) split by the recipe's calibration section; None: the
    recipe's `calibration.text`. `example_inputs` (a dict or a tuple of positional inputs): what to
    trace on instead of the first calibration batch.
    `progress`: True prints each decision and a live bar on stderr; a callable gets each Record.

    Memory: one copy of the weights. The result shares every tensor it does not rewrite with
    `model` (so training `model` afterwards changes it too: `copy.deepcopy` the result to part them);
    the original's outputs come from `model` itself, in eval mode under no_grad, its modes restored;
    an in-place write into a shared tensor raises SharedWriteError naming the rule and the tensor.
    `report.memory` holds the peak RSS.

    Data parallel: inside an initialized torch.distributed process group of N > 1 processes
    (torchrun, `rewriter run --nproc N`, rewriter.distributed.init_from_env or your own
    init_process_group) every rank calls optimize with the same arguments; the forward passes
    over the calibration, validation, gate and held-out batches are shared out (batch i on rank
    i mod N, rewriter/distributed.py), every rank gets the same records, tensors and report
    (`report.world_size` = N; latency timed on rank 0), equal to the one-process run's bit for
    bit at the same per-process thread count. Save on rank 0."""
    from .models import calibration_from, is_sentence_transformer, sentence_result
    from .recipe import default_gate, load_recipe

    t_start = time.perf_counter()
    rec = load_recipe(recipe)
    loaded = _resolve(model, rec.model, tokenizer)
    # memory: the graph shares the user's weights (rewriter.trace.share_copy), the original is the
    # user's own module run in eval mode under no_grad (its modes restored after), never a copy;
    # the guard checks after the trace and after every decision that nothing wrote into them
    guard = WeightGuard(loaded.model)
    world = distributed.current()
    with MemoryMeter() as meter, _evaluating(loaded.model) as original:
        calib = calibration_from(loaded, calibration, **rec.calibration.resolved(rec.steps))
        example = calib.batches[0] if example_inputs is None else _named(loaded, example_inputs)
        gm, sites, example, canon = _prepare(loaded, example)
        guard.check(f"tracing {loaded.name}")
        if measure_latency:        # the whole-model FLOPs before the rewrites (the report's cost model)
            with contextlib.suppress(Exception):   # a graph the count cannot run: the report says why
                gm.meta["rewriter_cost_before"] = graph_flops(gm)
        if not sites:
            raise ValueError(f"{loaded.name}: no attention sites to rewrite. "
                             + " ".join(explain_unmatched(gm) or [_what_it_saw(gm)]))
        gate_spec = rec.gate or default_gate(loaded.kind)
        gate = Gate.from_model(gate_spec, original, calib.gate_batches, loaded, calib.gate_labels, world)
        with _progress(progress, loaded.name) as on_record:
            driver = Driver(gm, sites, calib, loaded, gate, rec.budget, _guarded(guard, on_record))
            result = driver.run(rec.steps)
        guard.check("the rewrites")
        del driver, gate            # the gate's reference outputs go before the held-out check's come
        report = _report(loaded, original, gm, sites, result, gate_spec, calib, canon, measure_latency,
                         t_start, world)
    report.memory = meter.result(loaded.model, gm)
    opt = OptimizedModel(gm, report, rec, sites, example, base=loaded.name, io=loaded)
    return sentence_result(model, opt) if is_sentence_transformer(model) else opt


@contextlib.contextmanager
def _evaluating(model: torch.nn.Module):
    """`model` itself, every submodule in eval mode, for the gate's reference outputs, the held-out
    check and the latency timing (each runs it under no_grad); afterwards every submodule is back in
    the mode it was in, whatever happened in between."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _guarded(guard: WeightGuard, on_record):
    """The driver's on_record: after every decision, check that no user tensor changed
    (SharedWriteError names the rule, its sites and the tensors), then pass the record on. A
    skipped candidate ran no rule code, so only the version counters are compared after it; the
    checksums (which also see a write through `.data`) after every other decision and at the end."""
    def check(r: Record) -> None:
        guard.check(f"rule {r.rule} (site(s) {list(r.sites)}, {r.status})", checksums=r.status != "skipped")
        if on_record is not None:
            on_record(r)
    return check


def _user_notes(loaded, calib) -> list[str]:
    """What the report says about inputs the user handed over: a tokenizer found in the model's folder,
    how their calibration batches were split."""
    notes = []
    if loaded.extra.get("tokenizer_from"):
        notes.append(f"tokenizer loaded from the model's folder {loaded.extra['tokenizer_from']} "
                     f"(none was passed with tokenizer=)")
    if calib.source == "batches":
        notes += calib.notes
    return notes


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


def _calibration_summary(calib) -> dict:
    """What the report says about the samples: their source, and per set (calibration, validation,
    held out) the samples of each kind of text at each length, so every number names its text."""
    def cells(batches, labels) -> list[dict]:
        out: dict = {}
        for b, lb in zip(batches, labels or [(calib.source, None)] * len(batches)):
            rows = next((int(v.shape[0]) for v in b.values() if isinstance(v, torch.Tensor) and v.dim()), 1)
            for x in row_labels(lb, rows):
                out[x] = out.get(x, 0) + 1
        return [{"text": t, "tokens": n, "samples": k} for (t, n), k in out.items()]
    return {"source": calib.source, "samples": calib.samples, "seq_len": calib.seq_len,
            "lengths": list(calib.lengths), "gate_on": calib.gate_set,
            "heldout_batches": len(calib.heldout), "validation_batches": len(calib.validation),
            "sets": {"calibration": cells(calib.batches, calib.batch_labels),
                     "validation": cells(calib.validation, calib.validation_labels),
                     "heldout": cells(calib.heldout, calib.heldout_labels)}}


def _report(loaded, original, gm, sites, result, gate_spec, calib, canon, measure_latency, t_start,
            world=distributed.SINGLE) -> Report:
    heldout = {}
    kept = any(r.status == "applied" for r in result.records)     # else the result is the traced original
    if calib.heldout and not kept:       # nothing to judge: the result computes the original's function
        at = f" (the gate measured that graph at {result.final.value:.6g})" if result.final else ""
        heldout = {"metric": gate_spec.metric,
                   "skipped": f"no rewrite was kept: the result is the original run through its traced graph{at}"}
    elif calib.heldout:
        # gate.decode: the held-out text is judged teacher-forced too, as generation runs the model
        decoded = decoded_runner(sites, gate_spec.decode_share) if gate_spec.decode_share else None
        m = Gate.from_model(gate_spec, original, calib.heldout, loaded, calib.heldout_labels,
                            world).measure(gm, decoded)
        heldout = m.to_dict()
    fb, fa = attention_flops(sites, result.records)
    # whole-model FLOPs (rewriter.cost), from the graph's cost before the rewrites (else a fresh trace)
    before = gm.meta.pop("rewriter_cost_before", None) or (lambda: _prepare(loaded, calib.batches[0])[0])
    whole = report_cost(before, gm, seq_len=calib.seq_len,
                        limit=min(getattr(loaded, "max_positions", {}).values(), default=None)
                        ) if measure_latency else None
    return Report(
        model=loaded.name, kind=loaded.kind, sites=sites, records=result.records,
        params_before=unique_numel(original), params_after=unique_numel(gm),
        flops_before=fb, flops_after=fa,
        flops_per_token=whole.per_token if whole else {}, predicted_speedup=whole.predicted if whole else {},
        cost=whole.info if whole else {},
        # timed on rank 0 alone (the other ranks wait: timing beside them would measure the sharing)
        latency=world.on_rank0(lambda: latency(original, gm, calib.batches[0], **whole.sweep(),
                                               cost=_call_flops(whole), kept=kept),
                               "timing latency") if measure_latency else {},
        heldout=heldout, gate=gate_spec.model_dump(exclude_none=True),
        calibration=_calibration_summary(calib),
        stop_reason=result.stop_reason, canonicalized=canon,
        notes=_user_notes(loaded, calib) + explain_unmatched(gm) + _world_notes(world, calib),
        seconds=time.perf_counter() - t_start, world_size=world.size,
        generation=generation_summary(gm, sites, loaded.mask_inputs()) if loaded.kind == "causal_lm" else {})


def _call_flops(whole):
    """The original's FLOPs per call at batch 1 and length n from the report's cost model (what the
    latency entry's budget scales by, `rewriter.report.latency`); None where there is no count."""
    return whole.before.at if whole is not None and getattr(whole, "before", None) is not None else None


def _world_notes(world, calib) -> list[str]:
    """What the report says about a data-parallel run (nothing with one process)."""
    if world.single:
        return []
    n = world.size
    return [f"{n} processes shared the forward passes: batch i of the calibration "
            f"({len(calib.batches)}), validation ({len(calib.validation)}) and held-out "
            f"({len(calib.heldout)}) batches ran on rank i mod {n}, the results gathered in batch order; "
            "latency timed on rank 0"]


# ---- the result ----------------------------------------------------------------------------------

class InputError(ValueError):
    """An OptimizedModel was called with inputs its traced graph cannot take. The message is one line
    naming the input and what the graph expects of it."""


_POSITIONAL = (_inspect.Parameter.POSITIONAL_ONLY, _inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _signature(fn):
    try:
        return _inspect.signature(fn)
    except (TypeError, ValueError):
        return None


class _TracedInputs:
    """How a call of the original forward() maps onto the traced graph, and what each traced tensor
    input must be: its dtype, its rank, the sizes fixed at trace time and, for the sizes that stay
    dynamic, the symbol they share with other inputs and the largest size the graph takes (torch.export
    bounds a length by the position table it indexes)."""

    def __init__(self, gm: fx.GraphModule, example, model=None, positions: dict | None = None):
        args, kwargs = example
        sig = _signature(model.forward) if model is not None else None
        sig = sig or _signature(gm.forward)
        self.owner = f"{type(model).__name__}.forward" if model is not None else "the model"
        self.params = dict(sig.parameters) if sig else {}
        kinds = {p.kind for p in self.params.values()}
        self.var_kw = _inspect.Parameter.VAR_KEYWORD in kinds
        self.var_pos = _inspect.Parameter.VAR_POSITIONAL in kinds
        self.positional = [n for n, p in self.params.items() if p.kind in _POSITIONAL]
        self.arg_names = [self.positional[i] if i < len(self.positional) else f"args[{i}]"
                          for i in range(len(args))]
        self.kw_names = list(kwargs)
        self.example = dict(zip(self.arg_names, args)) | dict(kwargs)
        self.expect = {}                       # name -> (dtype, [int | (symbol, largest or None)])
        leaves = torch.utils._pytree.tree_leaves((tuple(args), dict(kwargs)))
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for name, x in self.example.items():
            i = next((i for i, leaf in enumerate(leaves) if leaf is x), None) \
                if isinstance(x, torch.Tensor) and len(leaves) == len(placeholders) else None
            val = placeholders[i].meta.get("val") if i is not None else None
            if isinstance(val, torch.Tensor):
                self.expect[name] = (val.dtype, [self._dim(d) for d in val.shape])
        for name, limit in (positions or {}).items():      # the position table the model's I/O names
            dims = self.expect.get(name, (None, []))[1]
            if len(dims) >= 2 and not isinstance(dims[1], int) and (dims[1][1] is None or dims[1][1] > limit):
                dims[1] = (dims[1][0], limit)

    @staticmethod
    def _dim(d):
        if not isinstance(d, torch.SymInt):
            return int(d)
        try:
            expr = d.node.expr
            upper = d.node.shape_env.var_to_range[expr].upper
            return (str(expr), int(upper) if upper.is_finite else None)
        except (AttributeError, KeyError, TypeError, ValueError):
            return (str(d), None)

    def _shape(self, name) -> str:
        dims = self.expect[name][1]
        return "[" + ", ".join(str(d) if isinstance(d, int) else (f"≤{d[1]}" if d[1] else "*")
                               for d in dims) + "]"

    def _unknown(self, name) -> InputError:
        import difflib
        known = self.arg_names + self.kw_names
        close = difflib.get_close_matches(name, known + list(self.params), n=1, cutoff=0.8)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return InputError(f"unknown input {name!r}: {hint}the optimized model takes {', '.join(known)}")

    def bind(self, args: tuple, kwargs: dict) -> tuple[list, dict]:
        """(args, kwargs) of a call as the original forward takes them → the traced graph's layout,
        each input checked; InputError names the first that does not fit."""
        if len(args) > len(self.positional) and not self.var_pos:
            raise InputError(f"{len(args)} positional inputs given, but {self.owner} takes "
                             f"{len(self.positional)} ({', '.join(self.positional) or 'none'})")
        names = self.positional + [f"args[{i}]" for i in range(len(self.positional), len(args))]
        given = dict(zip(names, args))
        for k, v in kwargs.items():
            if k in given:
                raise InputError(f"input {k!r} given twice, by position and by name")
            given[k] = v
        traced = self.arg_names + self.kw_names
        for k, v in list(given.items()):
            if k in traced:
                continue
            p = self.params.get(k)
            if p is None or p.kind is _inspect.Parameter.VAR_KEYWORD:
                if v is None or v is False:
                    continue                    # an option left off, as when traced
                if p is None and not self.var_kw or isinstance(v, torch.Tensor):
                    raise self._unknown(k)
                raise InputError(f"input {k!r}={v!r}: the optimized graph was traced without it, and "
                                 f"cannot change; it takes {', '.join(traced)}")
            if v is None or (not isinstance(v, torch.Tensor) and p.default is not _inspect.Parameter.empty
                             and _same(v, p.default)):
                continue                        # the value the trace used
            if isinstance(v, torch.Tensor):
                raise InputError(f"input {k!r} was not given when the model was traced, so the optimized "
                                 f"graph has no place for it; it takes {', '.join(traced)}")
            raise InputError(f"input {k!r}={v!r}: the optimized graph was traced with its default "
                             f"({p.default!r}), which it cannot change")
        symbols: dict = {}
        for k in traced:
            v, ex = given.get(k), self.example[k]
            if not isinstance(ex, torch.Tensor):
                if k in given and not _same(v, ex):
                    raise InputError(f"input {k!r}={v!r}: the optimized graph was traced with {ex!r}, "
                                     f"which it cannot change")
                given[k] = ex
            elif v is None:
                what = f" ({self.expect[k][0]}, shape {self._shape(k)})" if k in self.expect else ""
                raise InputError(f"missing input {k!r}{what}: the optimized model was traced with it")
            elif k in self.expect:
                self._check(k, v, symbols)
        return [given[k] for k in self.arg_names], {k: given[k] for k in self.kw_names}

    def index_inputs(self, args, kwargs) -> str:
        """The integer inputs of a call, with their shapes: the ones that can index a table."""
        named = dict(zip(self.arg_names, args)) | kwargs
        ints = [f"{k!r} (shape {list(v.shape)})" for k, v in named.items()
                if isinstance(v, torch.Tensor) and not v.is_floating_point() and v.dtype is not torch.bool]
        return ", ".join(ints) or "the inputs"

    def _check(self, name: str, x, symbols: dict) -> None:
        dtype, dims = self.expect[name]
        if not isinstance(x, torch.Tensor):
            raise InputError(f"input {name!r}: expected a tensor ({dtype}, shape {self._shape(name)}), "
                             f"got {type(x).__name__}")
        if x.dtype != dtype:
            raise InputError(f"input {name!r}: expected dtype {dtype}, got {x.dtype}")
        if x.dim() != len(dims):
            raise InputError(f"input {name!r}: expected {len(dims)} dims, shape {self._shape(name)}; "
                             f"got shape {list(x.shape)}")
        for i, (want, size) in enumerate(zip(dims, x.shape)):
            if isinstance(want, int):
                if size != want:
                    raise InputError(f"input {name!r}: dim {i} must be {want} (fixed when the model was "
                                     f"traced), got shape {list(x.shape)}")
                continue
            sym, largest = want
            if size == 0:
                raise InputError(f"input {name!r}: dim {i} is empty (shape {list(x.shape)})")
            if largest is not None and size > largest:
                raise InputError(f"input {name!r}: dim {i} is {size}, more than the {largest} the model "
                                 f"takes (its position table)")
            seen = symbols.setdefault(sym, (size, name, i))
            if seen[0] != size:
                raise InputError(f"input {name!r}: dim {i} is {size}, but dim {seen[2]} of {seen[1]!r} is "
                                 f"{seen[0]}; the two must match")


def _same(a, b) -> bool:
    try:
        return bool(a == b) if not isinstance(a, torch.Tensor) else False
    except Exception:  # noqa: BLE001 (objects whose == is not a bool)
        return a is b


class OptimizedModel(torch.nn.Module):
    """The rewritten model: call it like the original (positional and keyword inputs bound as its
    forward() binds them; an input that does not fit raises InputError naming it); .report, .save(),
    .export_onnx()."""

    def __init__(self, gm: fx.GraphModule, report: Report, recipe, sites, example, base: str | None, io=None):
        super().__init__()
        self.graph_module = gm
        self.report, self.recipe, self.sites, self.example, self.base = report, recipe, sites, example, base
        self.io = io
        # built here, not on the first call: under torch.compile the first call is traced by dynamo,
        # and the graph's symbolic sizes would then arrive as SymInts of dynamo's own
        self.__dict__["_inputs"] = _TracedInputs(gm, example, getattr(io, "model", None),
                                                 getattr(io, "max_positions", None))

    def forward(self, *args, **kwargs):
        inputs = self.__dict__["_inputs"]
        args, kwargs = inputs.bind(args, kwargs)
        try:
            return self.graph_module(*args, **kwargs)
        except IndexError as e:         # a table indexed beyond its end: name the inputs that index
            raise InputError(f"the inputs index beyond a table of the model ({e}): check "
                             f"{inputs.index_inputs(args, kwargs)} (token ids below the vocabulary size, "
                             f"lengths within the position table)") from None

    def train(self, mode: bool = True) -> "OptimizedModel":
        """``eval()`` works (the graph was traced in eval mode: it already is); training mode does not
        exist for a traced graph (torch.export's modules refuse it), so ``train()`` says so."""
        if mode:
            raise NotImplementedError("an OptimizedModel runs its graph as traced, in eval mode (dropout "
                                      "off); it has no training mode")
        self.training = False
        return self

    @property
    def records(self) -> list:
        return self.report.records

    def materialize(self) -> "OptimizedModel":
        """Compute once, in place, whatever the graph rebuilds from stored tensors on every call
        (MASA's weights from atoms and coefficients, feature-map constants): exact and faster, but
        the model then holds the dense weights in memory. `save` still writes the compact records."""
        G.fold_constants(self.graph_module)
        return self

    def generate(self, input_ids, attention_mask=None, *, max_new_tokens: int = 20, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 eos_token_id=None, pad_token_id=None, streamer=None, generator=None, stats=None,
                 compile: bool = False):
        """Token ids [B, T + new] as transformers' generate returns them (prompt + new tokens, left
        padding by `attention_mask`): prefill, then one token per step through the lowered graphs
        with each site's state (`rewriter.generate`; it calls `materialize()` first). A causal LM
        only; a rewrite without a decode form raises GenerationError naming the site and why.
        `compile=True`: the decode steps run through torch.compile (rewriter.generate)."""
        from .generate import generate
        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, do_sample=do_sample,
                        temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, streamer=streamer, generator=generator, stats=stats,
                        compile=compile)

    def save(self, path: str | Path) -> Path:
        """Write recipe.yaml, report.json, tensors.safetensors (built tensors and example inputs) and
        records.json (format version, base model, records, and each tensor's dtype, shape and SHA-256),
        records.json last so that an interrupted save reads as incomplete (`rewriter.artifact`)."""
        from .artifact import write
        tensors = {f"built.{i}.{k}": v for i, r in enumerate(self.report.records) for k, v in r.built.items()}
        args, kwargs = self.example
        tensors.update({f"example.kw.{k}": v for k, v in kwargs.items() if isinstance(v, torch.Tensor)})
        tensors.update({f"example.arg.{i}": v for i, v in enumerate(args) if isinstance(v, torch.Tensor)})
        return write(path, recipe=self.recipe.to_dict(), report_json=self.report.to_json(), base=self.base,
                     records=[r.to_dict() for r in self.report.records], tensors=tensors)

    def export_onnx(self, path: str | Path, example_inputs: dict | None = None, *, dynamic: bool = True) -> Path:
        """Export through torch.onnx (dynamo) with the custom ops' onnxscript translations. `dynamic`
        keeps batch and sequence symbolic whatever the example's sizes, 1 included (the example is
        widened as for the trace, `rewriter.trace.export`; tested for every rule, from batch-1
        examples, at other batch sizes and lengths); dynamic=False fixes them to the example's shapes."""
        import rewriter.kernels as K

        from .io import PlainIO
        from .trace import export as _export
        args, kwargs = self.example
        if example_inputs is not None:
            args, kwargs = _split(example_inputs)
        # the ONNX inputs are named in the traced order; kwargs in another order would be mislabelled
        kwargs = {k: kwargs[k] for k in self.example[1] if k in kwargs} | kwargs

        def onnx_export(module, a, k, shapes):
            return torch.onnx.export(module, a, str(path), kwargs=k, dynamo=True, dynamic_shapes=shapes,
                                     custom_translation_table=K.ONNX_TRANSLATIONS, optimize=False)
        if dynamic:   # the dims the model's I/O calls dynamic stay so, as in the trace
            _export(self.graph_module, tuple(args), kwargs, self.io or PlainIO(), onnx_export)
        else:
            onnx_export(self.graph_module, tuple(args), kwargs, None)
        return Path(path)


def load(path: str | Path, model=None, *, materialize: bool = False,
         trust_code: bool = False) -> OptimizedModel:
    """Rebuild a saved OptimizedModel from its base model by replaying the records (no calibration);
    `materialize=True` then folds the stored factors into dense tensors (`OptimizedModel.materialize`).

    A saved folder may come from anyone, so it is validated before any of it is used and runs no code:
    a missing file, a tensor of the wrong shape or content, an unknown rule, options that fail
    validation, a newer format, records made for another model: each raises `ArtifactError`, one line
    naming the file and the fault, and no half-built model is returned. A recipe `model:` naming
    "package.module:function" (code `load_model` would import and call) is refused unless
    `trust_code=True`, or pass the model yourself (`model=`); registered names and model folders
    load as before."""
    from .artifact import ArtifactError, check_model_spec, check_sites, read, shapes
    from .models import registered
    from .trace import TraceError
    saved = read(path)
    try:
        report = Report.from_dict(saved.report)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ArtifactError(saved.path / "report.json",
                            f"not a rewriter report ({type(e).__name__}: {e})") from None
    if model is None:
        file, key, spec = ((saved.path / "recipe.yaml", "model", saved.recipe.model) if saved.recipe.model
                           else (saved.path / "records.json", "base", saved.base))
        if not spec:
            raise ArtifactError(file, f"{key}: no model is named; pass one: load(path, model=...)")
        check_model_spec(spec, file, key, registered=registered(), trust_code=trust_code)
        try:
            loaded = _resolve(None, spec)
        except (ValueError, LookupError, ImportError, OSError) as e:
            raise ArtifactError(file, f"{key}: cannot load model {spec!r}: {e}") from None
    else:
        loaded = _resolve(model, None)
    args, kwargs = saved.example()
    tensors_file = saved.path / "tensors.safetensors"
    try:
        gm, sites, example, canon = _prepare(loaded, (args if args else kwargs))
    except TraceError as e:
        raise ArtifactError(tensors_file, f"{loaded.name} does not trace on the saved example inputs "
                                          f"({shapes(args, kwargs)}): {str(e).splitlines()[0]}") from None
    check_sites(saved, sites)
    records = [Record.from_dict(r, saved.built(i)) for i, r in enumerate(saved.records)]
    for i, r in enumerate(records):            # one at a time, so a failure names its record
        try:
            replay(gm, sites, [r])
        except Exception as e:  # noqa: BLE001 (a rule's apply on saved data: any failure is the artifact's)
            raise ArtifactError(saved.path / "records.json",
                                f"records[{i}] ({r.rule}, site(s) {list(r.sites)}) does not replay on "
                                f"{loaded.name}: {type(e).__name__}: {e}") from None
    try:                                      # the built tensors must fit the graph they went into
        with torch.no_grad():
            gm(*example[0], **example[1])
    except Exception as e:  # noqa: BLE001
        raise ArtifactError(tensors_file, f"the replayed model fails on the saved example inputs "
                                          f"({shapes(*example)}): {type(e).__name__}: {e}") from None
    report.records, report.sites = records, sites
    out = OptimizedModel(gm, report, saved.recipe, sites, example, base=loaded.name, io=loaded)
    return out.materialize() if materialize else out
