"""NormLin (OLinear, arXiv:2505.08550) on the two fixed-token subjects: accuracy / forecast error,
parameters, attention FLOPs and measured latency, before and after, per layer and on all layers.

    python benchmarks/bench_normlin.py                # both subjects, 30 latency repeats (~5 min)
    python benchmarks/bench_normlin.py --repeats 10

- digits_vit: top-1 accuracy on the 359 held-out scikit-learn digits (never trained or calibrated on).
- forecaster: MSE / MAE (standardized log prices) on the 112 test windows of Stocks.csv (forecast
  months after every training month), with the naive last-value forecast for scale.

Each configuration is run twice: "raw" with an open gate (the rewrite's own effect, nothing rolled
back) and "gated" with the project's default gate for the kind (vision: top1_agreement >= 0.95;
generic: relative_rms <= 0.05, on calibration inputs), which keeps only the sites that pass.
Latency: original and rewritten called interleaved in one process on one thread (median of
--repeats; ViT batch 64 images, forecaster 112 windows), so machine load affects both alike.
Writes benchmarks/results/normlin.json and normlin.png and prints a table.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from rewriter import optimize
from rewriter.models import load_model
from rewriter.models.digits_vit import accuracy, digits_split
from rewriter.models.forecaster import forecast_error, forecaster_calibration, windows

OUT = Path(__file__).parent / "results"


@torch.no_grad()
def side_by_side(a, b, batch, repeats):
    """Median ms per call of a and b, interleaved, on one CPU thread (2 shared cores: one thread
    measured far steadier than two contended ones)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a(**batch), b(**batch)
        ta, tb = [], []
        for _ in range(repeats):
            t = time.perf_counter(); a(**batch); ta.append(time.perf_counter() - t)
            t = time.perf_counter(); b(**batch); tb.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(ta) * 1e3, statistics.median(tb) * 1e3


def subject_runs(name, loaded, layers, gate_raw, gate, recipe_extra, calibration, score, batch, repeats):
    rows = []
    base = score(loaded.model)
    for which in [str(i) for i in range(layers)] + ["all"]:
        for mode, g in (("raw", gate_raw), ("gated", gate)):
            recipe = {"gate": g, "steps": [{"normlin": {} if which == "all" else {"layers": which}}], **recipe_extra}
            t = time.perf_counter()
            opt = optimize(loaded, recipe, calibration=calibration, progress=False, measure_latency=False)
            fit_s = time.perf_counter() - t
            recs = opt.report.records
            before_ms, after_ms = side_by_side(loaded.model, opt, batch, repeats)
            row = {"model": name, "layers": which, "mode": mode, "before": base, "after": score(opt),
                   "applied": [r.site for r in recs if r.status == "applied"],
                   "rolled_back": [r.site for r in recs if r.status == "rolled_back"],
                   "gate_metric_after": [round(r.metric_after, 5) for r in recs if r.metric_after is not None],
                   "params_before": opt.report.params_before, "params_after": opt.report.params_after,
                   "attn_flops_per_token_before": str(opt.report.flops_before),
                   "attn_flops_per_token_after": str(opt.report.flops_after),
                   "batch": int(next(iter(batch.values())).shape[0]),
                   "before_ms": round(before_ms, 3), "after_ms": round(after_ms, 3),
                   "speedup": round(before_ms / after_ms, 3), "optimize_seconds": round(fit_s, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows):
    head = f"{'model':<11}{'layers':<7}{'mode':<6}{'applied':<14}{'before':>22}{'after':>22}{'params':>16}{'ms before':>11}{'ms after':>10}{'speedup':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        fmt = (lambda v: f"acc {v:.4f}") if r["model"] == "digits_vit" else (lambda v: f"mse {v['mse']:.4f}")
        print(f"{r['model']:<11}{r['layers']:<7}{r['mode']:<6}{str(r['applied']):<14}{fmt(r['before']):>22}"
              f"{fmt(r['after']):>22}{str(r['params_before']) + '→' + str(r['params_after']):>16}"
              f"{r['before_ms']:>11.3f}{r['after_ms']:>10.3f}{r['speedup']:>9.3f}")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, name, key, label in ((axes[0], "digits_vit", None, "held-out top-1 accuracy"),
                                 (axes[1], "forecaster", "mse", "test MSE (standardized)")):
        rs = [r for r in rows if r["model"] == name]
        labels = sorted({r["layers"] for r in rs}, key=lambda s: (s == "all", s))
        val = (lambda v: v) if key is None else (lambda v: v[key])
        x = range(len(labels))
        for off, mode, color in ((-0.2, "raw", "tab:orange"), (0.2, "gated", "tab:green")):
            ys = [val(next(r for r in rs if r["layers"] == lab and r["mode"] == mode)["after"]) for lab in labels]
            ax.bar([i + off for i in x], ys, width=0.4, label=f"normlin ({mode})", color=color)
        ax.axhline(val(rs[0]["before"]), color="k", ls="--", label="original")
        if name == "forecaster":
            ax.axhline(rs[0]["before"]["naive_mse"], color="gray", ls=":", label="naive last value")
        else:
            ax.set_ylim(0, 1)
        ax.set_xticks(list(x), [f"layer {lab}" if lab != "all" else "all layers" for lab in labels])
        ax.set_title(f"{name}: {label}")
        ax.legend(fontsize=8)
    fig.suptitle("NormLin (OLinear) on fixed-token subjects — raw effect vs gated")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=30)
    a = p.parse_args()
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []

    vit = load_model("digits_vit")
    _, (xh, yh) = digits_split()
    rows += subject_runs("digits_vit", vit, 4, {"metric": "top1_agreement", "min": 0.0},
                         {"metric": "top1_agreement", "min": 0.95},
                         {"calibration": {"samples": 256, "batch_size": 64, "heldout": 64}}, None,
                         lambda m: accuracy(m, xh, yh), {"pixel_values": xh[:64]}, a.repeats)

    fc = load_model("forecaster")
    cal = forecaster_calibration(samples=128, batch_size=32, heldout=64)
    past, _ = windows("test")
    rows += subject_runs("forecaster", fc, 2, {"metric": "relative_rms", "max": 1e9},
                         {"metric": "relative_rms", "max": 0.05}, {}, cal,
                         lambda m: forecast_error(m), {"past_values": past}, a.repeats)

    meta = {"command": "python benchmarks/bench_normlin.py", "repeats": a.repeats,
            "latency_threads": 1, "device": "cpu",
            "digits_vit": {k: vit.extra[k] for k in ("train_accuracy", "heldout_accuracy", "train_seconds")},
            "forecaster": {k: fc.extra[k] for k in ("train", "test", "train_seconds")}}
    (OUT / "normlin.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, OUT / "normlin.png")
    print()
    table(rows)
    print(f"\nwrote {OUT / 'normlin.json'} and {OUT / 'normlin.png'}")


if __name__ == "__main__":
    main()
