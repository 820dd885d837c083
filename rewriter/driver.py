"""The driver: recipe steps over candidates, each rewrite tried on a snapshot, gated, kept or undone.

Three verbs, and rules use none of them themselves:

    trial(rule, candidate)   snapshot → build → apply → measure → keep, or restore the snapshot
    run(steps)               per step: plan → [order: damage: a trial of each, undone] → check →
                             trial gated against the ORIGINAL model's outputs → Record; budgets
    replay(gm, sites, recs)  what load() does: apply every applied record's built tensors again

Budgets (max sites applied, max seconds; max_applied per step) stop with a stated reason. In a
ranked step (StepOptions.ranked: order: damage, layers: auto, or a rule's own ranking) `patience`
consecutive gate failures end the step: every untried candidate is recorded as skipped, the rule
named. Each measurement (the gate's and the damage ranking's) runs through an ActivationCache
(rewriter/cache.py): a candidate resumes from the current model's cached values at the latest cut
upstream of everything it changed, bit for bit what the full forward gives.

Data parallel (rewriter/distributed.py, `world`): every forward pass over a list of batches (the
gate's, the damage ranking's, `Context.capture`'s) runs on each rank for its own share of the
batches, each rank's activation cache holding its own share, and the results are all-gathered in
batch order; each decision's record is then checked to be the same on every rank, and a time budget
is rank 0's call. With one process none of this calls a collective.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from . import graph as G
from .artifact import manifest
from .cache import DEFAULT_CAP_BYTES, ActivationCache, flatten_inputs
from .distributed import SINGLE, World
from .gate import Gate, Measurement, compare
from .generate import decoded_runner
from .io import ModelIO, PlainIO
from .rule import Built, Candidate, Refused, Rule, get_rule
from .site import AttentionSite
from .trace import restore, snapshot

@dataclass
class Record:
    """One decision of the driver; the report, save/load and replay are built from these."""

    rule: str
    sites: tuple[int, ...]           # every site the decision covers (a MASA group: all its layers)
    modules: tuple[str, ...]
    status: str                      # applied | rejected | rolled_back | error | skipped
    reason: str | None
    metric_before: float | None = None
    metric_after: float | None = None
    seconds: float = 0.0
    step: int = 0
    options: dict = field(default_factory=dict)
    built: dict = field(default_factory=dict, repr=False)   # tensors, saved with safetensors
    worst_after: float | None = None
    info: dict = field(default_factory=dict)   # facts the rule's plan and build found
    measurement: Measurement | None = field(default=None, repr=False, compare=False)
    traceback: str | None = field(default=None, repr=False, compare=False)

    @classmethod
    def of(cls, rule: str, sites, status: str, reason: str | None, **fields) -> "Record":
        """The record of a decision on `sites` (AttentionSites)."""
        return cls(rule, tuple(s.index for s in sites), tuple(s.module for s in sites), status, reason,
                   **fields)

    @property
    def site(self) -> int | None:
        return self.sites[0] if self.sites else None

    @property
    def module(self) -> str | None:
        return self.modules[0] if self.modules else None

    def to_dict(self) -> dict:
        return {"rule": self.rule, "site": self.site, "module": self.module, "sites": list(self.sites),
                "modules": list(self.modules), "status": self.status, "reason": self.reason,
                "metric_before": self.metric_before, "metric_after": self.metric_after,
                "worst_after": self.worst_after, "seconds": round(self.seconds, 4), "step": self.step,
                "options": self.options, "built": sorted(self.built), "info": self.info}

    @classmethod
    def from_dict(cls, d: dict, built: dict | None = None) -> "Record":
        """A saved record (`to_dict`); records saved before `sites` existed name one site."""
        one = [] if d.get("site") is None else [d["site"]]
        keys = ("status", "reason", "metric_before", "metric_after", "seconds", "step", "worst_after")
        return cls(d["rule"], tuple(d.get("sites", one)), tuple(d.get("modules", [d.get("module")] if one else [])),
                   **{k: d.get(k) for k in keys}, options=d.get("options") or {}, info=d.get("info") or {},
                   built=dict(built or {}))


class Context:
    """What a rule's plan/build may use: the current graph, the sites, the calibration inputs, the
    model's I/O (rewriter.io.ModelIO), and activation capture at named nodes. `world`: the processes
    that share capture's forward passes (each gets every batch's values, in batch order)."""

    def __init__(self, gm: fx.GraphModule, sites: list[AttentionSite], calibration, io: ModelIO | str,
                 world: World = SINGLE):
        self.gm, self.sites, self.calibration, self.world = gm, sites, calibration, world
        self.io = io if not isinstance(io, str) else PlainIO(kind=io)
        # set by the Driver: a capture that rides on its first measurement (None: not possible)
        self.first_pass: Callable[[list[str], Callable | None], object] | None = None

    @property
    def kind(self) -> str:
        return self.io.kind

    @property
    def batches(self) -> list[dict]:
        return self.calibration.batches

    def valid(self, batch: dict, y: torch.Tensor) -> torch.Tensor:
        """bool [B, T] of the real tokens of a [B, T, ...] activation of `batch`."""
        return self.io.valid_tokens(batch, y)

    @torch.no_grad()
    def capture(self, names: list[str], batches: list[dict] | None = None,
                reduce: Callable[[dict, dict], object] | None = None):
        """Values of the named nodes on each calibration batch (or each of `batches`):
        {name: [per-batch tensor]}. Each forward stops at the last named node: what comes after it
        (the later layers, the LM head) cannot change what was captured. `reduce(batch, {name:
        value})`, if given, is applied to each batch's values as soon as they are captured and
        capture returns [its result per batch]: one batch's activations are held at a time."""
        gm, want = self.gm, set(names)
        missing = want - {n.name for n in gm.graph.nodes}
        if missing:
            raise KeyError(f"capture: no nodes named {sorted(missing)} in the current graph")
        if batches is None and self.first_pass is not None:
            shared = self.first_pass(names, reduce)
            if shared is not None:
                return shared

        class _Rec(fx.Interpreter):
            def run_node(self, n):
                v = super().run_node(n)
                if n.name in want:
                    self.vals[n.name] = v.detach() if isinstance(v, torch.Tensor) else v
                    if len(self.vals) == len(want):
                        raise _Captured
                return v

        def one(b: dict):
            rec = _Rec(gm)
            rec.vals = {}
            try:
                rec.run(*flatten_inputs(gm, b))
            except _Captured:
                pass
            return rec.vals if reduce is None else reduce(b, rec.vals)

        batches = batches if batches is not None else self.batches
        per = self.world.shard(lambda bs: [one(b) for b in bs], batches, f"capturing {', '.join(names)}")
        return per if reduce is not None else {k: [p[k] for p in per] for k in names}


class _Captured(BaseException):
    """Every node a capture wants has run (a BaseException: fx.Interpreter rewraps Exceptions)."""


@dataclass
class RunResult:
    records: list[Record]
    stop_reason: str
    final: Measurement | None
    cache: dict = field(default_factory=dict)   # the activation cache's counts (ActivationCache.stats)


class Driver:
    """Runs recipe steps on `gm` in place, gating each candidate against `gate` (the original's
    outputs). `on_record(record)` is called after every decision (progress for the CLI).
    `cache_bytes`: the cap on each activation cache (rewriter/cache.py; 0: every run in full).
    `world`: the processes that share the forward passes (default: the gate's); each rank's caches
    hold its own batches."""

    def __init__(self, gm: fx.GraphModule, sites: list[AttentionSite], calibration, io: ModelIO, gate: Gate,
                 budget=None, on_record: Callable[[Record], None] | None = None,
                 cache_bytes: int = DEFAULT_CAP_BYTES, world: World | None = None):
        own = getattr(gate, "world", SINGLE)
        self.world = world = own if world is None else world
        if world != own:
            raise ValueError(f"Driver: world {world} differs from the gate's {own}")
        self.ctx = Context(gm, sites, calibration, io, world)
        self.gm, self.sites, self.gate, self.budget = gm, sites, gate, budget
        self.on_record = on_record
        self.records: list[Record] = []
        self.cache_bytes, self.anchors = cache_bytes, [s.node for s in sites]
        self.cache = ActivationCache(gm, world.mine(gate.batches), self.ctx.io, self.anchors, cache_bytes)
        self._baseline: Measurement | None = None      # the gate's measurement of the unrewritten graph
        self.ctx.first_pass = self._first_pass

    def _current(self) -> Measurement:
        """The gate's measurement of the graph before any rewrite (measured once, when first needed)."""
        if self._baseline is None:
            self._baseline = self._measure(self.gm)
        return self._baseline

    def _first_pass(self, names: list[str], reduce) -> object | None:
        """A rule's first calibration capture (drop's importance, a fit's activations), taken during
        the gate's measurement of the unrewritten graph: one forward over the batches instead of two,
        the same values (ActivationCache.run's `watch`). None where that pass is not the same one:
        already measured, the gate judges other batches (validation) or a decode, several processes,
        the activation cache off (its run is then the plain forward, which watches nothing)."""
        if self._baseline is not None or not self.world.single or getattr(self.gate, "decode", None) is not None \
                or self.cache.why_off is not None:
            return None
        mine, cal = self.cache.batches, self.ctx.batches
        if len(mine) != len(cal) or any(a is not b for a, b in zip(mine, cal)):
            return None
        per = []
        see = (lambda b, v: per.append(v)) if reduce is None else (lambda b, v: per.append(reduce(b, v)))
        self._baseline = self.gate.measure(self.gm, lambda gm, bs, io, **kw: self.cache.run(
            gm, bs, io, watch=(set(names), see), **kw))
        return per if reduce is not None else {k: [p[k] for p in per] for k in names}

    def _measure(self, gm: fx.GraphModule) -> Measurement:
        """The gate's measurement of `gm`, its outputs from the activation cache, or (gate.decode)
        from a teacher-forced decode of the lowered graph (rewriter.generate.decoded_runner)."""
        if getattr(self.gate, "decode", None) is not None:
            return self.gate.measure(gm, decoded_runner(self.sites, self.gate.decode))
        return self.gate.measure(gm, self.cache.run)

    # ---- trial ---------------------------------------------------------------------------------
    def trial(self, rule: Rule, cand: Candidate, opts, measure: Callable[[fx.GraphModule], Measurement],
              keep: bool = True, **fields) -> Record:
        """Build and apply `cand` on a snapshot and measure; keep it when `keep` and the measurement
        is ok, else restore the snapshot. A failing rule never leaves a half-edited graph behind.
        Returns the decision: applied (kept), rolled_back, rejected (Refused) or error; `fields`: the
        record's other fields."""
        t = time.perf_counter()
        rec = Record.of(rule.name, cand.sites, "applied", None, info=dict(cand.facts), **fields)
        snap = snapshot(self.gm)
        try:
            built = Built.of(rule.build(self.ctx, cand, opts))
            rule.apply(self.gm, cand, built, opts)
            G.clean(self.gm)
            m = measure(self.gm)
        except Refused as e:        # build found the candidate unsuitable: a reason, not a failure
            rec.status, rec.reason = "rejected", str(e)
            rec.info.update(e.facts)
        except Exception as e:      # noqa: BLE001
            rec.status, rec.reason = "error", f"{type(e).__name__}: {e}".strip()
            rec.traceback = traceback.format_exc()
        else:
            rec.info.update(built.facts)
            rec.metric_after, rec.worst_after = m.value, m.worst
            if keep and m.ok:
                rec.reason, rec.built, rec.measurement = m.why, built.tensors, m
            else:
                rec.status, rec.reason = "rolled_back", f"gate: {m.why}"
        if rec.status != "applied":
            restore(self.gm, snap)
        else:
            self.cache.accept(self.gm)
        rec.seconds = time.perf_counter() - t
        return rec

    def _by_damage(self, rule: Rule, cands: list[Candidate], opts) -> list[Candidate]:
        """order: damage — each checked candidate built and applied alone on the current model and
        undone; the relative RMS change of the main output on the gate's batches ranks them (the
        validation samples where there are: what a fit has not seen, the gate's own activation
        cache, and a quarter of the calibration's tokens by default)."""
        io, batches, cache, world = self.ctx.io, self.gate.batches, self.cache, self.world
        ref = world.shard(lambda bs: cache.run(self.gm, bs), batches, "ranking by damage")

        def damage(gm) -> Measurement:
            new = world.shard(lambda bs: cache.run(gm, bs), batches, "ranking by damage")
            value, _ = compare("relative_rms", batches, ref, new, io)
            return Measurement("relative_rms", value, None, True, "")

        usable = [c for c in cands if rule.check(c, opts) is None]
        ranked = []
        for c in usable:
            tr = self.trial(rule, c, opts, damage, keep=False)
            ok = tr.metric_after is not None
            d = tr.metric_after if ok else float("inf")
            facts = {"damage_alone": round(d, 5)} if ok else {"damage_alone_error": tr.reason}
            ranked.append((d, Candidate(c.sites, {**c.facts, **facts})))
        ranked.sort(key=lambda x: x[0])
        return [c for _, c in ranked] + [c for c in cands if not any(c is u for u in usable)]

    # ---- run -----------------------------------------------------------------------------------
    def _over_budget(self, t0: float) -> str | None:
        """Why the run stops here (a budget reached), or None; a time budget is rank 0's call."""
        b = self.budget
        if b is None:
            return None
        if not self.world.single and b.max_seconds is not None:
            return self.world.broadcast(self._budget_reason(b, t0))
        return self._budget_reason(b, t0)

    def _budget_reason(self, b, t0: float) -> str | None:
        if b.max_sites is not None and sum(r.status == "applied" for r in self.records) >= b.max_sites:
            return f"budget: max_sites={b.max_sites} reached"
        if b.max_seconds is not None and time.perf_counter() - t0 > b.max_seconds:
            return f"budget: max_seconds={b.max_seconds} exceeded"
        return None

    def _record(self, rec: Record) -> Record:
        if not self.world.single:       # every rank must have taken this very decision, built these tensors
            self.world.agree((rec.rule, rec.sites, rec.status, rec.reason, rec.metric_before,
                              rec.metric_after, rec.worst_after, manifest(rec.built)),
                             f"the decision on {rec.rule} site(s) {list(rec.sites)} (step {rec.step})")
        self.records.append(rec)
        if self.on_record:
            self.on_record(rec)
        return rec

    def run(self, steps) -> RunResult:
        t0 = time.perf_counter()
        current = None          # measured after the first plan, which may share its pass (_first_pass)
        for step_i, step in enumerate(steps):
            rule: Rule = get_rule(step.rule)
            opts = step.options
            opts_d = opts.model_dump(exclude_defaults=True)

            def note(sites, why, info=None):
                self._record(Record.of(rule.name, sites, "skipped", why, step=step_i, options=opts_d,
                                       info=dict(info or {})))

            alive = [s for s in self.sites if G.find(self.gm, s.node) is not None]
            selected = [s for s in alive if opts.selects(s, self.sites)]
            for s in self.sites:
                if s not in alive and opts.selects(s, self.sites):
                    note([s], "site was already rewritten by an earlier step")
            if not selected:
                note([], f"layers={opts.layers!r} selects none of the {len(alive)} remaining sites")
                continue
            cands = rule.plan(self.ctx, selected, opts)
            current = self._current() if current is None else current
            if opts.by_damage:
                cands = self._by_damage(rule, cands, opts)
            limit, applied_here, failed = opts.limit, 0, 0
            patience = opts.patience if opts.ranked else None
            for cand in cands:
                if stop := self._over_budget(t0):
                    return self._result(stop, current)
                if limit is not None and applied_here >= limit:
                    name = "max_applied" if opts.max_applied is not None else "max_layers"
                    note(cand.sites, f"{name}={limit} already applied in this step", cand.facts)
                    continue
                if patience is not None and failed >= patience:
                    note(cand.sites, f"patience={patience}: {patience} ranked candidates in a row failed the "
                                     "gate; the remaining ones rank as more damaging", cand.facts)
                    continue
                rec = self._record(self._decide(rule, cand, opts, opts_d, current, step_i))
                if rec.status == "applied":
                    applied_here += 1
                    current = rec.measurement
                if rec.status in ("applied", "rolled_back"):      # rejections and errors do not count
                    failed = failed + 1 if rec.status == "rolled_back" else 0
        return self._result("all steps done", current)

    def _result(self, stop: str, current: Measurement | None) -> RunResult:
        """The run's result; the activation cache's values are freed (its counts stay)."""
        current = self._current() if current is None else current
        self.cache.clear()
        return RunResult(self.records, stop, current, dict(self.cache.stats))

    def _decide(self, rule: Rule, cand: Candidate, opts, opts_d: dict, current: Measurement, step_i: int) -> Record:
        t, fields = time.perf_counter(), dict(metric_before=current.value, step=step_i, options=opts_d)
        reason = rule.check(cand, opts)
        if reason:
            return Record.of(rule.name, cand.sites, "rejected", reason, info=dict(cand.facts),
                             seconds=time.perf_counter() - t, **fields)
        return self.trial(rule, cand, opts, self._measure, **fields)



def replay(gm: fx.GraphModule, sites: list[AttentionSite], records: list[Record]) -> None:
    """Apply every applied record again from its saved tensors (no calibration, no gate): load()."""
    by_index = {s.index: s for s in sites}
    for r in records:
        if r.status != "applied":
            continue
        missing = [i for i in r.sites if i not in by_index]
        if missing:
            raise ValueError(f"record of {r.rule} names site(s) {missing}, which the model does not have "
                             f"(it has {len(sites)} attention sites)")
        rule = get_rule(r.rule)
        rule.apply(gm, Candidate(tuple(by_index[i] for i in r.sites), r.info), Built(r.built, r.info),
                   rule.options(**r.options))
        G.clean(gm)
