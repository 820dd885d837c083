"""Whole-model cost model: the FLOPs of every node of a traced graph, as a sympy expression in the
sequence length N, read from the graph's symbolic shapes.

`graph_flops(gm)` runs the graph once on fake tensors shaped like the ones torch.export left in its
placeholders' `meta["val"]` (symbolic sizes, re-made in a private shape env so that the export's
is never touched), every parameter as a fake tensor of its shape, under a dispatch mode that
counts each aten op it reaches (a call repeated with the same argument shapes, every layer's, runs
once):

    mm, bmm, addmm, baddbmm, addbmm, mv, dot      2·M·K·N (a multiply-add = 2), + M·N for the add
    convolution                                   2·numel(out)·(C_in / groups)·kernel, + bias
    scaled_dot_product_attention                  B·H·Tq·Tk·(2·D + 2·Dv + 5) (5: the softmax per
                                                  score), the causal triangle's pairs when is_causal
    elementwise (aten's `pointwise` tag, where)   numel(out)
    reductions, cumulative ops, top-k, sort       numel(in)
    softmax, log_softmax                          5·numel; layer/group/batch norm 5·numel; RMS norm 4
    views, copies, casts, gathers, factories      0 (data movement)
    rewriter::<op> (our custom ops)               the op's formula, next to the op (kernels/<op>/flops.py)

Composite ops (linear, matmul, einsum, conv1d, layer_norm, ...) reach the mode as the aten ops
they decompose to, so the count is of what runs; plain functions a rewritten graph calls
(rewriter.kernels' routing and agent pooling) are counted through the same way. An op no rule
covers is reported by name (`GraphCost.unknown`), never counted as 0 silently.

The sizes: the batch symbol(s) become `batch` (1 unless stated), the sequence symbol(s) become N.
Which symbol is the sequence is read from the graph, not guessed per model: the free symbols of
the query and key lengths (dim −2) of its scaled_dot_product_attention nodes; the batch ones from
their dim 0 and every input's dim 0. A `SymbolMap` names them by (input, dim), so the map found
on the original graph applies to a rewritten one that has no SDPA left. A symbol neither names
(rare: a size torch.export kept dynamic that attention does not depend on) takes its example
size, and `GraphCost.fixed` says so. Python code that branches on a size (a routing function's
min(blocks, budget)) is counted along the branch it takes at N = `hint` (default 2048, capped by
the graph's bound): exact in the long-sequence regime where the cost matters.

`model_cost(before, after_gm)` pairs the original's count with the rewritten graph's (the map of the
original applied to it): FLOPs per token before / after, the predicted speed-up (FLOPs before /
after) at the lengths the report times, and the inputs to time at those lengths; the report and
`rewriter bench` use it.
"""
from __future__ import annotations

import contextlib
import logging
import math
import operator
from dataclasses import dataclass, field

import sympy
import torch
import torch.fx as fx
from torch.utils._python_dispatch import TorchDispatchMode

from .report import N

aten = torch.ops.aten
SOFTMAX = 5

_MATMUL = {aten.mm.default, aten.bmm.default, aten.addmm.default, aten.baddbmm.default,
           aten.addbmm.default, aten.mv.default, aten.addmv.default, aten.dot.default, aten.vdot.default}
_CONV = {aten.convolution.default, aten._convolution.default}
_SDPA_FUSED = {aten._scaled_dot_product_flash_attention_for_cpu.default,
               aten._scaled_dot_product_flash_attention.default,
               aten._scaled_dot_product_efficient_attention.default,
               aten._scaled_dot_product_cudnn_attention.default}
# per element of the input
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "var_mean", "std_mean", "prod",
           "norm", "linalg_vector_norm", "logsumexp", "argmax", "argmin", "cumsum", "cumprod",
           "logcumsumexp", "any", "all", "topk", "sort", "argsort", "diff", "count_nonzero",
           "avg_pool1d", "avg_pool2d", "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d",
           "max_pool2d_with_indices", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
           "_adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d", "_weight_norm_interface",
           "_weight_norm", "nan_to_num", "tril", "triu", "masked_fill", "masked_fill_", "isfinite",
           "_euclidean_dist", "cdist"}
_PER_ELEMENT = {"_softmax": SOFTMAX, "softmax": SOFTMAX, "_log_softmax": SOFTMAX, "log_softmax": SOFTMAX,
                "native_layer_norm": 5, "layer_norm": 5, "native_group_norm": 5, "group_norm": 5,
                "native_batch_norm": 5, "_native_batch_norm_legit_no_training": 5,
                "_native_batch_norm_legit": 5, "batch_norm": 5, "instance_norm": 5, "rms_norm": 4,
                "_fused_rms_norm": 4}
_MOVE = {"view", "_unsafe_view", "reshape", "permute", "transpose", "t", "expand", "expand_as", "squeeze",
         "unsqueeze", "flatten", "unflatten", "select", "slice", "split", "split_with_sizes", "chunk",
         "unbind", "narrow", "as_strided", "alias", "detach", "detach_", "contiguous", "clone", "copy",
         "copy_", "_to_copy", "to", "type_as", "lift_fresh", "lift_fresh_copy", "_reshape_alias",
         "numpy_T", "mT", "movedim", "cat", "stack", "hstack", "vstack", "concat", "pad",
         "constant_pad_nd", "repeat", "repeat_interleave", "tile", "flip", "roll", "index", "index_select",
         "gather", "take_along_dim", "scatter", "index_put", "index_copy", "embedding", "masked_select",
         "nonzero", "arange", "full", "full_like", "zeros", "zeros_like", "ones", "ones_like", "empty",
         "empty_like", "empty_strided", "new_zeros", "new_ones", "new_full", "new_empty", "scalar_tensor",
         "_local_scalar_dense", "item", "sym_size", "sym_numel", "sym_stride", "sym_storage_offset",
         "_assert_scalar", "_assert_tensor_metadata", "sym_constrain_range", "sym_constrain_range_for_size",
         "_assert_async", "dropout", "native_dropout", "feature_dropout", "alpha_dropout", "resize_",
         "set_", "fill_", "zero_", "unfold", "view_as", "reshape_as", "diagonal", "triu_indices",
         "tril_indices", "linspace", "eye", "bernoulli", "rand", "randn", "randint", "randperm",
         "_unsafe_index", "_unsafe_index_put", "block_diag", "broadcast_to", "meshgrid", "one_hot",
         "split_copy", "slice_scatter", "select_scatter", "where_", "_to_dim_order_copy", "dim", "index_fill",
         "masked_scatter", "put", "take", "view_as_real",
         "view_as_complex", "real", "imag", "conj", "_conj", "resolve_conj", "resolve_neg"}
_FUNCTIONS = {"FloorDiv": lambda a, b: sympy.floor(a / b), "CeilDiv": lambda a, b: sympy.ceiling(a / b),
              "CleanDiv": operator.truediv, "IntTrueDiv": operator.truediv, "FloatTrueDiv": operator.truediv,
              "Mod": lambda a, b: a - b * sympy.floor(a / b),
              "PythonMod": lambda a, b: a - b * sympy.floor(a / b),
              "Min": sympy.Min, "Max": sympy.Max, "ToFloat": lambda a: a, "Identity": lambda a: a,
              "TruncToInt": sympy.floor, "FloorToInt": sympy.floor, "CeilToInt": sympy.ceiling,
              "RoundToInt": sympy.floor, "TruncToFloat": sympy.floor, "PowByNatural": operator.pow,
              "FloatPow": operator.pow, "OpaqueUnaryFn_sqrt": sympy.sqrt, "OpaqueUnaryFn_log": sympy.log}


def as_expr(x) -> sympy.Expr:
    """A size as sympy: ints as Integer, SymInts / SymFloats as their expression."""
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return x.node.expr
    if isinstance(x, bool):
        return sympy.Integer(int(x))
    if isinstance(x, int):
        return sympy.Integer(x)
    if isinstance(x, float):
        return sympy.Float(x)
    return sympy.sympify(x) if isinstance(x, sympy.Basic) else x


def _numel(t) -> sympy.Expr:
    return sympy.Mul(*[as_expr(d) for d in t.shape]) if isinstance(t, torch.Tensor) else sympy.Integer(0)


def _shapes(x):
    """Tensors (also inside lists) → shape tuples of sympy expressions; SymInts → expressions."""
    if isinstance(x, torch.Tensor):
        return tuple(as_expr(d) for d in x.shape)
    if isinstance(x, (list, tuple)):
        return type(x)(_shapes(a) for a in x)
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return as_expr(x)
    return x


def _name(func) -> str:
    """'addmm' for aten.addmm.default; 'rewriter::linear_attention' for our ops; qualname otherwise."""
    schema = getattr(func, "_schema", None)
    if schema is not None:
        ns, _, name = schema.name.partition("::")
        return name if ns == "aten" else schema.name
    return f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}".lstrip(".")


def sdpa_flops(q, k, v, is_causal: bool = False) -> sympy.Expr:
    """Softmax attention core of shapes q [..., Tq, D], k [..., Tk, D], v [..., Tk, Dv]."""
    from rewriter.kernels.flops import causal_pairs, softmax_attention
    heads = sympy.Mul(*q[:-2]) if len(q) > 2 else sympy.Integer(1)
    pairs = causal_pairs(q[-2], k[-2]) if is_causal else None
    return softmax_attention(1, heads, q[-2], k[-2], q[-1], v[-1], pairs=pairs)


def _arg(func, args, kwargs, name: str, default=False):
    """The argument `name` of a call, by the op's schema."""
    if name in kwargs:
        return kwargs[name]
    names = [a.name for a in func._schema.arguments]
    i = names.index(name) if name in names else len(args)
    return args[i] if i < len(args) else default


def aten_flops(func, args, kwargs, out) -> sympy.Expr | None:
    """FLOPs of one aten op call (fake tensors with symbolic sizes), None when no rule covers it."""
    name = _name(func)
    packet = getattr(func, "overloadpacket", None)
    if func in _MATMUL:
        a, b = (args[1], args[2]) if name in ("addmm", "baddbmm", "addbmm", "addmv") else (args[0], args[1])
        k = as_expr(a.shape[-1]) if a.dim() else sympy.Integer(1)
        flops = 2 * _numel(out) * k if name not in ("addbmm",) else 2 * _numel(a) * as_expr(b.shape[-1])
        return flops + (_numel(out) if name in ("addmm", "baddbmm", "addbmm", "addmv") else 0)
    if func in _CONV:
        x, w, bias, transposed = args[0], args[1], args[2], args[6]
        kernel = sympy.Mul(*[as_expr(d) for d in w.shape[2:]])
        if transposed:          # weight [C_in, C_out / groups, k...]: every input element meets C_out/g·k
            flops = 2 * _numel(x) * as_expr(w.shape[1]) * kernel
        else:                   # weight [C_out, C_in / groups, k...]
            flops = 2 * _numel(out) * as_expr(w.shape[1]) * kernel
        return flops + (_numel(out) if bias is not None else 0)
    if func in _SDPA_FUSED:
        causal = bool(_arg(func, args, kwargs, "is_causal"))
        return sdpa_flops(*(_shapes(a) for a in args[:3]), is_causal=causal)
    if name in _PER_ELEMENT:
        return _PER_ELEMENT[name] * _numel(args[0])
    if name in _REDUCE:
        return _numel(args[0])
    if name in ("scatter_add", "scatter_reduce", "index_add"):      # (self, dim, index, src): an add per src
        return _numel(args[3]) if len(args) > 3 else _numel(out)
    if name in _MOVE or packet is aten.where or name.startswith("prim::"):
        return _numel(out) if packet is aten.where else sympy.Integer(0)
    if torch.Tag.pointwise in getattr(func, "tags", ()):
        outs = out if isinstance(out, (tuple, list)) else (out,)
        return sum((_numel(o) for o in outs if isinstance(o, torch.Tensor)), sympy.Integer(0))
    if name in ("floor_divide", "remainder", "fmod", "logical_and", "logical_or", "logical_not") or \
            name.startswith(("__and__", "__or__", "__xor__", "__invert__", "__lshift__", "__rshift__")):
        return _numel(out)
    return None


@dataclass
class SymbolMap:
    """Which input dims carry the sequence length (→ N) and the batch size, as (input index, dim)."""
    seq: list = field(default_factory=list)
    batch: list = field(default_factory=list)
    how: str = ""
    tokens: int | None = None     # attention of a fixed length (no sequence symbol): its token count

    def symbols(self, vals: list) -> tuple[set, set]:
        """(sequence symbols, batch symbols) of the input values `vals` at these (input, dim) slots."""
        def syms(slots):
            out = set()
            for i, d in slots:
                val = vals[i] if i < len(vals) else None
                if isinstance(val, torch.Tensor) and d < val.dim():
                    out |= as_expr(val.shape[d]).free_symbols
            return out
        return syms(self.seq), syms(self.batch)


def _placeholders(gm) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _val(n):
    return n.meta.get("val") if isinstance(n, fx.Node) else None


def find_symbols(gm: fx.GraphModule) -> SymbolMap:
    """The sequence and batch dims of `gm`'s inputs, read from its attention: the free symbols of
    the query / key length (dim −2) of each SDPA node are the sequence, those of their dim 0 and
    of every input's dim 0 the batch. Attention of a fixed length (a ViT's patches) has no
    sequence symbol: FLOPs per token are then per call / its query length (`tokens`). Without an
    SDPA node: dim 0 batch, other dynamic dims N."""
    seq, batch, fixed = set(), set(), []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is aten.scaled_dot_product_attention.default:
            for a in n.args[:2]:
                v = _val(a)
                if isinstance(v, torch.Tensor) and v.dim() >= 3:
                    seq |= as_expr(v.shape[-2]).free_symbols
                    batch |= as_expr(v.shape[0]).free_symbols
                    if not as_expr(v.shape[-2]).free_symbols:
                        fixed.append(int(v.shape[-2]))
    found = bool(seq) or bool(fixed)
    out = SymbolMap(how="the query/key lengths of the attention nodes" if seq else
                    f"the attention length is fixed at {max(fixed)} tokens: FLOPs per token are per call "
                    f"/ {max(fixed)}" if fixed else
                    "no attention node: the inputs' dim 0 is the batch, their other dynamic dims N",
                    tokens=None if seq or not fixed else max(fixed))
    for i, p in enumerate(_placeholders(gm)):
        v = _val(p)
        if not isinstance(v, torch.Tensor):
            continue
        for d, size in enumerate(v.shape):
            s = as_expr(size).free_symbols
            if not s:
                continue
            if s & seq or (not found and d > 0):
                out.seq.append((i, d))
            elif s & batch or d == 0:
                out.batch.append((i, d))
    return out


@dataclass
class GraphCost:
    """FLOPs of one call of a graph: `total` at batch `batch` and length N; `by_node` per node (name →
    expression); `unknown` {op name: [node names]} of the ops no rule covers (counted 0 there);
    `fixed` {symbol: example size} of the dynamic sizes that are neither batch nor sequence."""
    total: sympy.Expr
    by_node: dict
    unknown: dict
    symbols: SymbolMap
    batch: int = 1
    fixed: dict = field(default_factory=dict)

    @property
    def per_token(self) -> sympy.Expr:
        return sympy.expand(self.total / (self.symbols.tokens or N))

    def at(self, n: int) -> float:
        """FLOPs of one call at length n."""
        return float(self.total.subs(N, n))


def _to_plain(expr: sympy.Expr) -> sympy.Expr:
    """torch's sympy functions (FloorDiv, CeilDiv, Mod, ...) as plain sympy (floor, ceiling, Min, ...),
    so that the expression prints as text `rewriter.artifact.parse_flops` reads back."""
    if not isinstance(expr, sympy.Basic):
        return sympy.sympify(expr)

    def conv(e):
        if not e.args:
            return e
        args = [conv(a) for a in e.args]
        fn = _FUNCTIONS.get(type(e).__name__)
        return fn(*args) if fn is not None else e.func(*args)
    return conv(expr)


class _Counter(TorchDispatchMode):
    """Counts every op call that reaches the dispatcher: `sink(op name, FLOPs or None)` per call."""

    def __init__(self, sink):
        super().__init__()
        self.sink, self.paused = sink, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except RuntimeError:
            # a few aten kernels take concrete sizes only (constant_pad_nd with a symbolic pad):
            # run their decomposition instead (its ops are not counted again: data movement)
            from torch._decomp import decomposition_table
            decomp = decomposition_table.get(func)
            if decomp is None:
                raise
            out = decomp(*args, **kwargs)
        if not self.paused:
            self.sink(_name(func), op_flops(func, args, kwargs, out))
        return out


def op_flops(func, args, kwargs, out) -> sympy.Expr | None:
    """FLOPs of one op call: our ops' formulas (kernels/<op>/flops.py), else the aten rules."""
    from rewriter.kernels.flops import formula
    f = formula(func)
    if f is not None:
        return as_expr(f(*_shapes(args), **_shapes(kwargs)))
    return aten_flops(func, args, kwargs, out)


def _describe(x):
    """A hashable description of a call argument (tensors by dtype, shape and strides), or raise."""
    if isinstance(x, torch.Tensor):
        return ("T", x.dtype, x.device.type, tuple(as_expr(d) for d in x.shape),
                tuple(as_expr(d) for d in x.stride()))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__,) + tuple(_describe(a) for a in x)
    if isinstance(x, dict):
        return ("dict",) + tuple((k, _describe(v)) for k, v in sorted(x.items()))
    if isinstance(x, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("S", as_expr(x))
    hash(x)
    return x


class _FakeRun(fx.Interpreter):
    """Runs `gm` on fake tensors under the counting mode; `calls[node name]` gets the (op, FLOPs)
    of every op call the node made. A call is run once per distinct (target, argument description):
    every layer's identical call reuses the first one's output and counts (symbolic fake runs are
    slow, a run-time routing function's above all)."""

    def __init__(self, gm, fake_mode):
        super().__init__(gm)
        self.fake_mode, self.node, self.params, self.cache = fake_mode, None, {}, {}
        self.calls: dict[str, list] = {}
        self.counter = _Counter(self.sink)

    def sink(self, name, flops):
        self.calls.setdefault(self.node.name if self.node is not None else "?", []).append((name, flops))

    def run_node(self, n):
        self.node = n
        return super().run_node(n)

    def get_attr(self, target, args, kwargs):
        t = super().get_attr(target, args, kwargs)
        if isinstance(t, torch.Tensor) and not isinstance(t, torch._subclasses.FakeTensor):
            if target not in self.params:
                with torch._subclasses.fake_tensor.unset_fake_temporarily():
                    self.params[target] = self.fake_mode.from_tensor(t, static_shapes=True)
            return self.params[target]
        return t

    def call_function(self, target, args, kwargs):
        if target is aten.scaled_dot_product_attention.default:     # counted whole, as one attention
            self.counter.paused = True
            try:
                out = super().call_function(target, args, kwargs)
            finally:
                self.counter.paused = False
            causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
            self.sink("scaled_dot_product_attention", sdpa_flops(
                *(_shapes(a) for a in args[:3]), is_causal=bool(causal) and not _has_mask(args, kwargs)))
            return out
        if getattr(target, "__module__", "") == "_operator" or (
                isinstance(target, torch._ops.OpOverload) and target._schema.is_mutable):
            return super().call_function(target, args, kwargs)
        try:
            key = (target, _describe(args), _describe(kwargs))
        except TypeError:
            key = None
        if key is not None and key in self.cache:
            out, calls = self.cache[key]
            self.calls.setdefault(self.node.name, []).extend(calls)
            return out
        before = len(self.calls.get(self.node.name, []))
        out = super().call_function(target, args, kwargs)
        if key is not None:
            self.cache[key] = (out, list(self.calls.get(self.node.name, [])[before:]))
        return out


@contextlib.contextmanager
def _quiet(logger: str):
    """Fake tensors log (at ERROR, with a traceback) every op whose meta kernel wants concrete
    sizes before raising; `_Counter` catches those and runs the op's decomposition, so the log
    would only alarm the user. Errors that are not handled still raise."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)


def _has_mask(args, kwargs) -> bool:
    m = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    return m is not None


def _upper(d) -> int | None:
    """The largest value torch.export allows the SymInt `d` (its shape env's range), or None."""
    try:
        up = d.node.shape_env.var_to_range[d.node.expr].upper
        return int(up) if up.is_finite else None
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _fresh_inputs(vals: list, hints: dict):
    """The graph's example inputs as fake tensors of a private shape env: one new symbol per symbol
    of the export's, no range, so that running the graph can neither add guards to the export's
    shape env nor simplify with its bounds. Each symbol's hint (the size Python code that branches
    on a size sees) is `hints[symbol]`, else its example size. Returns (mode, inputs)."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
    env = ShapeEnv()
    mode = FakeTensorMode(shape_env=env, allow_non_fake_inputs=True)
    new: dict = {}

    def size(d):
        e = as_expr(d)
        if not e.free_symbols:
            return int(e)
        if not isinstance(e, sympy.Symbol):
            raise ValueError(f"graph_flops: an input size {e} is an expression, not a symbol")
        if e not in new:
            hint = hints.get(e, d.node.hint if d.node.hint is not None else 2)
            sym = env.create_symbol(int(hint), ConstantSource(f"cost_{e}"), dynamic_dim=DimDynamic.DYNAMIC,
                                    do_not_specialize_zero_one=True)
            new[e] = env.create_symintnode(sym, hint=int(hint))
        return new[e]

    out = []
    with mode:
        for v in vals:
            if isinstance(v, torch.Tensor):
                x = torch.empty([size(d) for d in v.shape], dtype=v.dtype, device=v.device)
                out.append(x)
            else:
                out.append(v)
    return mode, out


def graph_flops(gm: fx.GraphModule, *, symbols: SymbolMap | None = None, batch: int = 1,
                hint: int = 2048) -> GraphCost:
    """The FLOPs of one call of `gm` (torch.export graph, rewritten or not) as a sympy expression in N,
    at batch `batch`; `symbols` (default: found on `gm`, `find_symbols`) says which input dims are
    the sequence and the batch: pass the original graph's map for a rewritten one.

    Code that branches on a size in Python (a run-time routing function's min(blocks, budget))
    is counted along the branch it takes at N = `hint` (capped at the longest length the graph
    takes): the expression is exact in the regime of long sequences, where cost matters."""
    symbols = symbols or find_symbols(gm)
    vals = [_val(p) for p in _placeholders(gm)]
    if not any(isinstance(v, torch.Tensor) for v in vals):
        raise ValueError("graph_flops: the graph's inputs carry no fake tensors (meta['val']); "
                         "trace it with rewriter.trace")
    seq0, batch0 = symbols.symbols(vals)
    caps = [_upper(d) for v in vals if isinstance(v, torch.Tensor) for d in v.shape
            if isinstance(d, torch.SymInt) and as_expr(d).free_symbols & seq0]
    n_hint = min([hint] + [c for c in caps if c is not None])
    fake_mode, vals = _fresh_inputs(vals, {s: n_hint for s in seq0} | {s: 2 for s in batch0 - seq0})
    run = _FakeRun(gm, fake_mode)
    with fake_mode, run.counter, _quiet("torch._subclasses.fake_tensor"):
        run.run(*vals)
    by_node: dict[str, list] = {}
    unknown: dict[str, list[str]] = {}
    for node, calls in run.calls.items():
        for name, flops in calls:
            if flops is None:
                unknown.setdefault(name, []).append(node) if node not in unknown.get(name, []) else None
            else:
                by_node.setdefault(node, []).append(flops)
    seq, bsyms = symbols.symbols(vals)
    sub = {s: N for s in seq} | {s: sympy.Integer(batch) for s in bsyms - seq}
    exprs = {k: sympy.Add(*v) for k, v in by_node.items()}
    free = set().union(*(e.free_symbols for e in exprs.values())) if exprs else set()
    fixed = {}
    for s in free - set(sub) - {N}:
        hint = fake_mode.shape_env.var_to_val.get(s)
        fixed[str(s)] = int(hint) if hint is not None else 1
        sub[s] = sympy.Integer(fixed[str(s)])
    by_node = {k: _to_plain(sympy.expand(e.xreplace(sub))) for k, e in exprs.items()}
    total = sympy.expand(_to_plain(sympy.Add(*by_node.values())))
    return GraphCost(total, by_node, unknown, symbols, batch, fixed)


def predicted(before: GraphCost, after: GraphCost, n: int) -> float | None:
    """FLOPs before / after at length n (None when the rewritten graph counts 0)."""
    a = after.at(n)
    return round(before.at(n) / a, 4) if a > 0 and math.isfinite(a) else None


def seq_inputs(gm: fx.GraphModule, symbols: SymbolMap) -> dict[str, list[int]]:
    """{input name: its sequence dims} (the graph's placeholders are named after the inputs)."""
    phs = _placeholders(gm)
    out: dict[str, list[int]] = {}
    for i, d in symbols.seq:
        if i < len(phs):
            out.setdefault(str(phs[i].target), []).append(d)
    return out


def batch_inputs(gm: fx.GraphModule, symbols: SymbolMap) -> set[str]:
    """The names of the inputs whose dim 0 is the batch."""
    phs = _placeholders(gm)
    return {str(phs[i].target) for i, d in symbols.batch if d == 0 and i < len(phs)}


def seq_limit(gm: fx.GraphModule, symbols: SymbolMap) -> int | None:
    """The longest sequence the graph takes (torch.export's bound on the sequence dims), or None."""
    phs = _placeholders(gm)
    ups = [_upper(_val(phs[i]).shape[d]) for i, d in symbols.seq
           if i < len(phs) and isinstance(_val(phs[i]), torch.Tensor)]
    ups = [u for u in ups if u is not None]
    return min(ups) if ups else None


class ModelCost:
    """Whole-model FLOPs of the original and the rewritten graph, and what the report derives from
    them: FLOPs per token, the predicted speed-up (FLOPs before / after) at the lengths the report
    times (`lengths`: the recipe's `seq_len` × report.SWEEP_FACTORS up to the position limit and the
    FLOP cap, `report.sweep_lengths`), and the inputs for timing at those lengths."""

    def __init__(self, before: GraphCost, after: GraphCost, seq_len: int | None, limit: int | None,
                 inputs: dict[str, list[int]]):
        from .report import sweep_lengths
        self.before, self.after, self.limit, self.inputs = before, after, limit, inputs
        # no sequence dim among the inputs (a fixed-size image model): no lengths to vary
        self.lengths = sweep_lengths(seq_len, limit, cost=before.at) if seq_len and inputs else []
        self.predicted = {n: predicted(before, after, n) for n in self.lengths}

    @property
    def per_token(self) -> dict:
        return {"before": self.before.per_token, "after": self.after.per_token}

    @property
    def info(self) -> dict:
        out = {"symbols": self.before.symbols.how, "batch": self.before.batch,
               "position_limit": self.limit}
        unknown = {k: sorted(c.unknown) for k, c in (("before", self.before), ("after", self.after))
                   if c.unknown}
        if unknown:
            out["unknown_ops"] = unknown
            out["unknown_nodes"] = {k: c.unknown for k, c in (("before", self.before), ("after", self.after))
                                    if c.unknown}
        if self.before.fixed or self.after.fixed:
            out["fixed_sizes"] = self.before.fixed | self.after.fixed
        return out

    def predict(self, n: int) -> float | None:
        return predicted(self.before, self.after, n)

    def stretch(self, batch: dict, n: int) -> dict:
        from .report import stretch
        return stretch(batch, n, self.inputs)

    def sweep(self) -> dict:
        """Keyword arguments of report.latency for timing across `lengths`."""
        return {"lengths": self.lengths, "stretch": self.stretch,
                "predict": self.predict}


def model_cost(before, after_gm: fx.GraphModule, *, seq_len: int | None = None,
               limit: int | None = None) -> ModelCost:
    """ModelCost of a run: `before` is the original traced graph or its GraphCost (`graph_flops`,
    taken before the rewrites), `after_gm` the rewritten graph; `limit`: the model's position limit
    (None: torch.export's bound, if any). The original's symbol map applies to the rewritten graph."""
    before = before if isinstance(before, GraphCost) else graph_flops(before)
    symbols = before.symbols
    bound = seq_limit(after_gm, symbols)
    limit = min(x for x in (limit, bound) if x is not None) if (limit or bound) else None
    hint = min(x for x in (16 * (seq_len or 128), limit, 2048) if x is not None)
    after = graph_flops(after_gm, symbols=symbols, batch=before.batch, hint=hint)
    return ModelCost(before, after, seq_len, limit, seq_inputs(after_gm, symbols))


class _NoCost(ModelCost):
    """What the report gets when the whole-model count failed: no FLOPs, the reason in `info`."""

    def __init__(self, reason: str):
        self.before = self.after = None
        self.limit, self.inputs, self.lengths, self.predicted, self.reason = None, {}, [], {}, reason

    @property
    def per_token(self) -> dict:
        return {}

    @property
    def info(self) -> dict:
        return {"error": self.reason}

    def predict(self, n: int) -> None:
        return None


def report_cost(before, after_gm: fx.GraphModule, **kw) -> ModelCost:
    """model_cost for the report: a failure of the count (a graph the fake run cannot execute)
    never fails optimize; the report's cost.error says what happened."""
    try:
        return model_cost(before() if callable(before) else before, after_gm, **kw)
    except Exception as e:  # noqa: BLE001 (any failure of the count: report it, keep the result)
        first = str(e).splitlines()[0][:300] if str(e) else ""
        return _NoCost(f"the whole-model FLOP count failed: {type(e).__name__}: {first}")
