"""linear_attention on real models: accuracy after attention transfer, calibration time, latency.

    python benchmarks/bench_linear_models.py                  # MiniLM (hedgehog, elu1) and SmolLM2
    python benchmarks/bench_linear_models.py --only minilm
    python benchmarks/bench_linear_models.py --threads 1      # torch threads (1 is fastest on a loaded box)

MiniLM: hedgehog on all 6 layers (loss `both`: Hedgehog's attention-weight KL + LoLCATs' output
MSE; feature_dim 64 with 1000 Adam steps per layer, and feature_dim 128 with 800), fitted on 256
calibration sentences and gated by embedding cosine ≥ 0.97 on 48 validation sentences the fit never
sees; the training-free elu1 swap under the same gate. The settings were chosen on the validation
sentences (MINILM_RUNS); the held-out sentences judge only the result. SmolLM2: hedgehog + a
64-token softmax window (LoLCATs) with `layers: auto`, gated by a 5 % perplexity budget judged on
validation chunks the fit never sees; perplexity on held-out text.
Latency: original and rewritten interleaved in one process (median of --repeats calls) at the
model's longest useful length, beside the ratio the report's sympy cost model predicts for the
attention FLOPs at that length (projections + attention core, summed over sites).
Writes benchmarks/results/linear_models.json and linear_models.png, and prints a table.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rewriter import optimize
from rewriter.report import latency_ms
from rewriter.gate import perplexity
from rewriter.models import load_model
from rewriter.report import N

OUT = Path(__file__).parent / "results"




def summarize(opt, wall):
    recs = [r for r in opt.report.records if r.site is not None]
    return {
        "sites": [{"site": r.site, "status": r.status, "metric_after": r.metric_after, "reason": r.reason,
                   "seconds": round(r.seconds, 1), "info": r.info} for r in recs],
        "converted": sum(r.status == "applied" for r in recs), "of": len(opt.sites),
        "heldout": opt.report.heldout, "wall_seconds": round(wall, 1),
        "calibration_seconds": round(sum(r.seconds for r in recs), 1),
        "flops_before": str(opt.report.flops_before), "flops_after": str(opt.report.flops_after)}


def latency(loaded, opt, batch, seq_len, repeats):
    inputs = loaded.example_inputs(batch=batch, seq_len=seq_len)
    before, after = latency_ms([loaded.model, opt], inputs, repeats)
    predicted = float((opt.report.flops_before / opt.report.flops_after).subs(N, seq_len))
    return {"batch": batch, "seq_len": seq_len, "before_ms": round(before, 1), "after_ms": round(after, 1),
            "measured_speedup": round(before / after, 3), "predicted_attention_flops_ratio": round(predicted, 3)}


# chosen on the 48 validation sentences (gate metric after the last site; 1 thread): f=64 output loss
# 1000 steps 0.9795, weights 0.9817, both 0.9817 (1500: 0.9820, 2000: 0.9825, cosine lr decay 0.9806);
# f=128 both 800 steps 0.9835 (f=96, 800: 0.9821). f=128 buys accuracy with feature-map FLOPs.
MINILM_RUNS = (("hedgehog", {"feature_map": "hedgehog", "feature_dim": 64, "steps": 1000, "loss": "both"}),
               ("hedgehog_f128", {"feature_map": "hedgehog", "feature_dim": 128, "steps": 800, "loss": "both"}),
               ("elu1", {"feature_map": "elu1"}))


def minilm(repeats):
    loaded = load_model("minilm")
    calib = {"samples": 256, "seq_len": 128, "batch_size": 16, "heldout": 64, "validation": 48}
    gate = {"metric": "embedding_cosine", "min": 0.97}
    out = {}
    for label, step in MINILM_RUNS:
        t = time.perf_counter()
        opt = optimize(loaded, {"calibration": calib, "gate": gate, "steps": [{"linear_attention": step}]},
                       progress=True, measure_latency=False)
        out[label] = summarize(opt, time.perf_counter() - t) | {"options": step}
        if label.startswith("hedgehog"):
            out[label]["latency"] = latency(loaded, opt, 4, 512, repeats)   # MiniLM: 512 positions
        print(opt.report)
    return out


def smollm2(repeats):
    loaded = load_model("smollm2")
    # the gate judges on 8 validation chunks the fit never sees: gated on its own 16 fitting chunks,
    # 22 layers passed the 5 % budget and held-out perplexity came out +12.3 %
    # pydoc: the bundled text holds ~8.7k calibration tokens, too few for fitting + validation chunks
    calib = {"text": "pydoc", "samples": 48, "seq_len": 256, "batch_size": 4, "heldout": 16, "validation": 16}
    # measured with the output loss, the only one before `loss` existed (the default is now "both")
    step = {"feature_map": "hedgehog", "feature_dim": 64, "window": 64, "layers": "auto", "steps": 60,
            "loss": "output"}
    t = time.perf_counter()
    opt = optimize(loaded, {"calibration": calib, "gate": {"metric": "perplexity_ratio", "max": 1.05},
                            "steps": [{"linear_attention": step}]}, progress=True, measure_latency=False)
    res = summarize(opt, time.perf_counter() - t) | {"options": step}
    from rewriter.models import make_calibration
    held = make_calibration(loaded, **calib).heldout
    with torch.no_grad():
        ppl0 = perplexity(held, [loaded.main_output(loaded.model(**b)) for b in held], loaded)
        ppl1 = perplexity(held, [loaded.main_output(opt(**b)) for b in held], loaded)
    res["heldout_perplexity"] = {"before": round(ppl0, 3), "after": round(ppl1, 3), "ratio": round(ppl1 / ppl0, 4)}
    res["latency"] = latency(loaded, opt, 1, 2048, repeats)
    print(opt.report)
    return res


def _rows(results):
    """(name, result) of every run present."""
    rows = [(f"minilm {label}", results.get("minilm", {}).get(label)) for label, _ in MINILM_RUNS]
    return [(n, r) for n, r in rows + [("smollm2 hedgehog+w64", results.get("smollm2"))] if r]


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    if "minilm" in results:
        for label, style in (("hedgehog", "o-"), ("hedgehog_f128", "^-"), ("elu1", "s--")):
            r = results["minilm"].get(label)
            if not r:
                continue
            a.plot([s["site"] for s in r["sites"]], [s["metric_after"] for s in r["sites"]], style,
                   label=f"{label}: {r['converted']}/6 kept, held-out {r['heldout']['value']:.4f}")
        a.axhline(0.97, color="grey", lw=0.8)
        a.set(title="MiniLM: gate's embedding cosine after each site (validation)", xlabel="site",
              ylabel="cosine vs original")
        a.legend()
    names, meas, pred = [], [], []
    for name, r in _rows(results):
        lat = r.get("latency")
        if lat:
            names.append(f"{name.replace(' ', chr(10))}\nN={lat['seq_len']}")
            meas.append(lat["measured_speedup"])
            pred.append(lat["predicted_attention_flops_ratio"])
    x = range(len(names))
    b.bar([i - 0.2 for i in x], meas, 0.4, label="measured end-to-end speedup")
    b.bar([i + 0.2 for i in x], pred, 0.4, label="predicted attention-FLOPs ratio")
    b.axhline(1.0, color="grey", lw=0.8)
    b.set_xticks(list(x), names)
    b.set(title="original / rewritten (CPU)")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["minilm", "smollm2"])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / (f"linear_models_{args.only}.json" if args.only else "linear_models.json")
    results = json.loads(path.read_text()) if path.exists() else {}
    results["threads"] = torch.get_num_threads()
    if args.only in (None, "minilm"):
        results["minilm"] = minilm(args.repeats)
    if args.only in (None, "smollm2"):
        results["smollm2"] = smollm2(args.repeats)
    path.write_text(json.dumps(results, indent=2, default=str))
    plot(results, path.with_suffix(".png"))
    print(f"\n{'model / map':<22}{'converted':>10}{'held-out':>22}{'calib s':>9}{'latency ms':>22}{'speedup':>9}{'predicted':>10}")
    for name, r in _rows(results):
        h = r.get("heldout_perplexity")
        held = f"ppl {h['before']}→{h['after']}" if h else f"cos {r['heldout'].get('value', float('nan')):.4f}"
        lat = r.get("latency")
        lat_s = f"{lat['before_ms']}→{lat['after_ms']}" if lat else "-"
        print(f"{name:<22}{r['converted']:>6}/{r['of']:<3}{held:>22}{r['calibration_seconds']:>9}{lat_s:>22}"
              f"{(lat or {}).get('measured_speedup', '-'):>9}{(lat or {}).get('predicted_attention_flops_ratio', '-'):>10}")
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
