"""The report: what matched, what was applied or rolled back and why, and what it bought.

Stable keys of to_dict(): model, kind, sites [{index, module, heads, kv_heads, head_dim, mask, norm,
...}], records [{rule, site, status, reason, metric_before, metric_after, seconds, ...}],
params_before, params_after, attention_flops_per_token {before, after} (sympy expressions in N),
latency {seq_len, batch, before_ms, after_ms, speedup, pairs, spread, predicted_speedup, slower, by_length
[{seq_len, batch, before_ms, after_ms, speedup, pairs, spread, predicted_speedup}], crossover {seq_len, why},
sweep {budget_s, seconds, pairs, skipped [{seq_len, why}], main_batch {rows, of, why}, note}} (pairs,
spread and sweep absent from reports saved before them; `latency` says how they are timed),
flops_per_token {before, after} (whole model, rewriter.cost), predicted_speedup {length: FLOPs
before / after}, cost {unknown_ops, symbols, ...} (these three absent from reports saved before them),
heldout {metric, value, worst, ok, why, groups
[{text, tokens, value, worst, ok}], text, tokens: the worst group's; or {metric, skipped: why} when no
rewrite was kept}, calibration {source, samples,
seq_len, lengths, gate_on, sets {calibration, validation, heldout: [{text, tokens, samples}]}},
gate, calibration, stop_reason, canonicalized, notes, seconds, memory {peak_rss_bytes, start_rss_bytes,
weights_bytes, graph_shared_bytes, graph_private_bytes, method} (absent from reports saved before it),
world_size (how many processes shared the run's forward passes, rewriter/distributed.py; reports
saved before it read as 1), generation (causal LMs: {kv_bytes_per_token_before, kv_bytes_per_token_after,
saved_bytes_per_token, forms {kv, linear, hybrid, dropped: count}} from the
lowering, rewriter.lower, or {error}; absent from reports saved before it).
"""
from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field

import sympy
import torch

from . import offload

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


SWEEP_FACTORS = (1, 4, 16)   # the report times the recipe's length × these, up to the position limit
SWEEP_MAX_FLOPS = 4e11        # ... and only lengths where one call of the original costs at most this
SWEEP_BUDGET_S = 30.0         # seconds the latency entry may take (`latency`; the recipe's length always)
MAIN_MAX_FLOPS = 1e11         # the main entry times the calibration batch's rows that fit in this per call
STABLE_SPREAD = 0.02          # a row stops once its pairs' speed-ups agree within this (timing noise: ~2 %)
MIN_PAIRS = 2                 # ... over at least this many timed pairs
SLOWER_BELOW = 0.98           # the report warns below this speed-up at the recipe's length (timing noise: ~2 %)
NOT_KEPT = ("no rewrite was kept: the result is the original run through its traced graph, so only the "
            "recipe's length is timed (traced against eager)")


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


def main_rows(rows: int | None, row_flops: float | None, max_flops: float = MAIN_MAX_FLOPS) -> int | None:
    """How many of a calibration batch's `rows` the main latency entry times: all of them when one call
    of the original on them costs at most `max_flops` (`row_flops`: its FLOPs per row; None: unknown,
    all), else the most that do, at least 1."""
    if rows is None or not row_flops or row_flops * rows <= max_flops:
        return rows
    return max(1, min(rows, int(max_flops // row_flops)))


def head_rows(batch: dict, rows: int) -> dict:
    """The first `rows` rows of a batch: every tensor whose dim 0 is the batch's (the first tensor's)."""
    first = next((v for v in batch.values() if isinstance(v, torch.Tensor) and v.dim()), None)
    if first is None or first.shape[0] <= rows:
        return batch
    n = first.shape[0]
    return {k: v[:rows] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
            for k, v in batch.items()}


def _same_inputs(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k, x in a.items():
        y = b[k]
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.shape == y.shape
                    and x.dtype == y.dtype and torch.equal(x, y)):
                return False
        elif x is not y and x != y:
            return False
    return True


class _Row:
    """One timed row of the latency entry: its inputs, and the wall times (ms) of the original and the
    rewritten model in each timed pair after the warm-up pair; at most `most` pairs."""

    def __init__(self, models, batch: dict, seq_len, rows, most: int, clock):
        self.models, self.batch, self.seq_len, self.rows, self.most = models, batch, seq_len, rows, most
        self.clock, self.before, self.after, self.warm_s = clock, [], [], None

    def _pair(self) -> tuple[float, float]:
        out = []
        for m in self.models:
            t = self.clock()
            m(**self.batch)
            out.append((self.clock() - t) * 1e3)
        return out[0], out[1]

    def warm_up(self) -> None:
        t = self.clock()
        self._pair()
        self.warm_s = self.clock() - t

    def time_pair(self) -> None:
        b, a = self._pair()
        self.before.append(b)
        self.after.append(a)

    def spread(self) -> float | None:
        """(max − min) / median of the pairs' speed-ups (before / after per pair); None below 2 pairs."""
        r = [b / a for b, a in zip(self.before, self.after)]
        return (max(r) - min(r)) / statistics.median(r) if len(r) > 1 else None

    def done(self) -> bool:
        s = self.spread()
        return len(self.before) >= self.most or (len(self.before) >= MIN_PAIRS and s <= STABLE_SPREAD)

    def pair_s(self) -> float:
        """Seconds of one timed pair: the mean so far (the warm-up pair's before any)."""
        return sum(self.before + self.after) / len(self.before) / 1e3 if self.before else self.warm_s

    def entry(self) -> dict:
        b, a = statistics.median(self.before), statistics.median(self.after)
        return {"seq_len": self.seq_len, "batch": self.rows, "before_ms": b, "after_ms": a,
                "speedup": b / a, "pairs": len(self.before), "spread": self.spread()}


def _safe(cost):
    """`cost` as a function that gives a positive finite float or None (no count, or one that fails)."""
    def at(n):
        try:
            v = float(cost(n)) if cost is not None else None
        except Exception:  # noqa: BLE001 (an expression that does not evaluate: no count)
            return None
        return v if v is not None and 0 < v < float("inf") else None
    return at


def _error(n, e: Exception) -> str:
    return f"at {n} tokens: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


@torch.no_grad()
def latency(original, rewritten, batch: dict, *, lengths=(), stretch=None, predict=None, cost=None,
            kept: bool = True, repeats: int = 5, long_repeats: int = 3, budget_s: float = SWEEP_BUDGET_S,
            clock=time.perf_counter) -> dict:
    """The report's latency entry: both models timed side by side, interleaved (each timed pair calls
    the original, then the rewritten model, so a load drift hits both), on one calibration batch (the
    main entry) and, when `lengths` are given, at batch 1 at each of those lengths (`stretch(batch, n)`
    builds the inputs; `by_length`), with the cost model's prediction beside each measurement
    (`predict(n)`: FLOPs before / after at length n), the crossover (`crossover`) and `slower`: True
    when the rewritten model is slower at the recipe's own length.

    The rule that bounds its cost (`sweep` in the entry says what it did):
    - the main entry's batch is cut to the rows one call of the original on which costs at most
      MAIN_MAX_FLOPS (`main_rows`; `cost(n)`: the original's FLOPs per call at batch 1 and length n);
      a by_length row with the very inputs of a one-row main entry is that measurement, timed once;
    - every row gets one untimed warm-up pair and one timed pair (the main entry MIN_PAIRS, so that
      its spread is known), shortest first; a row of another length than the recipe's (the main
      entry's, and `lengths[0]`) is not started when those two pairs (predicted from the last row
      timed, scaled by `cost`, else by length) would end past `budget_s` seconds from the start, nor
      are the longer ones (`sweep.skipped` says why); the recipe's length is always timed;
    - then, while the budget lasts, the row with the fewest timed pairs among those not yet done
      whose next pair (its mean so far) fits gets one more pair; a row is done at `repeats` pairs
      (the main entry) or `long_repeats` (by_length's rows), or once stable: MIN_PAIRS or more pairs
      whose speed-ups spread by at most STABLE_SPREAD ((max − min) / median);
    - `kept=False` (no rewrite kept): only the recipe's length is timed; the other lengths are listed
      as skipped (NOT_KEPT) and the crossover says there is none.
    Each row reports the medians of its timed pairs, their count (`pairs`) and `spread`."""
    t0 = clock()
    deadline = t0 + budget_s
    models = (original, rewritten)
    flops = _safe(cost)
    first = next((list(v.shape) for v in batch.values() if isinstance(v, torch.Tensor)), None)
    seq_len = first[-1] if first else None
    per_row = flops(seq_len) if seq_len is not None else None
    n_rows = main_rows(first[0] if first else None, per_row)
    sweep: dict = {"budget_s": budget_s, "skipped": []}
    main_batch = batch
    if first and n_rows != first[0]:
        main_batch = head_rows(batch, n_rows)
        sweep["main_batch"] = {"rows": n_rows, "of": first[0], "why": (
            f"a call on all {first[0]} would cost {per_row * first[0]:.3g} FLOPs, over MAIN_MAX_FLOPS = "
            f"{MAIN_MAX_FLOPS:.3g}")}
    main = _Row(models, main_batch, seq_len, n_rows, repeats, clock)
    main.warm_up()
    for _ in range(min(MIN_PAIRS, repeats)):      # the recipe's length: its spread is always known
        main.time_pair()
    timed, by, error = [main], [], None

    def predicted_s(n: int) -> float:       # a warm-up pair and a timed pair at batch 1, length n
        last = timed[-1]
        now, then = flops(n), flops(last.seq_len) if last.seq_len is not None else None
        if now is not None and then is not None:
            scale = now / (then * (last.rows or 1))
        else:
            scale = n / ((last.seq_len or n) * (last.rows or 1))
        return 2 * last.pair_s() * scale

    own = lengths[0] if lengths else seq_len      # the recipe's length (`sweep_lengths` puts it first)
    for i, n in enumerate(lengths):
        if not kept and n != own:
            sweep["skipped"].append({"seq_len": n, "why": NOT_KEPT})
            continue
        try:
            inputs = stretch(batch, n)
        except Exception as e:  # noqa: BLE001 (inputs the length sweep could not build: say so, go on)
            error = _error(n, e)
            break
        if n == seq_len and n_rows == 1 and _same_inputs(inputs, main_batch):
            by.append(main)
            continue
        need = predicted_s(n)
        if n != own and clock() + need > deadline:
            left = max(0.0, deadline - clock())
            sweep["skipped"] += [{"seq_len": m, "why": f"the latency budget ({budget_s:g} s) would run out: "
                                  f"a warm-up and a timed pair at {n} tokens would take about {need:.0f} s, "
                                  f"{left:.0f} s were left"} for m in lengths[i:]]
            break
        row = _Row(models, inputs, n, 1, long_repeats, clock)
        try:
            row.warm_up()
            row.time_pair()
        except Exception as e:  # noqa: BLE001 (a length the model cannot take: say so, go on)
            error = _error(n, e)
            break
        timed.append(row)
        by.append(row)
    while True:                             # more pairs, while the budget lasts
        now = clock()
        fits = [r for r in timed if not r.done() and now + r.pair_s() <= deadline]
        if not fits:
            break
        min(fits, key=lambda r: (len(r.before), r.pair_s())).time_pair()
    m = main.entry()
    shape = next((list(v.shape) for v in main_batch.values() if isinstance(v, torch.Tensor)), None)
    out = {"seq_len": seq_len, "batch": n_rows, "input_shape": shape,
           **{k: m[k] for k in ("before_ms", "after_ms", "speedup", "pairs", "spread")}}
    if predict is not None and seq_len is not None:
        out["predicted_speedup"] = predict(seq_len)
    if error:
        out["by_length_error"] = error
    rows = [{**r.entry(), "predicted_speedup": predict(r.seq_len) if predict is not None else None}
            for r in by]
    if rows:
        out["by_length"] = rows
        out["crossover"] = crossover(rows) if kept else {"seq_len": None, "why": NOT_KEPT}
    out["slower"] = out["speedup"] < SLOWER_BELOW
    sweep["seconds"] = clock() - t0
    sweep["pairs"] = sum(len(r.before) for r in timed)
    if not kept:
        sweep["note"] = NOT_KEPT
    out["sweep"] = sweep
    return out


def sweep_lengths(seq_len: int, limit: int | None = None, factors=SWEEP_FACTORS, cost=None,
                  max_flops: float = SWEEP_MAX_FLOPS) -> list[int]:
    """The lengths the report times: `seq_len` × each of `factors`, at most `limit` (the model's
    position limit; the limit itself is timed when a factor passes it) and, when `cost(n)` (the
    original's FLOPs per call at length n) is given, only lengths whose call costs ≤ `max_flops`,
    so that optimize stays cheap (a few forward passes each)."""
    out = []
    for f in factors:
        n = seq_len * f
        if limit is not None and n > limit:
            n = limit
        if n in out or (cost is not None and f > 1 and cost(n) > max_flops):
            continue
        out.append(n)
        if limit is not None and n >= limit:
            break
    return out


def stretch(batch: dict, n: int, seq_dims: dict[str, list[int]], rows: int = 1,
            batched: set[str] | None = None) -> dict:
    """Row 0 of a batch at length n, repeated to `rows` rows: each input's sequence dims (`seq_dims`:
    name → dims, read from the traced graph's symbols) repeated or cut to n. `batched`: the inputs
    whose dim 0 is the batch (default: every tensor of rank ≥ 1); the others are passed as they are."""
    out = {}
    for k, v in batch.items():
        if not isinstance(v, torch.Tensor) or v.dim() == 0 or (batched is not None and k not in batched):
            out[k] = v
            continue
        x = v[:1]
        for d in seq_dims.get(k, ()):
            reps = -(-n // x.shape[d])
            x = x.repeat(*[reps if i == d else 1 for i in range(x.dim())]).narrow(d, 0, n)
        out[k] = x.repeat(rows, *[1] * (x.dim() - 1)) if rows > 1 else x
    return out


def crossover(rows: list[dict]) -> dict:
    """Where the rewrite starts to pay, from rows {seq_len, speedup} (any order): the shortest
    measured length from which the rewritten model is at least as fast at every longer measured
    length. {seq_len: None, why} when it is slower at the longest."""
    rows = sorted(rows, key=lambda r: r["seq_len"])
    if not rows:
        return {"seq_len": None, "why": "no lengths measured"}
    if rows[-1]["speedup"] < 1.0:
        return {"seq_len": None, "why": f"slower at every measured length up to {rows[-1]['seq_len']}"
                if all(r["speedup"] < 1.0 for r in rows) else
                f"slower at the longest measured length, {rows[-1]['seq_len']}"}
    i = len(rows) - 1
    while i > 0 and rows[i - 1]["speedup"] >= 1.0:
        i -= 1
    why = ("faster at every measured length" if i == 0 else
           f"slower up to {rows[i - 1]['seq_len']}, faster from {rows[i]['seq_len']} on")
    return {"seq_len": rows[i]["seq_len"], "why": why}


def latency_warning(latency: dict) -> str | None:
    """The report's warning when the rewritten model is slower than the original at the recipe's
    own length, by more than timing noise (speed-up < SLOWER_BELOW); None when it is not, or
    nothing was timed."""
    if not latency or latency.get("speedup") is None or latency["speedup"] >= SLOWER_BELOW:
        return None
    cross = latency.get("crossover") or {}
    pays = (f"; it pays from {cross['seq_len']} tokens" if cross.get("seq_len") and
            cross["seq_len"] > (latency.get("seq_len") or 0) else "")
    who = ("the result (no rewrite was kept: the original through its traced graph)"
           if (latency.get("sweep") or {}).get("note") else "the rewritten model")
    return (f"{who} is SLOWER than the original at the recipe's length "
            f"({latency.get('seq_len')} tokens, batch {latency.get('batch')}): {latency['speedup']:.2f}× "
            f"the speed ({latency['before_ms']:.1f} ms → {latency['after_ms']:.1f} ms){pays}")


def pairs_text(row: dict) -> str:
    """How a latency row was measured: its timed pairs and their spread, flagged when over the noise."""
    s = row.get("spread")
    spread = "" if s is None else (f", spread {s:.1%}" if s <= STABLE_SPREAD else
                                   f", [yellow]unsettled: spread {s:.1%}[/] (a loaded machine?)")
    return f"median of {row['pairs']} interleaved pair{'s' if row['pairs'] != 1 else ''}{spread}"


def sweep_line(sweep: dict) -> str:
    """One line of the report on how the latency entry was timed: its seconds against the budget, the
    timed pairs, the main entry's batch cut and the no-rewrite note."""
    cut = sweep.get("main_batch")
    rows = f"; main entry on {cut['rows']} of the batch's {cut['of']} rows ({cut['why']})" if cut else ""
    note = "; no rewrite was kept, so only the recipe's length" if sweep.get("note") else ""
    return (f"{sweep.get('seconds', 0):.1f} s (budget {sweep.get('budget_s', 0):g} s): "
            f"{sweep.get('pairs', 0)} timed pairs, each row after a warm-up pair{rows}{note}")


def unique_numel(module: torch.nn.Module) -> int:
    """Floating-point parameters and buffers, each storage counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = ("disk", id(t)) if offload.is_offloaded(t) else (t.data_ptr(), t.numel())
        if key not in seen and t.is_floating_point():
            seen.add(key)
            total += t.numel()
    return total


# ---- memory ---------------------------------------------------------------------------------------

def _rss() -> int | None:
    """Resident bytes of this process now (/proc/self/statm; None where there is no /proc)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def _maxrss() -> int | None:
    """The process's peak resident bytes so far (getrusage ru_maxrss: KiB on Linux, bytes on macOS)."""
    try:
        import resource
        import sys
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    except (ImportError, OSError, ValueError):
        return None


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (tied and viewed tensors counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if offload.holds_data(t):
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


class MemoryMeter:
    """Peak resident memory of the process while a block runs (`with MemoryMeter() as m: ...`;
    then `m.result(model, gm)`). Exact where the block raised the process's lifetime peak (getrusage
    ru_maxrss grew: the peak is that), else the maximum of /proc/self/statm sampled every
    `every` seconds by a daemon thread (a peak shorter than that can be missed; `method` says which).
    Only reads process statistics: never resets them (so /usr/bin/time still sees the true peak)."""

    def __init__(self, every: float = 0.005):
        self.every, self.peak, self.start = every, None, None
        self._stop, self._thread, self._maxrss0 = threading.Event(), None, None

    def __enter__(self) -> "MemoryMeter":
        self.start = self.peak = _rss()
        self._maxrss0 = _maxrss()
        if self.start is not None:
            self._thread = threading.Thread(target=self._sample, name="rewriter-memory", daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            now = _rss()
            if now is not None and now > self.peak:
                self.peak = now

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        now = _rss()
        if now is not None and self.peak is not None:
            self.peak = max(self.peak, now)

    def result(self, model: torch.nn.Module, gm: torch.nn.Module | None = None) -> dict:
        """The report's `memory` entry: the peak during the block, the resident bytes at its start,
        the bytes of `model`'s weights (parameters and buffers, each storage once) and of the traced
        graph's: shared with `model` and its own (what the rewrites added). With weights offloaded
        to disk, also their bytes and the most of them that were in memory at once."""
        maxrss = _maxrss()
        exact = maxrss is not None and self._maxrss0 is not None and maxrss > self._maxrss0
        peak = maxrss if exact else self.peak
        if peak is None:
            return {}
        user = [*model.parameters(), *model.buffers()]
        theirs = {t.untyped_storage().data_ptr() for t in user if offload.holds_data(t)}
        graph = [*gm.parameters(), *gm.buffers()] if gm is not None else []
        shared = [t for t in graph if offload.holds_data(t) and t.untyped_storage().data_ptr() in theirs]
        own = [t for t in graph if offload.holds_data(t) and t.untyped_storage().data_ptr() not in theirs]
        disk = offload.offloaded_bytes(gm) if gm is not None else 0
        return {**({"offloaded_bytes": disk, "offloaded_resident_peak_bytes": offload.resident_peak()}
                   if disk else {}),"peak_rss_bytes": int(peak), "start_rss_bytes": self.start,
                "weights_bytes": storage_bytes(user), "graph_shared_bytes": storage_bytes(shared),
                "graph_private_bytes": storage_bytes(own),
                "method": "getrusage ru_maxrss (the process peak, reached during optimize)" if exact else
                          f"/proc/self/statm sampled every {self.every * 1e3:g} ms"}


def generation_line(g: dict) -> str:
    """One line of the report's `generation` entry: the KV cache per token before and after, and why
    not where the rewritten model cannot be lowered."""
    if g.get("error"):
        return f"cannot generate: {g['error']}"
    before, after = g["kv_bytes_per_token_before"], g["kv_bytes_per_token_after"]
    forms = ", ".join(f"{n} {k}" for k, n in g.get("forms", {}).items() if n)
    cut = f" ({1 - after / before:.0%} less)" if before and after < before else ""
    fixed = " (linear and hybrid sites keep a fixed-size state instead)" \
        if set(g.get("forms", {})) - {"kv", "dropped"} else ""
    return f"KV cache {before:,} → {after:,} bytes per token per row{cut}; sites: {forms}{fixed}"


def memory_line(m: dict) -> str:
    """One line for the rich report: peak RSS, what the process held before, the weights."""
    gb = lambda b: f"{b / 2**30:.2f} GB" if b >= 2**28 else f"{b / 2**20:.1f} MB"  # noqa: E731
    start = f" ({gb(m['start_rss_bytes'])} before)" if m.get("start_rss_bytes") else ""
    disk = (f"; {gb(m['offloaded_bytes'])} offloaded to disk, at most "
            f"{gb(m.get('offloaded_resident_peak_bytes', 0))} of it in memory at once"
            if m.get("offloaded_bytes") else "")
    return (f"{gb(m['peak_rss_bytes'])} peak RSS{start}; weights {gb(m.get('weights_bytes', 0))} "
            f"({gb(m.get('graph_shared_bytes', 0))} shared with the result, which adds "
            f"{gb(m.get('graph_private_bytes', 0))}){disk}")


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
    memory: dict = field(default_factory=dict)
    flops_per_token: dict = field(default_factory=dict)      # whole model {before, after}: sympy in N
    predicted_speedup: dict = field(default_factory=dict)    # {length: FLOPs before / after}
    cost: dict = field(default_factory=dict)                 # unknown_ops, symbols, fixed_sizes
    world_size: int = 1                                      # processes that shared the forward passes
    generation: dict = field(default_factory=dict)           # decode state per token (causal LMs)

    def __post_init__(self):
        warning = latency_warning(self.latency)
        if warning and warning not in self.notes:
            self.notes = [*self.notes, warning]

    def to_dict(self) -> dict:
        return {
            "model": self.model, "kind": self.kind,
            "sites": [s.summary() for s in self.sites],
            "records": [r.to_dict() if hasattr(r, "to_dict") else dict(r) for r in self.records],
            "params_before": self.params_before, "params_after": self.params_after,
            "attention_flops_per_token": {"before": str(self.flops_before), "after": str(self.flops_after)},
            **({"flops_per_token": {k: str(v) for k, v in self.flops_per_token.items()},
                "predicted_speedup": {str(k): v for k, v in self.predicted_speedup.items()},
                "cost": self.cost} if self.flops_per_token else {}),
            "latency": self.latency, "heldout": self.heldout, "gate": self.gate,
            "calibration": self.calibration, "stop_reason": self.stop_reason,
            "canonicalized": self.canonicalized, "notes": self.notes, "seconds": round(self.seconds, 2),
            **({"memory": self.memory} if self.memory else {}),
            "world_size": self.world_size,
            **({"generation": self.generation} if self.generation else {}),
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
                    "seconds", "memory", "cost", "world_size", "generation")
        whole = {k: v if isinstance(v, sympy.Basic) else parse_flops(v, "report.json", f"flops_per_token.{k}")
                 for k, v in d.get("flops_per_token", {}).items()}
        predicted = {int(k): v for k, v in d.get("predicted_speedup", {}).items()}
        return cls(d["model"], d["kind"], sites, d["records"], d["params_before"], d["params_after"],
                   f["before"], f["after"], **{k: d[k] for k in optional if k in d},
                   flops_per_token=whole, predicted_speedup=predicted)

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
        if self.flops_per_token:
            f = self.flops_per_token
            s.add_row("FLOPs/token, whole model", f"{f['before']} → {f['after']}")
            unknown = sorted({op for ops in self.cost.get("unknown_ops", {}).values() for op in ops})
            if unknown:
                s.add_row("ops without a FLOP count", ", ".join(unknown))
        if self.predicted_speedup:
            s.add_row("predicted speed-up (FLOPs before / after)", ", ".join(
                f"{v:.2f}× at {k}" for k, v in sorted(self.predicted_speedup.items()) if v is not None))
        if self.latency:
            L = self.latency
            text = self.kind in ("encoder", "causal_lm") or not L.get("input_shape")
            where = (f"batch {L.get('batch')}, {L.get('seq_len')} tokens" if text
                     else f"input {'×'.join(map(str, L['input_shape']))}")
            pred = (f"; predicted {L['predicted_speedup']:.2f}×" if L.get("predicted_speedup") else "")
            pairs = f"; {pairs_text(L)}" if L.get("pairs") else ""
            s.add_row(f"latency ({where})",
                      f"{L['before_ms']:.1f} ms → {L['after_ms']:.1f} ms ({L['speedup']:.2f}× the speed: "
                      f"{'faster' if L['speedup'] >= 1 else '[bold red]SLOWER[/]'}{pred}{pairs})")
            if L.get("sweep"):
                s.add_row("latency timing", sweep_line(L["sweep"]))
            if L.get("crossover") and not L.get("sweep", {}).get("note"):   # note: no rewrite kept
                c = L["crossover"]
                s.add_row("rewrite pays from", f"{c['seq_len']} tokens ({c['why']})" if c.get("seq_len")
                          else f"[red]no measured length[/] ({c['why']})")
        if self.heldout.get("skipped"):
            s.add_row(f"held-out {self.heldout['metric']}", f"not run: {self.heldout['skipped']}")
        elif self.heldout:
            h = self.heldout
            worst = f", worst {h['worst']:.4f}" if h.get("worst") is not None else ""
            s.add_row(f"held-out {h['metric']}", f"{h['value']:.4f}{worst} ({'ok' if h.get('ok') else 'OUT OF BOUND'})")
        c = self.calibration
        if c:
            judged = (f"{c['validation_batches']} validation batches (never fitted on)"
                      if c.get("validation_batches") else "the calibration batches")
            kinds = sorted({x["text"] for x in c.get("sets", {}).get("calibration", [])})
            lengths = c.get("lengths") or [c.get("seq_len")]
            s.add_row("calibration", f"{c.get('samples')} samples × {c.get('seq_len')} tokens (spread as tokens) from "
                                     f"{c.get('source')}{' (' + ', '.join(kinds) + ')' if len(kinds) > 1 else ''} "
                                     f"at {', '.join(map(str, lengths))} tokens; gate judged on {judged}"
                                     f"{', per kind and length, the worst deciding' if len(kinds) * len(lengths) > 1 else ''}")
        applied = sum(r["status"] == "applied" for r in d["records"])
        s.add_row("applied / decisions", f"{applied} / {len(d['records'])}")
        s.add_row("stopped because", self.stop_reason)
        s.add_row("processes", "1" if self.world_size == 1 else
                  f"{self.world_size} (data parallel: batches shared out, results gathered; "
                  "latency on rank 0)")
        if self.memory.get("peak_rss_bytes"):
            s.add_row("peak memory", memory_line(self.memory))
        if self.generation:
            s.add_row("generation", generation_line(self.generation))
        yield s
        if self.latency.get("by_length"):
            t = Table(title="latency across lengths (batch 1, original and rewritten interleaved)")
            for col in ("tokens", "before ms", "after ms", "measured ×", "predicted ×", "pairs"):
                t.add_column(col, justify="right")
            for r in self.latency["by_length"]:
                p = r.get("predicted_speedup")
                t.add_row(str(r["seq_len"]), f"{r['before_ms']:.1f}", f"{r['after_ms']:.1f}",
                          f"{'[red]' if r['speedup'] < 1 else ''}{r['speedup']:.2f}×",
                          "-" if p is None else f"{p:.2f}×", str(r.get("pairs", "-")))
            yield t
            skipped: dict = {}
            for x in self.latency.get("sweep", {}).get("skipped", []):
                skipped.setdefault(x["why"], []).append(str(x["seq_len"]))
            for why, ns in skipped.items():
                yield f"[dim]latency not timed at {', '.join(ns)} tokens: {why}[/dim]"
        if self.heldout.get("groups"):
            h = Table(title=f"held-out {self.heldout['metric']} by kind of text and length (the worst decides)")
            for col in ("text", "tokens", "value", "worst sample", "within bound"):
                h.add_column(col, justify="right" if col in ("tokens", "value", "worst sample") else "left")
            for g in self.heldout["groups"]:
                h.add_row(g["text"], str(g["tokens"]), f"{g['value']:.4f}",
                          "-" if g.get("worst") is None else f"{g['worst']:.4f}",
                          "[green]yes[/]" if g.get("ok") else f"[red]no[/]: {g.get('why', '')}")
            yield h
        for n in self.notes:
            yield (f"[bold red]warning: {n}[/]" if n == latency_warning(self.latency)
                   else f"[dim]note: {n}[/dim]")

    def __str__(self) -> str:
        import io

        from rich.console import Console
        c = Console(width=140, file=io.StringIO(), no_color=True)
        c.print(self)
        return c.file.getvalue()
