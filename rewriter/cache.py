"""Cached activations: a trial's graph resumes from values the current model computed, where the
candidate cannot have changed them.

Every trial of the driver measures a candidate graph on the same batches (the gate's, or the
calibration batches of `order: damage`), and a rewrite of site i changes nothing upstream of it.
The cache keeps, for those batches, the values of the current model's graph (the *reference*) at a
few **cuts** and runs a candidate from the latest cut whose values it still computes identically.

Cuts, found from the graph (no per-model case). At a position p of the graph's node order the
*live set* is every computed node (not a placeholder, not a get_attr) defined before p and read at
or after p: what a run resumed at p needs besides the inputs and the weights. Between two
consecutive attention anchors (the sites' SDPA nodes still in the graph) the cut is the latest
position whose live set holds the fewest tensors: in a transformer, the residual stream at the
layer boundary just before the next site's block, plus the values every layer reads (the mask,
RoPE's cos/sin, symbolic sizes).

Unchanged, decided by node identity against the reference: a candidate's node is unchanged when
the reference has a node of the same name, op and target, with the same arguments (nodes by name,
each unchanged in turn), reading the very same tensor object at the same version counter for a
get_attr (a rewrite registers new tensors; a write in place would bump the counter). An unchanged
node computes the same value from the same inputs, so a cut is usable when its whole live set is
unchanged. The run from there calls the same ops in the same order on the same tensors as the
full forward: the outputs are equal bit for bit (tests/engine/test_cache.py checks it for every
rule). Graphs with a mutating or random op run in full (`why_off` says so).

Memory: the values are held for at most `cap_bytes` (default 256 MiB; storage bytes, each shared
storage counted once). Cuts are kept evenly spaced through the graph, as many as fit: after each
batch the total is extrapolated to all batches and cuts are dropped until it fits (a transient of
one batch's values above the cap while the first run records). `cap_bytes=0` turns the cache off:
every run is the full forward. A run also keeps, while there is room under the cap, its own values
at the kept cuts it changed: when the driver keeps that very graph (`accept`, signatures compared)
they become the reference's values, so a step whose rewrites all pass still resumes each trial at
the previous site. Otherwise a kept rewrite drops the values of every node it changed, and later
runs that compute those cuts unchanged record them again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from . import graph as G

DEFAULT_CAP_BYTES = 256 * 2**20
_SKIP = ("placeholder", "get_attr", "output")


@dataclass(frozen=True)
class Cut:
    """A resume point of the reference graph: its position and the names of its live set."""

    position: int
    names: tuple[str, ...]


def why_uncacheable(gm: fx.GraphModule) -> str | None:
    """Why runs of `gm` cannot skip unchanged nodes (a mutating or random op), or None."""
    for n in gm.graph.nodes:
        t = n.target
        if n.op == "call_function" and isinstance(t, torch._ops.OpOverload):
            if t._schema.is_mutable:
                return f"node {n.name} ({t}) writes to an argument"
            if torch.Tag.nondeterministic_seeded in t.tags and not _no_dropout(n):
                return f"node {n.name} ({t}) draws random numbers"
    return None


def _no_dropout(n: fx.Node) -> bool:
    """Ops tagged random only through a dropout that is off: SDPA with dropout_p 0, (native_)dropout
    with p 0 or train False."""
    if n.target is G.SDPA:
        return G.sdpa_args(n)["dropout_p"] in (0, 0.0)
    if n.target in (torch.ops.aten.dropout.default, torch.ops.aten.native_dropout.default):
        p, train = G.arg(n, 1, "p", 0.5), G.arg(n, 2, "train", True)
        return p in (0, 0.0) or train is False
    return False


def _signature(gm: fx.GraphModule, n: fx.Node):
    """What makes `n` compute what it computes, its input nodes named (compared with ==)."""
    args = fx.node.map_arg((n.args, n.kwargs), lambda a: ("%node", a.name))
    if n.op == "get_attr":          # the tensor object and its version counter (an in-place write bumps it)
        t = G.fetch_attr(gm, n.target)
        return (n.op, n.target, _Identity(t), getattr(t, "_version", None))
    if n.op == "call_module":
        return (n.op, n.target, _Identity(gm.get_submodule(n.target)), args)
    return (n.op, n.target, args)


class _Identity:
    """Equal to another only when both hold the very same object (which it keeps alive)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.obj is self.obj

    __hash__ = None


def _equal(a, b) -> bool:
    try:
        return bool(a == b)
    except Exception:   # noqa: BLE001 (a tensor constant among the arguments: not comparable, so changed)
        return False


def _nbytes(values, seen: set) -> int:
    total = 0
    for v in pytree.tree_leaves(values):
        if isinstance(v, torch.Tensor):
            s = v.untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
    return total


def find_cuts(gm: fx.GraphModule, anchors: list[str]) -> list[Cut]:
    """One cut per anchor node present in `gm` (module docstring): the latest position since the
    previous anchor whose live set holds the fewest tensors, among the positions where some computed
    tensor is live (before that, a resumed run is the full run)."""
    nodes = list(gm.graph.nodes)
    pos = {n: i for i, n in enumerate(nodes)}
    want = set(anchors)
    at = sorted(pos[n] for n in nodes if n.name in want)
    last = {n: max(pos[u] for u in n.users) for n in nodes if n.op not in _SKIP and n.users}
    # tensors live before position p: defined at < p, last read at >= p
    diff = [0] * (len(nodes) + 2)
    for n, end in last.items():
        if isinstance(n.meta.get("val"), torch.Tensor) or "val" not in n.meta:
            diff[pos[n] + 1] += 1
            diff[end + 1] -= 1
    count, c = [], 0
    for d in diff[:len(nodes) + 1]:
        c += d
        count.append(c)
    cuts, prev = [], -1
    for a in at:
        span = range(prev + 1, a + 1)
        prev = a
        span = [p for p in span if count[p] > 0]    # where nothing computed is live, a run is the full run
        if not span:
            continue
        best = min(count[p] for p in span)
        p = max(p for p in span if count[p] == best)
        names = tuple(n.name for n, end in last.items() if pos[n] < p <= end)
        if names and (not cuts or cuts[-1].names != names):
            cuts.append(Cut(p, names))
    return cuts


class ActivationCache:
    """Runs graphs on fixed `batches` (main outputs, as rewriter.gate.run gives them), resuming
    from the reference graph's values at the latest usable cut. `anchors`: node names that bound the
    cut search (the attention sites' SDPA nodes). `stats` counts runs and nodes run / skipped."""

    def __init__(self, gm: fx.GraphModule, batches: list[dict], io, anchors: list[str],
                 cap_bytes: int = DEFAULT_CAP_BYTES):
        self.batches, self.io, self.anchors, self.cap = batches, io, list(anchors), int(cap_bytes)
        self.why_off = "cap_bytes=0" if self.cap <= 0 else why_uncacheable(gm)
        self.values: dict[str, list] = {}
        self.stats = {"runs": 0, "resumed": 0, "nodes_run": 0, "nodes_skipped": 0, "cuts_dropped": 0,
                      "bytes_max": 0}
        self._m: int | None = None      # how many cuts are kept (None: all, until the cap says)
        self._pending = None            # (signatures, values) of the last run's graph at the cuts it changed
        self._set_reference(gm)

    # ---- the reference graph ---------------------------------------------------------------------
    def _set_reference(self, gm: fx.GraphModule, still: list[Cut] = ()) -> None:
        """`gm` is the reference now; its cuts, and the former ones in `still` (whose values it
        computes unchanged: a dropped site takes its anchor, not its layer boundary, away)."""
        self._ref = {n.name: _signature(gm, n) for n in gm.graph.nodes}
        self.cuts = find_cuts(gm, self.anchors) if self.why_off is None else []
        pos = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        have = {c.names for c in self.cuts}
        self.cuts += [Cut(1 + max(pos[x] for x in c.names), c.names) for c in still if c.names not in have]
        self.cuts.sort(key=lambda c: c.position)
        self._select(prefer={c.names for c in self.cuts if self._ready(c)})

    def _select(self, prefer: set = frozenset()) -> None:
        """Keep `_m` cuts (all until the cap says fewer): the ready ones named in `prefer` first, then
        in `spread` order, so that any number kept lies evenly through the graph; free the rest."""
        m = len(self.cuts) if self._m is None else min(self._m, len(self.cuts))
        order = spread(len(self.cuts))
        ranked = [i for i in order if self.cuts[i].names in prefer] + [i for i in order
                                                                        if self.cuts[i].names not in prefer]
        self.kept = [self.cuts[i] for i in ranked[:m]]           # dropped last first when over the cap
        self.active = sorted(self.kept, key=lambda c: c.position)
        needed = self._needed()
        for k in [k for k in self.values if k not in needed]:
            del self.values[k]

    def clear(self) -> None:
        """Free every held value (the cuts stay; later runs record them again)."""
        self.values.clear()
        self._pending = None

    def _ready(self, cut: Cut) -> bool:
        return all(x in self.values for x in cut.names)

    def bytes(self) -> int:
        seen: set = set()
        return sum(_nbytes(v, seen) for v in self.values.values())

    def accept(self, gm: fx.GraphModule) -> None:
        """`gm` is the current model now (a kept rewrite): drop the values of the nodes it changed."""
        if self.why_off is not None:
            return
        same = self._unchanged(gm)
        for k in [k for k in self.values if k not in same]:
            del self.values[k]
        sig, pending = self._pending or ({}, {})
        self._pending = None
        if pending and sig.keys() == {n.name for n in gm.graph.nodes} and all(
                _equal(_signature(gm, n), sig[n.name]) for n in gm.graph.nodes):
            self.values.update(pending)   # the last run was of this very graph: now the reference's values
            same |= pending.keys()
        self._set_reference(gm, [c for c in self.cuts if all(x in same for x in c.names)])

    def _unchanged(self, gm: fx.GraphModule) -> set[str]:
        """Names of the nodes of `gm` that compute what the reference's nodes of that name compute."""
        same: set[str] = set()
        for n in gm.graph.nodes:
            ref = self._ref.get(n.name)
            if ref is not None and _equal(_signature(gm, n), ref) and all(
                    i.name in same for i in n.all_input_nodes):
                same.add(n.name)
        return same

    # ---- runs -------------------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, gm: fx.GraphModule, batches: list[dict] | None = None, io=None,
            reduce=None, watch: tuple | None = None) -> list[torch.Tensor]:
        """The main output of `gm` on each batch, equal bit for bit to `rewriter.gate.run(gm, ...)`.
        `batches` (if given) must be this cache's batches; `reduce(batch, y)`, if given, is applied
        to each batch's output as soon as it is computed (the gate keeps per-token NLLs, not logits).
        `watch` = (names, see): `see(batch, {name: value})` gets the named nodes' values of each batch
        as it runs (the driver's capture riding on its first measurement; ValueError where the run
        resumes past one; not given when the cache is off)."""
        from .gate import run as full_run
        if batches is not None and batches is not self.batches and (
                len(batches) != len(self.batches) or any(a is not b for a, b in zip(batches, self.batches))):
            raise ValueError("ActivationCache.run: these are not the batches the cache was built on")
        if self.why_off is not None:
            return full_run(gm, self.batches, self.io, reduce)
        self.stats["runs"] += 1
        same = self._unchanged(gm)
        cut = next((c for c in reversed(self.active) if self._ready(c) and all(x in same for x in c.names)),
                   None)
        start = set(cut.names) if cut else set()
        nodes = list(gm.graph.nodes)
        by_name = {n.name: n for n in nodes}
        out_node = nodes[-1]
        # what this run computes: the ancestors of the output not given by the cut, inputs or weights,
        # and the changed nodes kept for their effect alone (guards)
        seen_names, see = watch if watch is not None else ((), None)
        need, stack = set(), [out_node] + [by_name[x] for x in seen_names if x in by_name]
        stack += [n for n in nodes if not n.users and n.op not in _SKIP and n.name not in same]
        while stack:
            n = stack.pop()
            if n is not out_node and n.op not in _SKIP:
                need.add(n)
            for i in n.all_input_nodes:
                if i not in need and i.name not in start and i.op != "placeholder":
                    need.add(i)
                    stack.append(i)
        order = [n for n in nodes if n in need or n.op == "placeholder"]
        if any(x not in by_name or (by_name[x] not in need and by_name[x].op != "placeholder")
               for x in seen_names):                                     # unknown, or before the cut
            raise ValueError(f"ActivationCache.run: watched nodes {sorted(seen_names)} are not all computed "
                             f"by this run")
        # cuts this run can fill: kept, not ready, every name unchanged and computed here or cached
        fill = [c for c in self.active if not self._ready(c) and all(
            x in same and (x in self.values or by_name[x] in need) for x in c.names)]
        record = {x for c in fill for x in c.names if x not in self.values}
        # and, in case this graph is kept (accept), its own values at the kept cuts it changed
        spec = {x for c in self.active for x in c.names
                if x in by_name and x not in same and by_name[x] in need}
        computed = sum(n.op not in _SKIP for n in order)
        self.stats["resumed"] += cut is not None
        self.stats["nodes_run"] += computed
        self.stats["nodes_skipped"] += sum(n.op not in _SKIP for n in nodes) - computed
        last = {}
        for i, n in enumerate(order):
            for a in n.all_input_nodes:
                last[a] = i
        for a in out_node.all_input_nodes:
            last[a] = len(order)
        free_after: dict[int, list] = {}
        for a, i in last.items():
            if a.op != "placeholder":
                free_after.setdefault(i, []).append(a)
        codegen = gm.graph._codegen
        main = self.io.main_output
        outs, fresh, pending = [], {x: [] for x in record}, {x: [] for x in spec}
        self._pending = None
        for bi, b in enumerate(self.batches):
            env: dict[fx.Node, object] = {}
            seen = {}
            flat = iter(flatten_inputs(gm, b))
            for x in start:
                env[by_name[x]] = self.values[x][bi]
            for i, n in enumerate(order):
                if n.op == "placeholder":
                    env[n] = next(flat)
                    if n.name in seen_names:
                        seen[n.name] = env[n]
                else:
                    env[n] = _exec(gm, n, env)
                    if n.name in fresh or n.name in pending or n.name in seen_names:
                        v = env[n]
                        v = v.detach() if isinstance(v, torch.Tensor) else v
                        for keep in (fresh, pending):
                            if n.name in keep:
                                keep[n.name].append(v)
                        if n.name in seen_names:
                            seen[n.name] = v
                for a in free_after.get(i, ()):
                    env.pop(a, None)
            flat_out = fx.node.map_arg(out_node.args[0], lambda a: env[a])
            y = codegen.process_outputs(flat_out)
            if see is not None:
                see(b, seen)
            outs.append(main(y).detach() if reduce is None else reduce(b, main(y).detach()))
            del env, flat_out, y, seen
            if pending and not self._room(bi + 1, fresh, pending):
                pending = {}                    # no room to speculate: a kept graph records its cuts later
            if fresh:
                self.values.update({x: v for x, v in fresh.items() if len(v) == len(self.batches)})
                self._fit(done=bi + 1, partial={x: v for x, v in fresh.items() if len(v) < len(self.batches)})
                fresh = {x: v for x, v in fresh.items() if x not in self.values and x in self._needed()}
        if pending:
            self._pending = ({n.name: _signature(gm, n) for n in nodes}, pending)
        held = self.bytes() + sum(_nbytes(v, set()) for v in pending.values())
        self.stats["bytes_max"] = max(self.stats["bytes_max"], held)
        return outs

    def _room(self, done: int, *recording: dict) -> bool:
        """Whether the held values and those being recorded, extrapolated to all batches, fit the cap."""
        seen: set = set()
        held = sum(_nbytes(v, seen) for v in self.values.values())
        part = sum(_nbytes(v, seen) for rec in recording for v in rec.values())
        return held + part * len(self.batches) / max(done, 1) <= self.cap

    def _needed(self) -> set[str]:
        return {x for c in self.active for x in c.names}

    def _fit(self, done: int, partial: dict) -> None:
        """Drop kept cuts (last in `spread` order first) until the held values, with the partly
        recorded ones extrapolated from `done` batches to all, fit the cap."""
        n = len(self.batches)
        while self.kept:
            seen: set = set()
            held = sum(_nbytes(v, seen) for v in self.values.values())
            needed = self._needed()
            part = sum(_nbytes(v, seen) for x, v in partial.items() if x in needed)
            if held + part * n / max(done, 1) <= self.cap:
                return
            self.stats["cuts_dropped"] += 1
            self._m = len(self.kept) - 1
            self.kept = self.kept[:-1]
            self.active = sorted(self.kept, key=lambda c: c.position)
            needed = self._needed()
            for k in [k for k in self.values if k not in needed]:
                del self.values[k]


def spread(n: int) -> list[int]:
    """0..n-1 ordered so that every prefix is spread evenly: the last index first, then each time the
    one farthest from those taken and from the graph's start (ties: the later one)."""
    taken, left = [], list(range(n))
    while left:
        best = max(left, key=lambda i: (min([i + 1] + [abs(i - t) for t in taken]), i))
        taken.append(best)
        left.remove(best)
    return taken


def flatten_inputs(gm: fx.GraphModule, kwargs: dict) -> list:
    """A batch of keyword inputs as the traced graph's flat placeholder values (its input spec)."""
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return list(kwargs.values())
    import torch.fx._pytree as fx_pytree
    return fx_pytree.tree_flatten_spec(((), kwargs), spec)


def _exec(gm: fx.GraphModule, n: fx.Node, env: dict):
    """The value of `n` from its inputs' values, as the generated forward computes it."""
    if n.op == "get_attr":
        return G.fetch_attr(gm, n.target)
    args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
    if n.op == "call_function":
        return n.target(*args, **kwargs)
    if n.op == "call_method":
        self_obj, *rest = args
        return getattr(self_obj, n.target)(*rest, **kwargs)
    if n.op == "call_module":
        return gm.get_submodule(n.target)(*args, **kwargs)
    raise RuntimeError(f"ActivationCache: cannot run node {n.name} (op {n.op})")
