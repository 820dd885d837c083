"""Held-out perplexity ratio of a rewritten SmolLM2 per kind of text and length (issue 14).

Rebuilds the decision of the drop example as it was calibrated before (bundled prose only, one
length: layers 6, 26 and 28 dropped, README) and measures it, beside the original, on the held-out
side of every kind of the calibration mix at 256 and 1024 tokens; with `--saved DIR` it measures a
saved result the same way. Writes benchmarks/results/judged.json.

    python benchmarks/bench_judged.py [--layers 6,26,28] [--saved out/smollm2-drop] [--heldout 32]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from rewriter import load, optimize
from rewriter.calibrate import row_labels
from rewriter.gate import Gate
from rewriter.models import load_model, make_calibration
from rewriter.recipe import GateSpec

OUT = Path(__file__).resolve().parent / "results" / "judged.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="6,26,28", help="attention layers to drop (the old example's)")
    ap.add_argument("--saved", help="measure this saved result instead of rebuilding the drop")
    ap.add_argument("--heldout", type=int, default=32, help="held-out samples of 256 tokens, spread")
    ap.add_argument("--lengths", default="256,1024")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2")
    t0 = time.perf_counter()
    if args.saved:
        opt, what = load(args.saved), f"saved {args.saved}"
    else:
        opt = optimize(loaded, {"calibration": {"text": "bundled", "samples": 4, "seq_len": 256, "heldout": 0,
                                                "lengths": [256]},
                                "gate": {"metric": "perplexity_ratio", "max": 100.0},
                                "steps": [{"drop_attention": {"layers": args.layers}}]},
                       progress=False, measure_latency=False)
        what = f"drop_attention on layers {args.layers} (the drop example calibrated on bundled text alone)"
    lengths = [int(x) for x in args.lengths.split(",")]
    cal = make_calibration(loaded, text="mix", samples=1, seq_len=256, heldout=args.heldout, lengths=lengths)
    spec = GateSpec(metric="perplexity_ratio", max=1.05)
    m = Gate.from_model(spec, loaded.model.eval(), cal.heldout, loaded, cal.heldout_labels).measure(opt.graph_module)
    rows = {}
    for b, lb in zip(cal.heldout, cal.heldout_labels):
        for x in row_labels(lb, len(b["input_ids"])):
            rows[x] = rows.get(x, 0) + 1
    result = {"what": what, "metric": "perplexity_ratio", "bound": 1.05, "worst": m.value, "ok": m.ok,
              "why": m.why, "groups": [{**g, "samples": rows[(g["text"], g["tokens"])]} for g in m.groups],
              "seconds": round(time.perf_counter() - t0, 1)}
    for g in result["groups"]:
        print(f"{g['text']:8s} {g['tokens']:5d}  x{g['value']:.3f}  ({g['samples']} samples)")
    OUT.parent.mkdir(exist_ok=True)
    old = json.loads(OUT.read_text()) if OUT.exists() else {}
    old[what] = result
    OUT.write_text(json.dumps(old, indent=2))
    print(f"worst x{m.value:.3f}: {m.why}; wrote {OUT}")


if __name__ == "__main__":
    main()
