"""Analyze: one AttentionSite per canonical aten.scaled_dot_product_attention node.

Read-only. For each SDPA node (graph order) the analyzer walks the traced graph:

* back from q/k/v through layout ops (view/reshape/transpose/permute/expand/slice/split/getitem/
  casts), RoPE arithmetic (Su et al., "RoFormer", arXiv:2104.09864: x·cos + rotate_half(x)·sin,
  rotate_half = cat(−x₂, x₁)) and GQA head repetition (Ainslie et al., "GQA", arXiv:2305.13245;
  HF `repeat_kv` = unsqueeze + expand + reshape) to the projection: aten.linear, aten.addmm
  (GPT-2 Conv1D, weight [in, out]) or aten.mm/matmul with a weight attribute;
* forward from the SDPA output through the head merge to the output projection, then through
  whatever is computed from the attention alone (dropout, layer scale, a norm of the branch as in
  Gemma 2/3 and OLMo-2, Swin's window reverse and roll back; Liu et al., arXiv:2103.14030) to the
  residual add whose other operand is the stream the q/k/v projections read — directly (post-norm),
  through a norm (pre-norm; Xiong et al., "On Layer Normalization in the Transformer Architecture",
  arXiv:2002.04745; norms: `rewriter.norms`) or through per-token rearrangements (view, pad, roll,
  window partition). A parallel block (GPT-J, Falcon: x + Attn(n(x)) + MLP(n(x))) first merges the
  attention with a branch computed from the same stream; `site.extra["residual"]` says which form
  (sequential / parallel), where the attention merges (the add a drop cuts) and the branch norm;
* up the attention mask's ancestors to decide its kind (`rewriter.masks`);
* and the site's `layer`: the position of its transformer block among all the model's blocks,
  from the graph's module stack (see "layers" below).

A field that cannot be determined is None (projections, residual) and the reason is written to
``site.extra["notes"]``; unusual graphs never raise.

Before (what a site describes, pre-norm decoder)::

    x ─ norm ─┬─ q_proj ─ view ─ transpose ─ RoPE ───────────────┐
              ├─ k_proj ─ view ─ transpose ─ RoPE ─ repeat_kv ─ sdpa(q, k, v, mask) ─ transpose ─ reshape ─ o_proj ─ add(x, ·)
              └─ v_proj ─ view ─ transpose ─────── repeat_kv ─┘                                                       ↑
    x ────────────────────────────────────────────────────────────────────────────────────────────────────────────────┘
"""
from __future__ import annotations

import math
import operator
import re
from collections.abc import Collection
from dataclasses import dataclass

import torch
import torch.fx as fx

from .graph import SDPA, arg, data_inputs, is_data, is_op, module_path, module_pattern, sdpa_args, size_hint, \
    value
from .masks import mask_kind
from .norms import QK_NORM, RESHAPES, VALUE_CASTS, first_user, norm_input, norm_kind, norm_output_after, \
    same_value, strip, strip_cast
from .site import AttentionSite

__all__ = ["analyze", "norm_kind", "norm_input", "norm_output_after"]

aten = torch.ops.aten

_LAYOUT = RESHAPES | {aten.transpose, aten.permute, aten.t, aten.expand, aten.expand_as, aten.repeat,
                      aten.repeat_interleave, aten.slice, aten.select, aten.narrow, aten.split,
                      aten.split_with_sizes, aten.chunk, aten.unbind, aten.tensor_split}
_ROPE_ARITH = {aten.mul, aten.add, aten.sub, aten.neg, aten.cat, aten.stack, aten.view_as_complex,
               aten.view_as_real, aten.div}
# q/k normalization (QK-norm, e.g. OLMo / Qwen3) sits between projection and SDPA
_WALK_BACK = VALUE_CASTS | _LAYOUT | _ROPE_ARITH | QK_NORM | {aten.dropout, operator.getitem, aten.index}
_WALK_TO_OPROJ = VALUE_CASTS | _LAYOUT | {operator.getitem}
_WEIGHT_WRAPPERS = VALUE_CASTS | {aten.t, aten.transpose, aten.permute, aten.numpy_T, aten.mT}
# what the residual stream may pass through on its way to the projections (Swin: view, pad, roll, window
# partition); norms are looked through separately
_STREAM_OPS = VALUE_CASTS | _LAYOUT | {aten.roll, aten.pad, aten.constant_pad_nd, aten.dropout,
                                     operator.getitem}

_MAX_WALK = 400        # nodes visited per walk: a transformer block is far smaller; stops runaway walks
_MAX_PARALLEL_ADDS = 3  # parallel blocks (GPT-J: x + attn(ln x) + mlp(ln x)) add branches before x


def analyze(gm: fx.GraphModule, mask_inputs: Collection[str] = ()) -> list[AttentionSite]:
    """One AttentionSite per aten.scaled_dot_product_attention node of `gm`, in graph order.
    `mask_inputs`: the names of the graph's input placeholders that are attention masks (a mask
    built from one is a padding mask). The graph is not modified."""
    sites: list[AttentionSite] = []
    mask_cache: dict = {}
    order = _Order(gm)
    sdpas = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]
    layers = _layers(gm, sdpas)
    for n in sdpas:
        try:
            sites.append(_site(gm, n, len(sites), mask_cache, mask_inputs, order, layers.get(n)))
        except Exception as e:  # an unforeseen graph shape must not stop inspect/optimize
            sites.append(_bare_site(n, len(sites), e, layers.get(n)))
    return sites


# ---- layers --------------------------------------------------------------------------------------
#
# A site's `layer` is the position of its transformer block among all the model's blocks: what
# `layers:` in a recipe selects, what MASA groups and sorts by and what the report prints. A block is
# an item of a list of modules of one type repeated along the model, found from the SDPA node's
# nn_module_stack, never from names: the deepest numbered level of its module path whose items
# (across the model's sites) are of one class and take more than one index. So Swin's
# `encoder.layers.0.blocks.1` is a block (its stages hold lists of SwinLayer; Liu et al.,
# arXiv:2103.14030), T5's `decoder.block.0` is one too while its `layer.0` / `layer.1` (self- and
# cross-attention sublayers, different classes) are not, and a decoder block's self- and
# cross-attention share its layer. Blocks are numbered over the whole model: within a stack by their
# indices (outer level first: Swin stage, then block), the stacks in the order the graph runs them
# (an encoder-decoder's decoder blocks follow its encoder's: BART 2+2, decoder.layers.0 is layer 2),
# counting the blocks the graph's parameters name even when they hold no site, so that in a one-stack
# model layer i is always the module `...layers.i`.


def _numbered(sdpa: fx.Node) -> list[tuple[str, str, int]]:
    """(module path, module class, index) of each nn_module_stack entry whose path ends in a number,
    outermost first; from the module path alone (class unknown) when the stack is missing."""
    stack = sdpa.meta.get("nn_module_stack") or {}
    entries = [(str(v[0]), str(getattr(v[1], "__qualname__", v[1])) if len(v) > 1 else "")
               if isinstance(v, (tuple, list)) else (str(v), "") for v in stack.values()]
    path = module_path(sdpa)
    known = {p for p, _ in entries}
    parts = path.split(".") if path else []
    for i in range(len(parts)):               # levels the stack skips (or no stack): class unknown
        prefix = ".".join(parts[:i + 1])
        if prefix not in known:
            entries.append((prefix, ""))
    out = {p: (p, c, int(p.rsplit(".", 1)[-1])) for p, c in entries
           if (path == p or path.startswith(p + ".")) and re.fullmatch(r"\d+", p.rsplit(".", 1)[-1])}
    return sorted(out.values(), key=lambda e: e[0].count("."))


def _layers(gm: fx.GraphModule, sdpas: list[fx.Node]) -> dict[fx.Node, int]:
    """The layer of each SDPA node that sits in a numbered module (see above)."""
    levels = {n: _numbered(n) for n in sdpas}
    seen: dict[str, tuple[set, set]] = {}          # pattern -> (indices, classes)
    for entries in levels.values():
        for path, cls, idx in entries:
            idxs, classes = seen.setdefault(module_pattern(path), (set(), set()))
            idxs.add(idx)
            classes.add(cls)
    repeated = {p for p, (idxs, classes) in seen.items() if len(idxs) > 1 and len(classes - {""}) <= 1}
    block: dict[fx.Node, str] = {}
    for n, entries in levels.items():
        if entries:
            rep = [path for path, _, _ in entries if module_pattern(path) in repeated]
            block[n] = rep[-1] if rep else entries[0][0]     # none repeats (one layer): the outermost
    if not block:
        return {}
    # every block of each site's list, also those that hold no site, from the graph's parameter names
    names = [k for k, _ in gm.named_parameters(remove_duplicate=False)] + \
        [k for k, _ in gm.named_buffers(remove_duplicate=False)] + \
        [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    patterns = {module_pattern(b) for b in block.values()}
    blocks = set(block.values())
    for name in names:
        parts = name.split(".")
        for pat in patterns:
            k = pat.count(".") + 1
            if len(parts) > k and module_pattern(".".join(parts[:k])) == pat:
                blocks.add(".".join(parts[:k]))
    # stacks (a block's list, e.g. "decoder.layers.*", "encoder.layers.*.blocks.*") in graph order
    first: dict[str, int] = {}
    for i, n in enumerate(sdpas):
        if n in block:
            first.setdefault(module_pattern(block[n]), i)
    key = lambda b: (first.get(module_pattern(b), len(sdpas)), module_pattern(b),   # noqa: E731
                     tuple(int(p) for p in b.split(".") if re.fullmatch(r"\d+", p)))
    number = {b: i for i, b in enumerate(sorted(blocks, key=key))}
    return {n: number[b] for n, b in block.items()}


def _four(v) -> bool:
    return isinstance(v, torch.Tensor) and v.dim() == 4


def _shapes(a: dict) -> tuple[int | None, int | None, int | None]:
    """(heads, kv heads, head_dim) as the SDPA node's q and k say, where they are [B, H, T, D]."""
    qv, kv = value(a["query"]), value(a["key"])
    return (size_hint(qv.shape[1]) if _four(qv) else None, size_hint(kv.shape[1]) if _four(kv) else None,
            size_hint(qv.shape[-1]) if isinstance(qv, torch.Tensor) else None)


def _scale(a: dict, head_dim: int | None) -> float:
    s = a["scale"]
    return float(s) if isinstance(s, (int, float)) else (1.0 / math.sqrt(head_dim) if head_dim else float("nan"))


def _bare_site(sdpa: fx.Node, index: int, error: Exception, layer: int | None = None) -> AttentionSite:
    """What is certain about an SDPA node whose analysis failed: shapes, scale; mask "arbitrary"
    so that no rule relies on it."""
    a = sdpa_args(sdpa)
    heads, kv_heads, head_dim = _shapes(a)
    module = module_path(sdpa)
    return AttentionSite(
        index=index, node=sdpa.name, module=module, layer=layer, heads=heads or 0,
        kv_heads=kv_heads or 0, head_dim=head_dim or 0, scale=_scale(a, head_dim or 0), mask="arbitrary",
        extra={"notes": [f"analysis of {sdpa.name} failed ({type(error).__name__}: {error}); "
                         "only its shapes are reported"], "proj_input": None, "gqa_repeat": False})


def _site(gm: fx.GraphModule, sdpa: fx.Node, index: int, mask_cache: dict,
          mask_inputs: Collection[str] = (), order: "_Order | None" = None,
          layer: int | None = None) -> AttentionSite:
    order = order or _Order(gm)
    notes: list[str] = []
    a = sdpa_args(sdpa)
    module = module_path(sdpa)
    if not sdpa.meta.get("nn_module_stack"):
        notes.append("the SDPA node has no nn_module_stack; module path unknown")

    q_proj, q_path = _projection_of(a["query"], "q", module, notes)
    k_proj, k_path = _projection_of(a["key"], "k", module, notes)
    v_proj, _ = _projection_of(a["value"], "v", module, notes)
    fused = q_proj is not None and q_proj is k_proj is v_proj
    if not fused and k_proj is not None and k_proj is v_proj:
        notes.append("k and v come from one fused kv projection")
    heads, kv_heads, gqa_repeat = _heads(a, q_proj, k_proj, fused, notes,
                                         fused_kv=k_proj is not None and k_proj is v_proj and not fused)
    head_dim = _shapes(a)[2]
    if heads is None or kv_heads is None or head_dim is None:
        notes.append("q/k shapes are unknown (no meta['val']); heads/head_dim reported as 0")
    if not isinstance(a["scale"], (int, float)) and a["scale"] is not None:
        notes.append("the SDPA scale is not a constant; reporting the default 1/sqrt(head_dim)")
    positional = "rope" if _has_rope(q_path) else None
    if positional != ("rope" if _has_rope(k_path) else None):
        notes.append("q and k disagree on the rotary embedding; reported from q")

    o_proj = first_user(sdpa, lambda u, m: _projection(u) is not None and _projection(u)[0] is m, _WALK_TO_OPROJ,
                        limit=_MAX_WALK)
    if o_proj is None:
        notes.append("no output projection (linear/addmm/matmul with a weight) follows the SDPA output")
    # the query side reads the residual stream (cross-attention: k/v read the encoder's output)
    x_in = next((_projection(p)[0] for p in (q_proj, k_proj) if p is not None), None)
    stream, pre_at = _stream(x_in) if x_in is not None else ([], None)
    pre = strip_cast(stream[pre_at]) if pre_at is not None else None
    start = o_proj if o_proj is not None else sdpa
    found = _find_residual(start, sdpa, stream, order, notes) if stream else None
    residual_add = branch = res_in = norm_node = None
    norm, residual = "none", {}
    if found is not None:
        residual_add, branch, res_in = found.add, found.branch, found.stream
        at = next(i for i, v in enumerate(stream) if same_value(res_in, v))
        if pre is not None and at > pre_at:          # a norm between the stream and the projections
            norm, norm_node = "pre", pre
        elif (post := norm_output_after(residual_add)) is not None:
            norm, norm_node = "post", post
        inner = strip_cast(found.merge_branch)     # a norm of the branch (Gemma 2/3, OLMo-2: "sandwich")
        branch_norm = norm_kind(inner) is not None and order.depends(norm_input(inner), [sdpa])
        sequential = found.merge is found.add and found.merge_other is res_in
        residual = {"form": "sequential" if sequential else "parallel", "merge": found.merge.name,
                    "merge_branch": found.merge_branch.name, "merge_other": found.merge_other.name,
                    "branch_norm": inner.name if branch_norm else None}
    else:
        notes.append("no residual add whose other operand is the attention's input stream was found "
                     f"after {'the output projection' if o_proj is not None else 'the SDPA output'}")
        if pre is not None:
            norm, norm_node = "pre", pre
            notes.append("pre-norm reported from the projection input alone (no residual add found)")

    mask = mask_kind(gm, sdpa, value(a["query"]), value(a["key"]), notes, mask_cache, mask_inputs)
    name = lambda n: n.name if n is not None else None  # noqa: E731
    weight = lambda p, what: _weight_name(p, what, notes)  # noqa: E731
    return AttentionSite(
        index=index, node=sdpa.name, module=module, layer=layer, heads=heads or 0,
        kv_heads=kv_heads or 0, head_dim=head_dim or 0, scale=_scale(a, head_dim), mask=mask,
        positional=positional, q_proj=name(q_proj), k_proj=name(k_proj), v_proj=name(v_proj),
        o_proj=name(o_proj), q_weight=weight(q_proj, "q"), k_weight=weight(k_proj, "k"),
        v_weight=weight(v_proj, "v"), o_weight=weight(o_proj, "output"), fused_qkv=fused,
        residual_add=name(residual_add), residual_input=name(res_in),
        norm=norm, norm_node=name(norm_node), branch_output=name(branch),
        extra={"notes": notes, "proj_input": name(x_in), "gqa_repeat": gqa_repeat, "residual": residual},
    )


# ---- projections and heads -----------------------------------------------------------------------

_WEIGHT_SLICES = {aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split, aten.unbind}


def _weight_attr(w) -> tuple[fx.Node | None, bool]:
    """(the get_attr a weight operand reads, whether the operand is a row slice of it): through
    transposes and casts, and through a split of a packed weight along its rows (dim 0), as
    nn.MultiheadAttention splits its `in_proj_weight` into q, k, v (SigLIP's pooling head)."""
    sliced = False
    while isinstance(w, fx.Node):
        if is_op(w, _WEIGHT_WRAPPERS) and w.args:
            w = w.args[0]
        elif w.op == "call_function" and w.target is operator.getitem and is_op(w.args[0], _WEIGHT_SLICES) \
                and arg(w.args[0], 2, "dim", 0) == 0:
            w, sliced = w.args[0].args[0], True
        elif is_op(w, aten.slice, aten.narrow) and arg(w, 1, "dim", 0) == 0:
            w, sliced = w.args[0], True
        else:
            break
    return (w, sliced) if isinstance(w, fx.Node) and w.op == "get_attr" else (None, sliced)


def _projection(n) -> tuple[fx.Node, fx.Node] | None:
    """(data input, weight get_attr) if `n` is a linear / addmm / mm / matmul with a 2-D weight
    attribute (or rows of one: see `_weight_attr`)."""
    if not is_op(n, aten.linear, aten.addmm, aten.mm, aten.matmul):
        return None
    i = 1 if is_op(n, aten.addmm) else 0          # addmm(bias, x, w)
    if len(n.args) < i + 2:
        return None
    x, (w, _) = n.args[i], _weight_attr(n.args[i + 1])
    if w is None or not isinstance(x, fx.Node):
        return None
    wv = value(w)
    return None if isinstance(wv, torch.Tensor) and wv.dim() != 2 else (x, w)


def _weight_name(proj: fx.Node | None, what: str, notes: list[str]) -> str | None:
    """The qualified name of a projection's weight; None (with a note) where it uses only rows of a
    packed weight, which a rule rewriting that weight by name would get wrong."""
    if proj is None:
        return None
    w, sliced = _weight_attr(proj.args[2 if is_op(proj, aten.addmm) else 1])
    if sliced:
        note = (f"a projection uses rows of the packed weight {w.target} (e.g. nn.MultiheadAttention's "
                "in_proj_weight); its weight name is not reported")
        if note not in notes:
            notes.append(note)
        return None
    return w.target


def _projection_of(start: fx.Node, what: str, module: str, notes: list[str]) -> tuple[fx.Node | None, set]:
    """The projection `start` (q, k or v) derives from, through layout / RoPE / repeat_kv ops, and
    every node visited on the way. Several: the one whose module path is nearest the attention's."""
    found: list[fx.Node] = []
    seen: set[fx.Node] = set()
    stack = [start]
    while stack and len(seen) < _MAX_WALK:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if _projection(n) is not None:
            if n not in found:
                found.append(n)
        elif is_op(n, _WALK_BACK):
            stack.extend(data_inputs(n))
    if not found:
        notes.append(f"no projection (linear/addmm/matmul with a weight) was found behind {what}")
        return None, seen
    best = max(_shared_prefix(module_path(c), module) for c in found)
    near = [c for c in found if _shared_prefix(module_path(c), module) == best]
    if len(found) == 1 or len(near) == 1:
        return near[0], seen
    notes.append(f"{what} derives from several projections ({', '.join(c.name for c in found)}); "
                 "none is reported")
    return None, seen


def _shared_prefix(a: str, b: str) -> int:
    """How many leading components two module paths share."""
    k = 0
    for x, y in zip(a.split("."), b.split(".")):
        if x != y:
            break
        k += 1
    return k


def _out_features(proj: fx.Node) -> int | None:
    v = value(proj)
    return size_hint(v.shape[-1]) if isinstance(v, torch.Tensor) and v.dim() >= 1 else None


def _heads(a: dict, q_proj, k_proj, fused: bool, notes: list[str],
           fused_kv: bool = False) -> tuple[int | None, int | None, bool]:
    """(heads, kv heads, whether SDPA sees K/V repeated to more heads): from the SDPA's q and k,
    the kv heads from the k projection's width (a fused qkv projection is (H + 2·KV)·D wide, a
    fused kv one 2·KV·D)."""
    heads, sdpa_kv, head_dim = _shapes(a)
    kv = value(a["key"])
    if not _four(value(a["query"])):
        out = _out_features(q_proj) if q_proj is not None and not fused else None
        heads = out // head_dim if out and head_dim else None
        notes.append("q is not [B, H, T, D]; heads " + ("from the q projection width" if heads else "unknown"))
    sdpa_kv = sdpa_kv if _four(kv) else heads
    k_dim = size_hint(kv.shape[-1]) if isinstance(kv, torch.Tensor) else head_dim
    kv_heads = sdpa_kv
    width = _out_features(k_proj) if k_proj is not None and k_dim else None
    if fused and width and head_dim and heads:
        rest = width // head_dim - heads
        if width % head_dim == 0 and rest > 0 and rest % 2 == 0:
            kv_heads = rest // 2
    elif width and width % (k_dim * (2 if fused_kv else 1)) == 0:
        kv_heads = width // (k_dim * (2 if fused_kv else 1))
    if kv_heads and heads and (heads % kv_heads or kv_heads > heads):
        notes.append(f"k projection width gives {kv_heads} kv heads, which does not divide {heads} heads; "
                     f"using the SDPA key's {sdpa_kv}")
        kv_heads = sdpa_kv
    return heads, kv_heads, bool(kv_heads and sdpa_kv and kv_heads < sdpa_kv)


# ---- RoPE ----------------------------------------------------------------------------------------

def _has_rope(path: set[fx.Node]) -> bool:
    """rotate_half (cat/stack of −x₂ and x₁, slices of one tensor) whose result is multiplied,
    or a complex rotation (view_as_complex then mul), on the path from projection to SDPA."""
    for n in path:
        if is_op(n, aten.cat, aten.stack) and n.args and isinstance(n.args[0], (list, tuple)):
            negs = [a for a in n.args[0] if isinstance(a, fx.Node) and is_op(a, aten.neg)]
            if any(is_op(strip_cast(a.args[0]), aten.slice, aten.select, aten.narrow, operator.getitem)
                   for a in negs) and _multiplied(n, path):
                return True
        if is_op(n, aten.view_as_complex) and _multiplied(n, path):
            return True
    return False


def _multiplied(n: fx.Node, path: set[fx.Node], depth: int = 4) -> bool:
    """Whether `n` (through a few layout ops) feeds a mul on the path."""
    frontier = [n]
    for _ in range(depth):
        if any(u in path and is_op(u, aten.mul) for m in frontier for u in m.users):
            return True
        frontier = [u for m in frontier for u in m.users if u in path and is_op(u, _LAYOUT | VALUE_CASTS)]
    return False


# ---- residual ------------------------------------------------------------------------------------
#
# A block adds its attention branch F to the stream x it reads: h = x + F(x). Between x and the
# projections there may be a norm and any per-token rearrangement (Swin's view → pad → roll →
# window partition, Liu et al., arXiv:2103.14030); between the output projection and the add there
# may be anything computed from the attention alone (dropout, layer scale, a norm of the branch:
# Gemma 2 / OLMo-2 "sandwich" norms; the window reverse and roll back). In a parallel block
# (GPT-J, Falcon: x + Attn(n(x)) + MLP(n(x))) the attention branch first meets the MLP branch, a
# value also computed from x, at a *merge* add, and only then the stream.


def _stream(x_in: fx.Node) -> tuple[list[fx.Node], int | None]:
    """The values the attention's input is a per-token rearrangement or normalization of, nearest
    first: `x_in` and back through casts, layout ops (view, permute, pad, roll, ...), identity
    dropout and norms; and the position in that list of the first norm met (a pre-norm), or None."""
    chain, pre, n = [], None, x_in
    while isinstance(n, fx.Node) and len(chain) < _MAX_WALK and n not in chain:
        chain.append(n)
        if norm_kind(n) is not None:
            pre = len(chain) - 1 if pre is None else pre
            n = norm_input(n)
        elif is_op(n, _STREAM_OPS) and n.args and isinstance(n.args[0], fx.Node):
            n = n.args[0]
        else:
            break
    return chain, pre


class _Order:
    """Graph positions, to bound dependence walks: a node placed before `n` cannot depend on `n`."""

    def __init__(self, gm: fx.GraphModule):
        self.pos = {n: i for i, n in enumerate(gm.graph.nodes)}

    def depends(self, n: fx.Node, targets: Collection[fx.Node]) -> bool:
        """Whether `n` is computed from one of `targets` (looked through casts and reshapes)."""
        ids = {strip(t) for t in targets} | set(targets)
        low = min(self.pos.get(t, 0) for t in ids)
        stack, seen = [n], set()
        while stack and len(seen) < 4 * _MAX_WALK:
            m = stack.pop()
            if m in seen or self.pos.get(m, -1) < low:
                continue
            if m in ids:
                return True
            seen.add(m)
            stack.extend(m.all_input_nodes)
        return False


@dataclass(frozen=True)
class _Residual:
    add: fx.Node            # the add of the attention branch and the stream x
    branch: fx.Node         # its operand carrying the branch
    stream: fx.Node         # its operand x (for (x + MLP) + F: the summand x of its other operand)
    merge: fx.Node          # where the attention branch meets another value (= add unless parallel)
    merge_branch: fx.Node   # the merge's operand carrying the attention
    merge_other: fx.Node    # the merge's other operand (= stream unless parallel: the other branch)


def _is_add(u: fx.Node, cur: fx.Node) -> bool:
    return is_op(u, aten.add, aten.add_) and len(u.args) >= 2 and cur in u.args[:2] \
        and all(isinstance(a, fx.Node) for a in u.args[:2]) and arg(u, 2, "alpha", 1) == 1


def _summand_in(n, stream: list[fx.Node], depth: int = _MAX_PARALLEL_ADDS) -> fx.Node | None:
    """The operand, among the summands of the sum `n` (nested adds), that is one of the `stream` values."""
    if not (depth and is_op(n, aten.add, aten.add_) and arg(n, 2, "alpha", 1) == 1):
        return None
    for a in n.args[:2]:
        if isinstance(a, fx.Node):
            if any(same_value(a, s) for s in stream):
                return a
            found = _summand_in(a, stream, depth - 1)
            if found is not None:
                return found
    return None


def _find_residual(start: fx.Node, sdpa: fx.Node, stream: list[fx.Node], order: _Order,
                   notes: list[str]) -> _Residual | None:
    """Walking forward (breadth first) from `start` (the output projection, else the SDPA) through
    whatever is computed from the attention: the first add whose other operand is one of the
    `stream` values, or a sum holding one ((x + MLP) + F). Adds met before it whose other operand
    is computed from the stream but not from the attention are merges with parallel branches (the
    first is where a drop cuts); adds of the attention's own values, constants or parameters are
    part of the branch."""
    frontier, seen, merge, passed = [start], {start}, None, 0
    while frontier and len(seen) < _MAX_WALK:
        nxt = []
        for cur in frontier:
            for u in cur.users:
                if u in seen or not is_data(u):
                    continue
                seen.add(u)
                nxt.append(u)
                if not _is_add(u, cur) or u.args[0] is u.args[1]:
                    continue
                other = u.args[1] if u.args[0] is cur else u.args[0]
                if any(same_value(other, s) for s in stream):
                    m = merge or (u, cur, other)
                    return _Residual(u, cur, other, *m)
                if order.depends(other, [sdpa]):
                    continue
                if order.depends(other, stream):
                    inner = _summand_in(other, stream)
                    if inner is not None:     # (x + MLP(n(x))) + F(n(x)): the stream entered one add earlier
                        return _Residual(u, cur, inner, *(merge or (u, cur, other)))
                    if merge is None:
                        merge = (u, cur, other)
                    passed += 1
                if passed > _MAX_PARALLEL_ADDS:
                    notes.append(f"the attention branch meets more than {_MAX_PARALLEL_ADDS} other branches "
                                 "before any add of its input stream; no residual reported")
                    return None
        frontier = nxt
    return None
