"""The driver: recipe steps over attention sites, each rewrite snapshotted, gated and kept or restored.

    for step in recipe.steps:                   (in recipe order)
        for site in rule.plan(...) or sites:    (graph order unless the rule ranks them)
            rule.check → reason?  → record "rejected"
            snapshot
            rule.build (calibration) → rule.apply (graph edit) → gate vs the ORIGINAL outputs
            keep → record "applied"   |   restore → record "rolled_back" / "error"

Budgets (max sites applied, max seconds) stop the run with a stated reason.
"""
from __future__ import annotations

import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from . import graph as G
from .gate import Gate, Measurement
from .rule import Refused, Rule, get_rule
from .site import AttentionSite
from .trace import restore, snapshot


@dataclass
class Record:
    """One decision of the driver; the report, save/load and replay are built from these."""

    rule: str
    site: int | None
    module: str | None
    status: str                      # applied | rejected | rolled_back | error | skipped
    reason: str | None
    metric_before: float | None = None
    metric_after: float | None = None
    seconds: float = 0.0
    step: int = 0
    options: dict = field(default_factory=dict)
    built: dict = field(default_factory=dict, repr=False)   # tensors, saved with safetensors
    worst_after: float | None = None
    info: dict = field(default_factory=dict)   # facts the rule's plan found for this site

    def to_dict(self) -> dict:
        return {"rule": self.rule, "site": self.site, "module": self.module, "status": self.status,
                "reason": self.reason, "metric_before": self.metric_before,
                "metric_after": self.metric_after, "worst_after": self.worst_after,
                "seconds": round(self.seconds, 4), "step": self.step, "options": self.options,
                "built": sorted(self.built), "info": self.info}


class Context:
    """What a rule's plan/build may use: the current graph, the sites, calibration inputs, and
    activation capture at named nodes."""

    def __init__(self, gm: fx.GraphModule, sites: list[AttentionSite], calibration, kind: str):
        self.gm, self.sites, self.calibration, self.kind = gm, sites, calibration, kind
        self.info: dict[int, dict] = {}   # per-site facts a plan found (e.g. LLM-Drop importance)
        self.planned: dict = {}           # what a rule's plan computed for its build (e.g. MASA's groups)

    @property
    def batches(self) -> list[dict]:
        return self.calibration.batches

    @torch.no_grad()
    def capture(self, names: list[str], batches: list[dict] | None = None,
                gm: fx.GraphModule | None = None) -> dict[str, list[torch.Tensor]]:
        """Values of the named nodes on each calibration batch: {name: [per-batch tensor]}."""
        gm = gm or self.gm
        want = set(names)
        missing = want - {n.name for n in gm.graph.nodes}
        if missing:
            raise KeyError(f"capture: no nodes named {sorted(missing)} in the current graph")
        out: dict[str, list] = {n: [] for n in names}

        class _Rec(fx.Interpreter):
            def run_node(self, n):
                v = super().run_node(n)
                if n.name in want:
                    out[n.name].append(v.detach() if isinstance(v, torch.Tensor) else v)
                return v

        for b in batches if batches is not None else self.batches:
            flat = flatten_inputs(gm, b)
            _Rec(gm).run(*flat)
        return out


def flatten_inputs(gm: fx.GraphModule, kwargs: dict) -> list:
    spec = getattr(gm, "_in_spec", None)
    if spec is None:
        return list(kwargs.values())
    import torch.fx._pytree as fx_pytree
    return fx_pytree.tree_flatten_spec(((), kwargs), spec)


@dataclass
class RunResult:
    records: list[Record]
    stop_reason: str
    final: Measurement | None


def run_steps(gm: fx.GraphModule, sites: list[AttentionSite], recipe, gate: Gate, calibration,
              kind: str, *, progress=None, log=None) -> RunResult:
    """Apply the recipe's steps to `gm` in place, gating each site rewrite against `gate`."""
    ctx = Context(gm, sites, calibration, kind)
    records: list[Record] = []
    t0 = time.perf_counter()
    budget = recipe.budget

    def over_budget() -> str | None:
        if budget.max_sites is not None and sum(r.status == "applied" for r in records) >= budget.max_sites:
            return f"budget: max_sites={budget.max_sites} reached"
        if budget.max_seconds is not None and time.perf_counter() - t0 > budget.max_seconds:
            return f"budget: max_seconds={budget.max_seconds} exceeded"
        return None

    current = gate.measure(gm)
    for step_i, step in enumerate(recipe.steps):
        rule: Rule = get_rule(step.rule)
        opts = step.options
        opts_d = opts.model_dump(exclude_defaults=True)

        def note(site, why, info=None):
            records.append(Record(rule.name, site and site.index, site and site.module, "skipped", why,
                                  step=step_i, options=opts_d, info=info or {}))

        alive = [s for s in sites if G.find(gm, s.node) is not None]
        selected = [s for s in alive if opts.selects(s)]
        for s in sites:
            if s not in alive and opts.selects(s):
                note(s, "site was already rewritten by an earlier step")
        if not selected:
            note(None, f"layers={opts.layers!r} selects none of the {len(alive)} remaining sites")
            continue
        ordered = rule.plan(ctx, selected, opts) if rule.plan else selected
        limit = getattr(opts, "max_layers", None)
        applied_here = 0
        for site in ordered:
            if stop := over_budget():
                return RunResult(records, stop, current)
            if limit is not None and applied_here >= limit:
                note(site, f"max_layers={limit} already applied in this step", ctx.info.pop(site.index, {}))
                continue
            rec = _rewrite_site(ctx, rule, site, opts, opts_d, gate, current, step_i)
            records.append(rec)
            if log:
                log(rec)
            if rec.status == "applied":
                applied_here += 1
                current = rec._measurement  # type: ignore[attr-defined]
            if progress:
                progress()
    return RunResult(records, "all steps done", current)


def _rewrite_site(ctx: Context, rule: Rule, site: AttentionSite, opts, opts_d, gate: Gate,
                  current: Measurement, step_i: int) -> Record:
    gm = ctx.gm
    t = time.perf_counter()
    rec = Record(rule.name, site.index, site.module, "rejected", None, metric_before=current.value,
                 step=step_i, options=opts_d, info=ctx.info.pop(site.index, {}))
    reason = rule.check(site, opts)
    if reason:
        rec.reason, rec.seconds = reason, time.perf_counter() - t
        return rec
    snap = snapshot(gm)
    try:
        built = rule.build(ctx, site, opts)
        rec.info.update(ctx.info.pop(site.index, {}))   # what build measured (fit errors, ...)
        rule.apply(gm, site, built, opts)
        G.clean(gm)
        m = gate.measure(gm)
    except Refused as e:    # build found the site unsuitable: a reason, not a failure
        restore(gm, snap)
        rec.reason, rec.seconds = str(e), time.perf_counter() - t
        rec.info.update(ctx.info.pop(site.index, {}))
        return rec
    except Exception as e:  # a failing rule must never leave a half-edited graph behind
        restore(gm, snap)
        rec.status = "error"
        rec.reason = f"{type(e).__name__}: {e}".strip()
        rec.extra_trace = traceback.format_exc()  # type: ignore[attr-defined]
        rec.seconds = time.perf_counter() - t
        return rec
    rec.metric_after, rec.worst_after = m.value, m.worst
    if m.ok:
        rec.status, rec.reason, rec.built = "applied", m.why, built
        rec._measurement = m  # type: ignore[attr-defined]
    else:
        restore(gm, snap)
        rec.status, rec.reason = "rolled_back", f"gate: {m.why}"
    rec.seconds = time.perf_counter() - t
    return rec
