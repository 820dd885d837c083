"""Whole-model speed of every rule's recipe against the original, measured beside predicted.

    python benchmarks/bench_speed.py [--quick] [--threads 1] [--repeats 3] [--only minilm|smollm2]

Cases (issue 15): MiniLM 1 × 512 and 8 × 128, SmolLM2 1 × 2048 and 1 × 8192. For each model every
rule's recipe runs with the gate open (a bound nothing fails), so every site it can rewrite is
rewritten; the original (the HF model, eager) and all the rewritten models are timed interleaved in
one process (rewriter.report.latency_ms's protocol: median of --repeats calls after a warm-up each;
`measured` from wall time, `measured_cpu` from this process's CPU time, which other jobs on a shared
machine do not inflate), batch of real tokens, no padding. Fitted parameters do not change the
run-time graph, so the rules that fit (hedgehog feature maps) run with `steps: 0` (the identity
initialization) to keep the bench short;
SmolLM2's recipes that leave softmax sites (drop, MASA) end with the exact `causal_fastpath`, as a
deployment would, and `traced` / `traced+fastpath` are the graph with no rule and with the swap alone.

Predicted (whole model): rewriter.cost's FLOPs of every node of the original and the rewritten graph
(sympy in N, at the case's batch and length); if that count fails, the Amdahl estimate from the
report's attention FLOPs (projections + cores) plus 2·params of every nn.Linear outside the attention
projections (MLP, LM head), the same before and after (`prediction` in the JSON says which).
Targets (issue 15, "Done means"), each judged on wall and on CPU time: each rule ≥ 0.85× of its
predicted ratio where that is > 1.1×; hedgehog linear attention ≥ 1.4× and block routing ≥ 1.15× the
original on SmolLM2 at 8192; the traced SmolLM2 with causal_fastpath ≥ 1.0× eager at 2048 and 8192.
`--quick`: SmolLM2 only the targeted recipes at 2048, one timed call each, and at 8192 the attention
core of one layer (`layer_8192`) instead of whole forwards (a forward at 8192 takes minutes here).

Per layer (`layer_<n>`, SmolLM2's shapes: 9 query heads, K/V reaching SDPA repeated to 9 heads as
in the traced HF graph, head_dim 64): SDPA with is_causal (eager HF) and with the [1, 1, T, T]
bool mask (the traced graph), the hedgehog + window op with its feature maps, block routing with
its routing; wall and process-CPU ms (the CPU time is what contention from other processes does
not inflate), and the layer's projections + MLP and the LM head, from which `projected` gives the
whole-model ratio those per-layer times imply (Amdahl over 30 layers; a projection, not a forward).
Writes benchmarks/results/speed.json and speed.png.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rewriter import optimize                                  # noqa: E402
from rewriter.api import _prepare                              # noqa: E402
from rewriter.models import load_model                         # noqa: E402
from rewriter.report import N, projection_flops_per_token   # noqa: E402

OUT = Path(__file__).parent / "results"
OPEN = {"minilm": {"metric": "embedding_cosine", "min": -1.0},
        "smollm2": {"metric": "perplexity_ratio", "max": 1e30}}
CAL = {"minilm": {"samples": 8, "seq_len": 128, "batch_size": 8, "heldout": 0},
       "smollm2": {"samples": 1, "seq_len": 256, "batch_size": 1, "heldout": 0}}
FAST = {"causal_fastpath": {}}
RECIPES = {            # name -> steps (examples/recipes/*.yaml, the fits shortened: the graph is the same)
    "minilm": {
        "drop_attention": [{"drop_attention": {"max_layers": 2, "compensate": "mean"}}],
        "agent_attention": [{"agent_attention": {"agents": 16, "position_bias": 2.0}}],
        "linear_elu1": [{"linear_attention": {"feature_map": "elu1"}}],
        "linear_hedgehog": [{"linear_attention": {"feature_map": "hedgehog", "feature_dim": 64, "steps": 0}}],
        "block_routing": [{"block_routing": {"keep": 0.25}}],
        "masa": [{"masa": {"projections": ["q", "k", "v", "o"], "atoms": {"q": 3, "k": 3, "v": 4, "o": 4},
                           "reduction": 0.2}}],
    },
    "smollm2": {
        "traced": [],
        "causal_fastpath": [FAST],
        "drop_attention": [{"drop_attention": {"max_layers": 4}}, FAST],
        "linear_hedgehog": [{"linear_attention": {"feature_map": "hedgehog", "feature_dim": 64, "window": 64,
                                                  "steps": 0}}],
        "block_routing": [{"block_routing": {"block_size": 64, "keep": 0.25}}],
        "masa": [{"masa": {"projections": ["q", "k", "v", "o"], "reduction": 0.2}}, FAST],
    },
}
CASES = [("minilm", 1, 512), ("minilm", 8, 128), ("smollm2", 1, 2048), ("smollm2", 1, 8192)]
QUICK = ("traced", "causal_fastpath", "linear_hedgehog", "block_routing")    # --quick: SmolLM2's targeted


def build(loaded, model: str, steps: list) -> tuple:
    """(the rewritten model or the bare trace, its report or None, seconds)."""
    t0 = time.perf_counter()
    if not steps:
        traced, _, _, _ = _prepare(loaded, loaded.example_inputs(batch=1, seq_len=64))
        return traced, None, time.perf_counter() - t0
    opt = optimize(loaded, {"calibration": CAL[model], "gate": OPEN[model], "steps": steps},
                   progress=False, measure_latency=False)
    return opt, opt.report, time.perf_counter() - t0


def _linear_flops(loaded, sites) -> int:
    """2·params of every nn.Linear, minus the attention projections the report already counts."""
    lin = sum(m.weight.numel() for m in loaded.model.modules() if isinstance(m, torch.nn.Linear))
    return 2 * lin - sum(int(projection_flops_per_token(s)) for s in sites)


_BEFORE: dict = {}


def predictor(loaded, opt, n: int, batch: int) -> tuple[float, str]:
    """(predicted whole-model speed-up at batch × n, the method): rewriter.cost's FLOPs of every node of
    the original and the rewritten graph (sympy in N), else the Amdahl estimate (module docstring)."""
    report = opt.report
    try:
        from rewriter.cost import graph_flops, predicted
        key = (loaded.name, batch)
        if key not in _BEFORE:
            traced, _, _, _ = _prepare(loaded, loaded.example_inputs(batch=1, seq_len=64))
            _BEFORE[key] = graph_flops(traced, batch=batch)
        before = _BEFORE[key]
        after = graph_flops(opt.graph_module, symbols=before.symbols, batch=batch, hint=n)
        return float(predicted(before, after, n)), "rewriter.cost (whole-graph FLOPs, every node)"
    except Exception as e:  # noqa: BLE001 (the count failed: say why, fall back)
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    rest = _linear_flops(loaded, report.sites)
    ratio = (report.flops_before + rest) / (report.flops_after + rest)
    return float(ratio.subs(N, n)), f"amdahl (rewriter.cost failed: {why}): attention FLOPs + 2·linears"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared box)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="SmolLM2 at 8192: the targeted recipes, 1 call each")
    ap.add_argument("--only", choices=["minilm", "smollm2"], default=None)
    ap.add_argument("--out", default=str(OUT / "speed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": platform.processor() or
           platform.machine(), "cores": os.cpu_count(), "repeats": args.repeats, "quick": args.quick,
           "recipes": RECIPES, "cases": []}
    for model in ("minilm", "smollm2"):
        if args.only and model != args.only:
            continue
        loaded = load_model(model)
        built = {}
        for name, steps in RECIPES[model].items():
            if args.quick and model == "smollm2" and name not in QUICK:
                continue
            m, rep, secs = build(loaded, model, steps)
            applied = None if rep is None else sum(r.status == "applied" for r in rep.records
                                                   if r.site is not None)
            built[name] = (m, rep, {"sites_rewritten": applied, "of": None if rep is None else len(rep.sites),
                                    "build_seconds": round(secs, 1)})
            print(f"{model} {name}: {applied} sites rewritten, built in {secs:.0f} s", flush=True)
        for case_model, batch, n in CASES:
            if case_model != model:
                continue
            if model == "smollm2" and args.quick and n == 8192:
                res[f"layer_{n}"] = layer(loaded, n)
                print(f"layer at {n}: " + json.dumps(res[f"layer_{n}"]), flush=True)
                write(res, Path(args.out))
                continue
            quick = args.quick and model == "smollm2"
            names = [k for k in built if not quick or k in QUICK]
            repeats = 1 if quick else args.repeats
            inputs = loaded.example_inputs(batch=batch, seq_len=n)
            t0 = time.perf_counter()
            with torch.no_grad():
                ms, cpu = latency_both([loaded.model] + [built[k][0] for k in names], inputs, repeats)
            case = {"model": model, "batch": batch, "seq_len": n, "original_ms": round(ms[0], 1),
                    "original_cpu_ms": round(cpu[0], 1), "repeats": repeats,
                    "seconds": round(time.perf_counter() - t0), "rules": {}}
            for k, t, c in zip(names, ms[1:], cpu[1:]):
                _, rep, info = built[k]
                row = {"ms": round(t, 1), "measured": round(ms[0] / t, 3), "cpu_ms": round(c, 1),
                       "measured_cpu": round(cpu[0] / c, 3), **info}
                if rep is not None:
                    pred, how = predictor(loaded, built[k][0], n, batch)
                    row.update(predicted=round(pred, 3), prediction=how,
                               attention_flops_ratio=round(float(
                                   (rep.flops_before / rep.flops_after).subs(N, n)), 3))
                    row["of_predicted"] = round(row["measured"] / row["predicted"], 3)
                case["rules"][k] = row
            res["cases"].append(case)
            print(f"{model} {batch}×{n}: original {ms[0]:.0f} ms | " + ", ".join(
                f"{k} {r['measured']:.2f}× wall {r['measured_cpu']:.2f}× cpu "
                f"(pred {r.get('predicted', 1.0):.2f}×)"
                for k, r in case["rules"].items()),
                flush=True)
            res["targets"] = targets(res["cases"])
            write(res, Path(args.out))
    res["targets"] = targets(res["cases"])
    write(res, Path(args.out))


def latency_both(models: list, batch: dict, repeats: int) -> tuple[list[float], list[float]]:
    """rewriter.report.latency_ms's protocol (a warm-up call each, then the models interleaved, the
    median of `repeats` calls) with the process-CPU time of each call beside the wall time: on a
    machine shared with other jobs the wall time also counts the time this process waits for a core."""
    import statistics
    for m in models:
        m(**batch)
    wall, cpu = [[] for _ in models], [[] for _ in models]
    for _ in range(repeats):
        for i, m in enumerate(models):
            w, c = time.perf_counter(), time.process_time()
            m(**batch)
            wall[i].append((time.perf_counter() - w) * 1e3)
            cpu[i].append((time.process_time() - c) * 1e3)
    return [statistics.median(t) for t in wall], [statistics.median(t) for t in cpu]


def _both(fn, repeats: int = 2) -> tuple[float, float]:
    """(wall ms, process-CPU ms): medians after a warm-up."""
    import statistics
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - w) * 1e3)
        cpu.append((time.process_time() - c) * 1e3)
    return round(statistics.median(wall), 1), round(statistics.median(cpu), 1)


REWRITTEN = ("sdpa_bool_mask", "linear_hedgehog_w64", "block_routing_keep0.25")


@torch.no_grad()
def layer(loaded, n: int) -> dict:
    """One SmolLM2 layer's attention core at n tokens, original and rewritten, and the rest of the
    model (module docstring), with the whole-model ratios they imply."""
    import torch.nn.functional as F
    from rewriter.kernels import routed_attention as RA
    from rewriter.patterns._feature_maps import hedgehog, hedgehog_init
    cfg = loaded.model.config
    H, d, L = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.num_hidden_layers
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, H, n, d, generator=g) for _ in range(3))
    mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    wq, bq = hedgehog_init(H, d, 64, 0)
    wk, bk = hedgehog_init(H, d, 64, 1)
    mix = torch.ones(H)
    route = dict(block_size=64, topk=None, keep_permille=250, causal=True, sinks=("first", "previous"),
                 route_by="own", scale=d ** -0.5, affinity="sampled", samples=16, sample_rows="mixed")
    x = torch.randn(1, n, cfg.hidden_size, generator=g)
    blk = loaded.model.model.layers[0]
    at = blk.self_attn
    ops = {
        "sdpa_is_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        "sdpa_bool_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        "linear_hedgehog_w64": lambda: torch.ops.rewriter.hybrid_window_attention(
            q, k, v, hedgehog(q, wq, bq), hedgehog(k, wk, bk), 64, d ** -0.5, mix, None, 1e-6),
        "block_routing_keep0.25": lambda: RA.block_routed_attention(q, k, v, None, **route),
        "projections_mlp": lambda: (at.o_proj(at.q_proj(x)), at.k_proj(x), at.v_proj(x), blk.mlp(x)),
        "lm_head": lambda: loaded.model.lm_head(x),
    }
    t = {name: _both(fn) for name, fn in ops.items()}
    out = {"ms_wall_cpu": t}
    for i, clock in enumerate(("wall", "cpu")):
        rest = L * t["projections_mlp"][i] + t["lm_head"][i]
        base = L * t["sdpa_is_causal"][i] + rest
        out[f"projected_{clock}"] = {name: round(base / (L * t[name][i] + rest), 3)
                                     for name in REWRITTEN}
        out[f"attention_core_speedup_{clock}"] = {
            name: round(t["sdpa_is_causal"][i] / t[name][i], 3)
            for name in REWRITTEN}
    return out


def targets(cases: list) -> list:
    """The issue's targets, each with the values reached (wall and CPU time) and whether they are met."""
    out = []

    def add(target, where, wall, cpu, bound):
        out.append({"target": target, "where": where, "reached_wall": wall, "reached_cpu": cpu,
                    "met_wall": wall >= bound, "met_cpu": cpu >= bound})

    for c in cases:
        where = f"{c['model']} {c['batch']}×{c['seq_len']}"
        for k, r in c["rules"].items():
            if r.get("predicted", 0) > 1.1:
                wall, cpu = (round(r[m] / r["predicted"], 3) for m in ("measured", "measured_cpu"))
                add(f"{k} ≥ 0.85× of predicted {r['predicted']}×", where, wall, cpu, 0.85)
        if c["model"] == "smollm2" and c["seq_len"] == 8192:
            for k, bound in (("linear_hedgehog", 1.4), ("block_routing", 1.15)):
                if k in c["rules"]:
                    r = c["rules"][k]
                    add(f"{k} ≥ {bound}× the original", where, r["measured"], r["measured_cpu"], bound)
        if c["model"] == "smollm2" and "causal_fastpath" in c["rules"]:
            r = c["rules"]["causal_fastpath"]
            add("traced + causal_fastpath ≥ 1.0× eager", where, r["measured"], r["measured_cpu"], 1.0)
    return out


def write(res: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=2, default=str))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    cases = res["cases"]
    layers = sorted(k for k in res if k.startswith("layer_"))
    panels = len(cases) + len(layers)
    fig, axes = plt.subplots(1, max(1, panels), figsize=(4.2 * max(1, panels), 4), squeeze=False)
    for ax, c in zip(axes[0], cases):
        names = list(c["rules"])
        x = range(len(names))
        bars = ((-0.27, "measured", "measured (wall)"), (0.0, "measured_cpu", "measured (CPU)"),
                (0.27, "predicted", "predicted"))
        for off, key, label in bars:
            ax.bar([i + off for i in x], [c["rules"][k].get(key, 1.0) for k in names], 0.27, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"{c['model']} {c['batch']}×{c['seq_len']}", fontsize=9)
        ax.set_ylabel("speed-up vs original")
    for ax, key in zip(axes[0][len(cases):], layers):
        lay = res[key]
        names = list(lay["projected_cpu"])
        x = range(len(names))
        for off, k, label in ((-0.2, "attention_core_speedup_cpu", "attention core (CPU)"),
                              (0.2, "projected_cpu", "whole model, projected (CPU)")):
            ax.bar([i + off for i in x], [lay[k][n] for n in names], 0.4, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
        ax.set_title(f"SmolLM2 one layer, 1×{key.split('_')[1]} (vs SDPA is_causal)", fontsize=9)
        ax.legend(fontsize=6)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
