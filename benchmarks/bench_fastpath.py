"""causal_fastpath on SmolLM2: HF eager vs the traced graph vs the traced graph with the exact
fused-causal swap, and the same with LLM-Drop's 6 drops on top (the drop benchmark's layers).

    python benchmarks/bench_fastpath.py [--threads 2] [--repeats 5] [--lengths 512 2048] [--skip-drops] [--out F]

All models interleaved in one process (median of --repeats calls after a warm-up each), batch 1, no
padding; wall and process CPU time per call (CPU time is what a VM's steal does not inflate).
Writes benchmarks/results/fastpath_smollm2.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rewriter import optimize                                  # noqa: E402
from rewriter.api import _prepare                              # noqa: E402
from rewriter.models import load_model                         # noqa: E402
from bench_speed import latency_both                           # noqa: E402  (same folder)

OUT = Path(__file__).parent / "results"
DROPS = [26, 25, 28, 29, 7, 6]          # bench_drop.py's SmolLM2 ranking, 6 attention drops
CAL = {"samples": 4, "seq_len": 64, "batch_size": 4, "heldout": 0}
EXACT = {"metric": "relative_rms", "max": 1e-4}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--skip-drops", action="store_true", help="time eager, traced and traced+fastpath only")
    ap.add_argument("--out", default=str(OUT / "fastpath_smollm2.json"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    L = load_model("smollm2")
    traced, _, _, _ = _prepare(L, L.example_inputs(batch=1, seq_len=64))
    fast = optimize(L, {"calibration": CAL, "gate": EXACT, "steps": [{"causal_fastpath": {}}]},
                    progress=False, measure_latency=False)
    models = {"hf_eager": L.model, "traced": traced, "traced+fastpath": fast}
    if not args.skip_drops:
        loose = {"metric": "perplexity_ratio", "max": 100.0}        # the drops are chosen, not gated, here
        for name, steps in (("drop6", [{"drop_attention": {"layers": DROPS}}]),
                            ("drop6+fastpath", [{"drop_attention": {"layers": DROPS}}, {"causal_fastpath": {}}])):
            models[name] = optimize(L, {"calibration": CAL, "gate": loose, "steps": steps}, progress=False,
                                    measure_latency=False)
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__, "drops": DROPS, "by_length": {}}
    for n in args.lengths:
        batch = L.example_inputs(batch=1, seq_len=n)
        with torch.no_grad():
            ref = L.main_output(L.model(**batch))
            err = (L.main_output(fast(**batch)) - ref).abs().max().item()
            ms, cpu = latency_both(list(models.values()), batch, args.repeats)
        row = {name: round(t, 1) for name, t in zip(models, ms)}
        row["cpu_ms"] = {name: round(t, 1) for name, t in zip(models, cpu)}
        row["speedup_vs_hf_eager"] = {name: round(ms[0] / t, 3) for name, t in zip(models, ms)}
        row["cpu_speedup_vs_hf_eager"] = {name: round(cpu[0] / t, 3) for name, t in zip(models, cpu)}
        row["fastpath_max_abs_logit_diff"] = err
        res["by_length"][n] = row
        print(f"{n:>5} tokens: " + ", ".join(f"{k} {v:.0f} ms ({ms[0] / v:.2f}×)" for k, v in zip(models, ms)),
              f"| fastpath max |Δlogit| {err:.1e}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
