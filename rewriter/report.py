"""The report: what matched, what was applied or rolled back and why, and what it bought.

Stable keys of to_dict(): model, kind, sites [{index, module, heads, kv_heads, head_dim, mask, norm,
...}], records [{rule, site, status, reason, metric_before, metric_after, seconds, ...}],
params_before, params_after, attention_flops_per_token {before, after} (sympy expressions in N),
latency {seq_len, batch, before_ms, after_ms, speedup}, heldout {metric, value, worst, ok, before},
gate, calibration, stop_reason, canonicalized, notes, seconds.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field

import sympy
import torch

N = sympy.Symbol("N", positive=True, integer=True)


def sdpa_flops_per_token(site) -> sympy.Expr:
    """Softmax attention core, per query token: QKᵀ and PV are 2·N·d multiply-adds per head each."""
    return 4 * site.heads * site.head_dim * N


def projection_flops_per_token(site, d_model: int | None = None) -> sympy.Expr:
    """q, k, v, o projections per token: 2·d_model·(H + 2·Hkv)·d + 2·H·d·d_model."""
    d_model = d_model or site.heads * site.head_dim
    hd = site.head_dim
    return sympy.Integer(2 * d_model * (site.heads + 2 * site.kv_heads) * hd + 2 * site.heads * hd * d_model)


def attention_flops(sites, records) -> tuple:
    """Attention FLOPs per token (cores + projections) before and after, as sympy expressions in N:
    each applied record swaps its sites' softmax cost for the rule's `cost`."""
    from .rule import get_rule
    cost = {s.index: sdpa_flops_per_token(s) + projection_flops_per_token(s) for s in sites}
    before = after = sum(cost.values(), 0)
    by_index = {s.index: s for s in sites}
    for r in records:
        rule = get_rule(r.rule) if r.status == "applied" else None
        if rule is not None and rule.cost is not None:
            opts = rule.options(**r.options)
            for i in r.sites:
                after = after - cost[i] + rule.cost(by_index[i], opts)
    return before, after


@torch.no_grad()
def latency_ms(models: list, batch: dict, repeats: int = 5) -> list[float]:
    """Median wall time (ms) per call of each model on `batch`, after one warm-up call each, the calls
    interleaved in one process so that load drifts hit all models alike. Benchmarks use it too."""
    for m in models:
        m(**batch)
    times = [[] for _ in models]
    for _ in range(repeats):
        for i, m in enumerate(models):
            t = time.perf_counter()
            m(**batch)
            times[i].append((time.perf_counter() - t) * 1e3)
    return [statistics.median(t) for t in times]


def latency(original, rewritten, batch: dict) -> dict:
    """The report's latency entry: both models timed side by side on one calibration batch."""
    before_ms, after_ms = latency_ms([original, rewritten], batch)
    first = next((list(v.shape) for v in batch.values() if isinstance(v, torch.Tensor)), None)
    return {"seq_len": first[-1] if first else None, "batch": first[0] if first else None,
            "input_shape": first, "before_ms": before_ms, "after_ms": after_ms, "speedup": before_ms / after_ms}


def unique_numel(module: torch.nn.Module) -> int:
    """Floating-point parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.data_ptr(), t.numel())
        if key not in seen and t.is_floating_point():
            seen.add(key)
            total += t.numel()
    return total


@dataclass
class Report:
    model: str
    kind: str
    sites: list
    records: list
    params_before: int
    params_after: int
    flops_before: sympy.Expr
    flops_after: sympy.Expr
    latency: dict = field(default_factory=dict)
    heldout: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    stop_reason: str = ""
    canonicalized: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "model": self.model, "kind": self.kind,
            "sites": [s.summary() for s in self.sites],
            "records": [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in self.records],
            "params_before": self.params_before, "params_after": self.params_after,
            "attention_flops_per_token": {"before": str(self.flops_before), "after": str(self.flops_after)},
            "latency": self.latency, "heldout": self.heldout, "gate": self.gate,
            "calibration": self.calibration, "stop_reason": self.stop_reason,
            "canonicalized": self.canonicalized, "notes": self.notes, "seconds": round(self.seconds, 2),
        }

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str, **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Report":
        from .site import AttentionSite
        sites = [AttentionSite(node="", scale=0.0, **{k: s.get(k) for k in (
            "index", "module", "heads", "kv_heads", "head_dim", "mask", "norm", "positional", "layer")})
            for s in d["sites"]]
        from .artifact import parse_flops       # never sympify: it evals the text
        f = {k: v if isinstance(v, sympy.Basic) else
             parse_flops(v, "report.json", f"attention_flops_per_token.{k}")
             for k, v in d["attention_flops_per_token"].items()}
        optional = ("latency", "heldout", "gate", "calibration", "stop_reason", "canonicalized", "notes",
                    "seconds")
        return cls(d["model"], d["kind"], sites, d["records"], d["params_before"], d["params_after"],
                   f["before"], f["after"], **{k: d[k] for k in optional if k in d})

    # ---- rendering -------------------------------------------------------------------------
    def render(self, console=None) -> None:
        from rich.console import Console
        (console or Console()).print(self)

    def __rich_console__(self, console, options):
        from rich.table import Table
        d = self.to_dict()
        yield f"[bold]rewriter report[/bold] — {self.model} ({self.kind}), {len(self.sites)} attention sites"
        t = Table(title="decisions", show_lines=False)
        for c in ("step", "rule", "site", "module", "status", "metric", "reason", "s"):
            t.add_column(c, overflow="fold")
        colors = {"applied": "green", "rolled_back": "red", "error": "red", "rejected": "yellow", "skipped": "dim"}
        for r in d["records"]:
            after = r.get("metric_after")
            metric = "" if after is None else f"{r.get('metric_before', 0):.4f}→{after:.4f}"
            t.add_row(str(r.get("step", "")), r["rule"], "" if r["site"] is None else str(r["site"]),
                      r.get("module") or "", f"[{colors.get(r['status'], '')}]{r['status']}[/]",
                      metric, r.get("reason") or "", f"{r.get('seconds', 0):.1f}")
        yield t
        s = Table(title="totals", show_header=False)
        s.add_column("what"), s.add_column("value")
        pb, pa = self.params_before, self.params_after
        s.add_row("parameters", f"{pb:,} → {pa:,} ({(pa - pb) / max(pb, 1):+.1%})")
        s.add_row("attention FLOPs/token", f"{self.flops_before} → {self.flops_after}")
        if self.latency:
            L = self.latency
            text = self.kind in ("encoder", "causal_lm") or not L.get("input_shape")
            where = (f"batch {L.get('batch')}, {L.get('seq_len')} tokens" if text
                     else f"input {'×'.join(map(str, L['input_shape']))}")
            s.add_row(f"latency ({where})",
                      f"{L['before_ms']:.1f} ms → {L['after_ms']:.1f} ms ({L['speedup']:.2f}× the speed: "
                      f"{'faster' if L['speedup'] >= 1 else 'SLOWER'})")
        if self.heldout:
            h = self.heldout
            worst = f", worst {h['worst']:.4f}" if h.get("worst") is not None else ""
            s.add_row(f"held-out {h['metric']}", f"{h['value']:.4f}{worst} ({'ok' if h.get('ok') else 'OUT OF BOUND'})")
        c = self.calibration
        if c:
            judged = (f"{c['validation_batches']} validation batches (never fitted on)"
                      if c.get("validation_batches") else "the calibration batches")
            s.add_row("calibration", f"{c.get('samples')} samples × ≤{c.get('seq_len')} tokens from "
                                     f"{c.get('source')}; gate judged on {judged}")
        applied = sum(r["status"] == "applied" for r in d["records"])
        s.add_row("applied / decisions", f"{applied} / {len(d['records'])}")
        s.add_row("stopped because", self.stop_reason)
        yield s
        for n in self.notes:
            yield f"[dim]note: {n}[/dim]"

    def __str__(self) -> str:
        import io

        from rich.console import Console
        c = Console(width=140, file=io.StringIO(), no_color=True)
        c.print(self)
        return c.file.getvalue()
