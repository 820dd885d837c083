"""Lowering for generation: the rewritten full-sequence graph → prefill and decode-step graphs with
functional per-site state (each site's state is a graph input and a graph output; no buffer is
mutated). Prior art: TensorRT-LLM AutoDeploy's `insert_cached_attention` (a canonical attention op
replaced by a cached one, the caches added as graph inputs), Torch-TensorRT's static-cache pass. We
lower our own canonical graph, where every attention is one node (rewriter.canonicalize).

The graphs are copies of the rewritten graph that share its parameters (`Lowered`):

    prefill(<traced inputs>, position_ids [B, T])  -> (<outputs>, *prefill state)
    decode(<traced inputs>, position_ids [B, 1], cache_position int [1], key_valid bool [B, L], *state)
                                                   -> (<outputs>, *new state)

`<traced inputs>` are the token ids and the attention mask the model was traced with (for a step:
the new token and its validity). `position_ids` replaces the positions the graph builds from
`arange(T)` where they feed the model (RoPE's cos/sin, position embeddings), so a left-padded row
counts its positions from its first real token, as transformers' generate does; a position arange
that is not unsqueezed to [1, T] becomes `cache_position` (the slots, shared by the batch).
`key_valid` marks the cache slots that hold real tokens (False: left padding); it may be None when
every slot is real and every site is a KV cache (`Lowered.kv_only`). The step ops take one token;
batch and cache length follow the tensors given. `prefill_last` is `prefill` computing its per-token
outputs (the logits) at the last token only; `decode_inplace` is `decode` writing the new k/v into
the caches it is given (index_copy_, its cache outputs are its inputs), saving a copy of every cache
per step. generate runs those two, since it needs the last logits and owns the caches.

Lowered by op, whatever rule left the op there:

    aten SDPA (causal mask), rewriter::causal_attention → a KV cache [B, Hkv, L, D] per k and v, at
        kv-heads width (the k/v before repeat_kv), written with index_copy at cache_position and read
        by rewriter::decode_attention (Lean Attention on CUDA, SDPA on CPU). In the prefill a masked
        causal SDPA runs as rewriter::causal_attention (the fused causal kernel without padding).
    any other rewriter:: op or kernels function → the DecodeForm its kernels/ folder declares
        (rewriter.kernels.decode): its state, built from the prompt, and its step op. linear_attention
        (causal): (S [B, H', F, D], z [B, H', F]) and rewriter::linear_attention_step;
        hybrid_window_attention: (S, z) + a ring buffer of the last W keys, values and φ(k), and
        rewriter::hybrid_window_step (LoLCATs, arXiv:2410.10254); block_routed_attention: a KV cache
        (the form's per-token `caches`: padded by `start`, written in place by `decode_inplace`,
        masked by key_valid) + per-block key summaries, routed per step (Quest, arXiv:2406.10774).
        The engine names no op of ours but the canonical attention's.
    a dropped attention (drop_attention / drop_block, LLM-Drop arXiv:2406.15786): no node, no state;
        `SiteState.saved_bytes` says what its KV cache would have held per token.

All are exact but block routing's step (its own selection for the one new token; exact with budgets
that keep every block): prefill + steps reproduce the full-sequence outputs (tests/generation).
Anything else that mixes tokens (k-means routing and agent attention, whose folders say why in their
NO_DECODE; an SDPA whose mask is not causal; an unknown op in front of an output projection) raises
`LoweringError`, one line naming the site and why; no fallback recomputes full attention. MASA is
lowered after `OptimizedModel.materialize()` (generate calls it), so a step reads dense weights
instead of rebuilding them.
"""
from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
import torch.fx as fx

import rewriter.kernels  # noqa: F401  (registers the rewriter:: ops the lowered graphs call)
from rewriter.kernels import decode as D

from . import graph as G
from .masks import mask_kind
from .site import AttentionSite

aten = torch.ops.aten
R = torch.ops.rewriter

# the attention mask argument of the canonical attention ops: (position, keyword)
_MASK_SLOT = {G.SDPA: (3, "attn_mask"), R.causal_attention.default: (3, "attn_mask")}


def _mask_slot(target) -> tuple[int, str] | None:
    """Where `target` takes the mask a node feeding only it is part of: the canonical attention's
    attn_mask, or the key mask of an op with a decode form (rewriter.kernels.decode)."""
    if target in _MASK_SLOT:
        return _MASK_SLOT[target]
    form = D.form_of(target)
    return D.slot(target, form.key_mask) if form is not None else None


_LAYOUT = frozenset({aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute,
                     aten.contiguous, aten.clone, aten.alias, aten.slice, aten.unsqueeze, aten.squeeze,
                     aten.flatten, aten.expand}) | G.CASTS


class LoweringError(ValueError):
    """The rewritten graph cannot be lowered for generation; one line naming the site and why."""


@dataclass(frozen=True)
class SiteState:
    """One attention site's state in the step graphs. `form`: "kv" (KV cache), "dropped" (none), or
    the state kind of the op's decode form (rewriter.kernels.decode: "linear" for (S, z), "hybrid"
    for (S, z) + a window ring buffer). `names`: its state tensors in
    the graphs' order. `saved_bytes`: for a dropped site, the bytes per token per batch row a KV
    cache would have held (k and v at kv-heads width, in the model's dtype)."""
    site: int | None
    module: str
    form: str
    op: str
    names: tuple[str, ...] = ()
    note: str = ""
    saved_bytes: int = 0
    bytes_per_token: int = 0          # its k and v cache bytes per token per batch row (KV and `caches`)
    caches: tuple[str, ...] = ()      # a decode form's per-token state tensors (its `caches`), in `names`


@dataclass
class Lowered:
    """The step graphs of one rewritten decoder (module docstring) and how to drive them."""
    prefill: fx.GraphModule
    prefill_last: fx.GraphModule       # `prefill` whose per-token outputs keep the last token only
    decode: fx.GraphModule
    decode_inplace: fx.GraphModule     # `decode` writing new k/v into the caches it is given (index_copy_)
    inputs: tuple[str, ...]            # the traced inputs, in the graphs' order
    tokens: str                        # which of them holds the token ids
    mask: str | None                   # which holds the attention mask (None: traced without one)
    out_spec: object                   # pytree spec of the model's outputs (None: a flat tuple)
    n_outputs: int                     # leaves of the model's output before the state
    sites: list[SiteState] = field(default_factory=list)

    @property
    def kv_only(self) -> bool:
        """Every site with state is a KV cache: `key_valid=None` is accepted (all slots real)."""
        return all(s.form in ("kv", "dropped") for s in self.sites)

    def compiled_decode(self):
        """`decode_inplace` through torch.compile (inductor), made once per Lowered; it recompiles
        for a new batch or cache length the way torch.compile does (rewriter.generate's docstring)."""
        if self.__dict__.get("_compiled") is None:
            self.__dict__["_compiled"] = torch.compile(self.decode_inplace, dynamic=False)
        return self.__dict__["_compiled"]

    @property
    def state_names(self) -> list[str]:
        return [n for s in self.sites for n in s.names]

    def start(self, prefill_state: list[torch.Tensor], length: int) -> list[torch.Tensor]:
        """The decode state after a prefill of T tokens, for a cache of `length` ≥ T slots: each
        KV site's k, v written into zeros [B, Hkv, length, D] (the CPU decode path needs finite
        hidden slots), as are a decode form's per-token `caches` along their axis 2; linear and
        hybrid states as the prefill built them."""
        out, it = [], iter(prefill_state)
        for s in self.sites:
            for name in s.names:
                x = next(it)
                if s.form == "kv" or name in s.caches:
                    if x.shape[2] > length:
                        raise ValueError(f"a cache of {length} slots cannot hold the {x.shape[2]}-token "
                                         f"prefill")
                    cache = x.new_zeros(*x.shape[:2], length, *x.shape[3:])
                    cache[:, :, :x.shape[2]] = x
                    x = cache
                out.append(x)
        return out

    def summary(self) -> list[dict]:
        """Per site: its form, the op lowered, its state tensors (and a note where k/v are cached at
        the attention's width); for a dropped site, the KV bytes per token it saves."""
        return [{"site": s.site, "module": s.module, "form": s.form, "op": s.op, "state": list(s.names),
                 **({"note": s.note} if s.note else {}),
                 **({"saved_bytes_per_token": s.saved_bytes} if s.form == "dropped" else {})}
                for s in self.sites]


def state_bytes(state: list[torch.Tensor]) -> int:
    """Bytes held by a list of state tensors."""
    return sum(t.numel() * t.element_size() for t in state)


# ---------------------------------------------------------------- what the graph holds

@dataclass
class _Attn:
    node: fx.Node
    form: str                 # kv, or the op's decode form's kind
    site: AttentionSite | None
    k_src: fx.Node | None = None
    v_src: fx.Node | None = None
    note: str = ""
    decode: D.DecodeForm | None = None

    @property
    def state(self) -> tuple[str, ...]:
        return ("k", "v") if self.decode is None else self.decode.state


def _where(n: fx.Node, site: AttentionSite | None) -> str:
    if site is not None:
        return f"site {site.index} ({site.module or n.name})"
    prov = n.meta.get("rewriter") or {}
    return f"node {n.name}" + (f" (rule {prov['rule']}, site {prov.get('site')})" if prov.get("rule") else "")


def _op_name(t) -> str:
    if isinstance(t, torch._ops.OpOverload):
        return f"{t.namespace}::{t._opname}"
    return getattr(t, "__name__", str(t))


def _site_of(n: fx.Node, sites: list[AttentionSite]) -> AttentionSite | None:
    prov = n.meta.get("rewriter") or {}
    if isinstance(prov.get("site"), int):
        return next((s for s in sites if s.index == prov["site"]), None)
    return next((s for s in sites if s.node == n.name), None)


def _kv_source(x: fx.Node, kv_heads: int | None) -> tuple[fx.Node, str]:
    """The k (or v) an attention reads, before any repeat_kv (graph.unrepeat_kv: query head h
    reads kv head h // r, as decode_attention does). Where there is none, `x` itself (cached at its
    own width) and a note why."""
    s = G.shape(x)
    if len(s) != 4 or kv_heads is None or G.size_hint(s[1]) == kv_heads:
        return x, ""
    found = G.unrepeat_kv(x)
    if found and G.size_hint(G.shape(found[0])[1]) == kv_heads:
        return found[0], ""
    return x, f"no repeat_kv pattern found behind {x.name}; cached at {G.size_hint(s[1])} heads"


def _attention_nodes(gm: fx.GraphModule, sites: list[AttentionSite],
                     mask_inputs: Collection[str]) -> list[_Attn]:
    """Every token-mixing op of the graph, in graph order, with its decode form; LoweringError for
    one without."""
    found, cache = [], {}
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        t, site = n.target, _site_of(n, sites)
        name = _op_name(t)
        if t in (G.SDPA, R.causal_attention.default):
            a = G.sdpa_args(n)
            if t is G.SDPA:
                if a["dropout_p"]:
                    raise LoweringError(f"{_where(n, site)}: SDPA has dropout_p={a['dropout_p']}; generation "
                                        f"lowers eval graphs only")
                notes: list[str] = []
                kind = mask_kind(gm, n, G.value(a["query"]), G.value(a["key"]), notes, cache, mask_inputs)
            else:
                kind = site.mask if site is not None else "causal+padding"
            if kind not in ("causal", "causal+padding"):
                why = f" ({notes[-1]})" if t is G.SDPA and notes else ""
                raise LoweringError(f"{_where(n, site)}: its attention mask is {kind!r}, not causal{why}: a "
                                    f"KV cache with one new token per step reproduces causal attention only")
            q, k, v = a["query"], a["key"], a["value"]
            if G.rank(q) != 4 or G.rank(k) != 4 or not G.same_size(G.shape(q)[2], G.shape(k)[2]):
                raise LoweringError(f"{_where(n, site)}: q {list(G.shape(q))} and k {list(G.shape(k))} are "
                                    f"not 4-D self-attention over the same tokens")
            kv_heads = site.kv_heads if site is not None and site.kv_heads else None
            k_src, nk = _kv_source(k, kv_heads)
            v_src, nv = _kv_source(v, kv_heads)
            if G.shape(k_src)[1:2] != G.shape(v_src)[1:2] or (nk == "") != (nv == ""):
                k_src, v_src, nk = k, v, "k and v repeat differently; cached at the attention's width"
            found.append(_Attn(n, "kv", site, k_src, v_src, nk or nv))
        elif (form := D.form_of(t)) is not None:
            why = form.refuse(D.arguments(t, n.args, n.kwargs)) if form.refuse else None
            if why:
                raise LoweringError(f"{_where(n, site)}: {why}")
            found.append(_Attn(n, form.form, site, decode=form))
        elif (why := D.refusal(name.split("::")[-1])) is not None:
            raise LoweringError(f"{_where(n, site)}: {name} has no decode form: {why}")
        elif isinstance(t, torch._ops.OpOverload) and t.namespace == "rewriter":
            raise LoweringError(f"{_where(n, site)}: {name} has no decode form (neither a KV cache nor a "
                                f"DecodeForm in its kernels/ folder)")
    return found


def _check_sites(gm: fx.GraphModule, sites: list[AttentionSite], attn: list[_Attn]) -> list[AttentionSite]:
    """The sites with no attention left (dropped). A site whose output projection still reads
    something that is not one of the lowered ops (an op no table names) raises."""
    lowered = {a.site.index for a in attn if a.site is not None}
    nodes = {a.node for a in attn}
    dropped = []
    for s in sites:
        if s.index in lowered or G.find(gm, s.node) is not None:
            continue
        if s.o_proj is None:
            raise LoweringError(f"site {s.index} ({s.module}): its attention op is gone and its output "
                                f"projection was never found, so whether it was dropped cannot be told")
        o = G.find(gm, s.o_proj)
        if o is None:                   # projections, attention and output projection gone: dropped
            dropped.append(s)
            continue
        src = o.args[1] if G.is_op(o, aten.addmm) else o.args[0]
        while isinstance(src, fx.Node) and G.is_op(src, _LAYOUT) and src not in nodes:
            src = src.args[0]
        what = f"{_op_name(src.target)} (node {src.name})" if isinstance(src, fx.Node) else repr(src)
        raise LoweringError(f"site {s.index} ({s.module}): its attention output comes from {what}, which has "
                            f"no decode form")
    return dropped


def _mask_only(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose values reach only the mask arguments of attention ops (the attention mask's
    subgraph): dead in the decode graph, where decode_attention reads key_valid instead."""
    out: set[fx.Node] = set()
    for n in reversed(list(gm.graph.nodes)):
        if n.op in ("output", "placeholder") or not n.users:
            continue
        ok = True
        for u in n.users:
            if u in out:
                continue
            slot = _mask_slot(u.target)
            if slot is None:
                ok = False
                break
            i, kw = slot
            uses = [j for j, a in enumerate(u.args) if a is n] + [k for k, a in u.kwargs.items() if a is n]
            if uses != [i] and uses != [kw]:
                ok = False
                break
        if ok:
            out.add(n)
    return out


def _positions(gm: fx.GraphModule, T, mask_only: set[fx.Node]) -> tuple[set[fx.Node], set[fx.Node]]:
    """(aranges over the T tokens that feed the model beyond the masks, the [1, T] position tensors
    unsqueezed from them): the first become cache_position in the decode graph, the second the
    position_ids input in both graphs."""
    ar, heads = set(), set()
    for n in gm.graph.nodes:
        if not G.is_op(n, aten.arange) or n in mask_only or G.rank(n) != 1:
            continue
        if not G.same_size(G.shape(n)[0], T):
            continue
        start = 0 if n.target is aten.arange.default else G.arg(n, 0, "start", 0)
        step = G.arg(n, 2, "step", 1) if n.target is aten.arange.start_step else 1
        if start != 0 or step != 1:
            raise LoweringError(f"node {n.name}: positions from arange({start}, T, {step}) are not the "
                                f"0..T−1 the lowering rewires to the cache positions")
        ar.add(n)
        m = n
        while len(m.users) == 1:
            u = next(iter(m.users))
            s = G.shape(u)
            if len(s) == 2 and s[0] == 1 and G.same_size(s[1], T):
                heads.add(u)
                break
            zero = G.is_op(u, aten.add, aten.sub) and len(u.args) == 2 and u.args[0] is m and u.args[1] == 0
            if not (zero or G.is_op(u, G.CASTS | G.COPIES)):
                break
            m = u
    return ar, heads


# ---------------------------------------------------------------- building the step graphs

def lower_for_generation(gm: fx.GraphModule, sites: list[AttentionSite], *,
                         mask_inputs: Collection[str] = ()) -> Lowered:
    """Lower the rewritten decoder `gm` (its attention sites `sites` as analyzed before the rewrites;
    `mask_inputs` the names of its attention-mask inputs) to prefill and decode graphs (module
    docstring). Raises LoweringError naming the site and the reason where that cannot be done."""
    attn = _attention_nodes(gm, sites, mask_inputs)
    dropped = _check_sites(gm, sites, attn)
    if not attn:
        raise LoweringError("the graph has no attention op left to cache; nothing to generate with")
    ph = [n for n in gm.graph.nodes if n.op == "placeholder"]
    masks = [p for p in ph if p.target in mask_inputs or p.name in mask_inputs]
    tokens = [p for p in ph if p not in masks and G.rank(p) == 2 and G.dtype(p) is not None
              and not G.dtype(p).is_floating_point and G.dtype(p) is not torch.bool]
    others = [p.name for p in ph if p not in masks and p not in tokens]
    if len(tokens) != 1 or len(masks) > 1 or others:
        raise LoweringError(f"the traced graph takes {', '.join(p.name for p in ph)}; generation feeds one "
                            f"[B, T] token-id input and at most one attention mask")
    T = G.shape(tokens[0])[1]
    mask_only = _mask_only(gm)
    aranges, heads = _positions(gm, T, mask_only)
    codegen = getattr(gm.graph, "_codegen", None)
    out_spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)

    order: dict[fx.Node, SiteState] = {}
    for a in attn:
        idx = a.site.index if a.site is not None else None
        tag = f"s{idx}" if idx is not None else a.node.name
        per_token = sum(_token_bytes(x) for x in (a.k_src, a.v_src)) if a.form == "kv" else 0
        if a.decode is not None and a.decode.caches:        # per-token caches: their argument's bytes
            args = D.arguments(a.node.target, a.node.args, a.node.kwargs)
            per_token = sum(_token_bytes(args[x]) for x in a.decode.caches.values())
        order[a.node] = SiteState(idx, a.site.module if a.site else a.node.name, a.form,
                                  _op_name(a.node.target), tuple(f"{tag}_{x}" for x in a.state), a.note,
                                  bytes_per_token=per_token,
                                  caches=tuple(f"{tag}_{x}" for x in (a.decode.caches if a.decode else ())))
    states = list(order.values()) + [
        SiteState(s.index, s.module, "dropped", "none",
                  saved_bytes=_kv_bytes(gm, s)) for s in dropped]
    states.sort(key=lambda s: (s.site is None, s.site or 0))
    attn = sorted(attn, key=lambda a: states.index(order[a.node]))      # the state's order: the sites'
    mask = masks[0].name if masks else None
    prefill = _build(gm, attn, order, aranges, heads, mask_only, "prefill", mask)
    prefill_last = _build(gm, attn, order, aranges, heads, mask_only, "prefill", mask, last=True)
    decode = _build(gm, attn, order, aranges, heads, mask_only, "decode", mask)
    inplace = _build(gm, attn, order, aranges, heads, mask_only, "decode", mask, inplace=True)
    return Lowered(prefill, prefill_last, decode, inplace, tuple(p.name for p in ph), tokens[0].name, mask,
                   out_spec, len(_output_args(gm)), states)


def _kv_bytes(gm: fx.GraphModule, s: AttentionSite) -> int:
    """Bytes per token per batch row of site `s`'s KV cache at kv-heads width, in the model's dtype
    (what a dropped site saves; the original's cache in the report)."""
    w = G.find(gm, s.k_proj)
    dt = G.dtype(w) if w is not None else None
    if dt is None and s.k_weight:
        try:
            dt = G.fetch_attr(gm, s.k_weight).dtype
        except AttributeError:
            dt = None
    if dt is None:
        dt = next((p.dtype for p in gm.parameters()), torch.float32)
    return 2 * s.kv_heads * s.head_dim * dt.itemsize


def _token_bytes(x: fx.Node) -> int:
    """Bytes per token per row of a cached [B, H, T, D] k or v."""
    s, dt = G.shape(x), G.dtype(x) or torch.float32
    return G.size_hint(s[1]) * G.size_hint(s[3]) * dt.itemsize


def generation_summary(gm: fx.GraphModule, sites: list[AttentionSite],
                       mask_inputs: Collection[str] = ()) -> dict:
    """The report's `generation` entry for a rewritten decoder: the KV cache bytes per token per row
    of the original (every site at kv-heads width) and of the lowered model (its KV sites at the
    width they are cached at), what the dropped sites save, and how many sites take each form; or
    {"error": why} when the rewritten graph cannot be lowered."""
    try:
        low = lower_for_generation(gm, sites, mask_inputs=mask_inputs)
    except LoweringError as e:
        return {"error": str(e)}
    forms: dict[str, int] = {}
    for s in low.sites:
        forms[s.form] = forms.get(s.form, 0) + 1
    return {"kv_bytes_per_token_before": sum(_kv_bytes(gm, s) for s in sites),
            "kv_bytes_per_token_after": sum(s.bytes_per_token for s in low.sites),
            "saved_bytes_per_token": sum(s.saved_bytes for s in low.sites), "forms": forms}


def _output_args(gm: fx.GraphModule) -> list:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves = out.args[0]
    return list(leaves) if isinstance(leaves, (list, tuple)) else [leaves]


def _build(gm: fx.GraphModule, attn: list[_Attn], order: dict, aranges: set, heads: set, mask_only: set,
           mode: str, mask: str | None, inplace: bool = False, last: bool = False) -> fx.GraphModule:
    """One step graph (`mode` "prefill" or "decode"): a copy of `gm` with its attention ops lowered,
    the position aranges / [1, T] positions rewired, the state inputs and outputs added. `inplace`:
    the KV caches are written in place (their outputs are their inputs), saving a copy of every
    cache per step for a caller that owns them. `last`: output projections that make a per-token
    output ([B, T, V] logits) read the last token only (what generation needs of a prompt)."""
    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    plain: dict[fx.Node, fx.Node] = {}          # the original values, for the mask subgraph
    by_node = {a.node: a for a in attn}

    def call(target, *args, **kwargs):
        return g.call_function(target, args, kwargs)

    for p in (n for n in gm.graph.nodes if n.op == "placeholder"):
        env[p] = g.placeholder(p.name)
        env[p].meta.update(p.meta)
    positions = g.placeholder("position_ids")
    if mode == "decode":
        cache_position = g.placeholder("cache_position")
        key_valid = g.placeholder("key_valid")
    state_in = {s: [g.placeholder(x) for x in s.names] for s in (order[a.node] for a in attn)} \
        if mode == "decode" else {}
    state_out: dict = {}
    token_valid = None

    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output") or (n.op == "call_module" and "guards" in str(n.target)):
            continue
        look = (lambda x: plain.get(x, env[x])) if n in mask_only else (lambda x: env[x])
        a = by_node.get(n)
        if a is not None:
            s = order[n]
            if mode == "prefill":
                env[n] = _prefill_attention(g, call, n, a, look)
                state_out[s] = _prefill_state(call, n, a, env)
            else:
                if token_valid is None and a.form != "kv":
                    token_valid = call(aten.select.int, call(aten.index_select.default, key_valid, 1,
                                                             cache_position), 1, 0)          # [B]
                env[n], state_out[s] = _decode_step(call, n, a, env, state_in[s], cache_position, key_valid,
                                                    token_valid, inplace)
            continue
        if mode == "decode" and n in aranges:
            env[n] = cache_position
            continue
        env[n] = g.node_copy(n, look)
        if n in heads:
            plain[n] = env[n]
            env[n] = call(aten.to.dtype, positions, G.dtype(n) or torch.int64)
    outs = [fx.node.map_arg(x, lambda y: env[y]) for x in _output_args(gm)]
    if last:
        for x in outs:
            _last_token_only(g, x)
    for a in attn:
        outs.extend(state_out[order[a.node]])
    g.output(tuple(outs))
    G.remove_dead(g)
    lowered = fx.GraphModule(gm, g, class_name=f"{mode.capitalize()}{'Inplace' if inplace else ''}Graph")
    if mode == "decode" and mask is not None:
        _check_mask_uses(g, mask)
    g.lint()
    return lowered


_PER_TOKEN = frozenset({aten.mul, aten.div, aten.add, aten.sub, aten.tanh, aten.neg}) | G.CASTS


def _last_token_only(g: fx.Graph, out) -> None:
    """Make the linear that computes the [B, T, ·] output `out` (through per-token elementwise ops
    with constants, e.g. logit soft-capping) read x[:, -1:] instead of x: the prompt's logits are
    needed at its last token only, and the vocabulary projection is the prefill's largest matmul."""
    n = out
    while isinstance(n, fx.Node) and G.is_op(n, _PER_TOKEN) and not G.is_op(n, aten.linear):
        data = [a for a in n.args if isinstance(a, fx.Node) and G.is_data(a)]
        if len(data) != 1:
            return
        n = data[0]
    if not (G.is_op(n, aten.linear) and G.rank(n) == 3 and isinstance(n.args[0], fx.Node)
            and G.rank(n.args[0]) == 3):
        return
    with g.inserting_before(n):
        x = g.call_function(aten.slice.Tensor, (n.args[0], 1, -1, 2 ** 63 - 1))
    n.replace_input_with(n.args[0], x)


def _prefill_attention(g: fx.Graph, call, n: fx.Node, a: _Attn, look) -> fx.Node:
    """The prompt's attention as the rewritten model runs it, except that a causal SDPA with a mask
    becomes rewriter::causal_attention: the fused is_causal kernel when the batch has no padding,
    the same masked SDPA otherwise (exact; causal_fastpath's swap)."""
    args = G.sdpa_args(n)
    if n.target is not G.SDPA or not isinstance(args["attn_mask"], fx.Node):
        return g.node_copy(n, look)
    scale = args["scale"] if args["scale"] is not None else G.shape(args["query"])[-1] ** -0.5
    k, v, gqa = G.gqa_kv(args["query"], args["key"], args["value"], bool(args["enable_gqa"]))
    new = call(R.causal_attention.default, look(args["query"]), look(k), look(v), look(args["attn_mask"]),
               float(scale), gqa)
    new.meta.update({k: v for k, v in n.meta.items() if k in ("nn_module_stack", "val")})
    return new


def _op_args(n: fx.Node, env) -> dict:
    """The arguments of a decode-form op node by name, mapped to the step graph's values."""
    args = D.arguments(n.target, n.args, n.kwargs)
    return {k: env[x] if isinstance(x, fx.Node) else x for k, x in args.items()}


def _prefill_state(call, n: fx.Node, a: _Attn, env) -> list[fx.Node]:
    if a.decode is None:
        return [env[a.k_src], env[a.v_src]]
    return a.decode.prefill(call, _op_args(n, env))


def _decode_step(call, n: fx.Node, a: _Attn, env, state, cache_position, key_valid, token_valid,
                 inplace: bool = False):
    """The decode form of attention node `n` (its step op and the new state), on the step graph's
    values `env`: a KV cache written at cache_position and read by decode_attention, or the op's
    own DecodeForm step."""
    if a.decode is not None:
        extra = {"inplace": inplace, "key_valid": key_valid} if a.decode.caches else {}
        return a.decode.step(call, _op_args(n, env), state, cache_position, token_valid, **extra)
    m = lambda x: env[x] if isinstance(x, fx.Node) else x  # noqa: E731
    args = G.sdpa_args(n)
    scale = args["scale"] if n.target is G.SDPA else G.arg(n, 4, "scale")
    write = aten.index_copy_.default if inplace else aten.index_copy.default
    k_cache = call(write, state[0], 2, cache_position, env[a.k_src])
    v_cache = call(write, state[1], 2, cache_position, env[a.v_src])
    out = call(R.decode_attention.default, m(args["query"]), k_cache, v_cache, cache_position, key_valid,
               None if scale is None else float(scale))
    return out, [k_cache, v_cache]


def _check_mask_uses(g: fx.Graph, mask: str) -> None:
    """The decode graph may read the traced attention mask for its size only: a step's mask holds
    the new tokens alone, so anything computed from its values (positions from a cumsum, say)
    would differ from the full sequence's."""
    p = next(n for n in g.nodes if n.op == "placeholder" and n.name == mask)
    for u in p.users:
        if G.is_data(u) and not G.is_op(u, aten.sym_size):
            raise LoweringError(f"input {mask} feeds {u.name} ({_op_name(u.target)}) besides the attention "
                                f"masks; a decode step, which sees the new tokens' mask only, cannot "
                                f"reproduce it")
