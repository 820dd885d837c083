"""What `optimize` itself costs, and how it grows with layers and calibration size.

    python benchmarks/bench_optimize_cost.py                  # MiniLM (6 layers) and SmolLM2 (30 layers)
    python benchmarks/bench_optimize_cost.py --models minilm --samples 16,32,64

The workload is fixed: one drop_attention step with `order: damage` and `max_layers: 1`, so the
driver runs one trial per site to rank them (each undone) and then gates the least damaging one;
every site costs one trial whatever the gate decides. Each (model, calibration size) runs twice in
one process, the activation cache off (`cache_bytes=0`: every measurement a full forward, as before
rewriter/cache.py) and on (the default cap), and the two must reach the same decisions with the
same metrics bit for bit. Per run: total seconds, seconds in the driver, seconds per trial, and the
share of graph nodes the cache skipped. (A pass: one forward over all batches; the ranking's
reference run and the gate's first measure are one each.) Writes benchmarks/results/optimize_cost.json.
The machine's load average is recorded with each run: the CPUs may be shared.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

OUT = Path(__file__).parent / "results"
SEQ = {"minilm": 128, "smollm2": 256}


def one(name: str, samples: int, cache_bytes: int, seq_len: int) -> dict:
    """optimize() of the fixed workload with the given cache cap; the driver built as api.optimize
    builds it, so that the cap can be set."""
    from rewriter import api
    from rewriter import driver as D
    from rewriter.models import load_model

    loaded = load_model(name)
    recipe = {"calibration": {"text": "bundled", "samples": samples, "seq_len": seq_len,
                              "batch_size": 8, "heldout": 0},
              "gate": {"metric": "relative_rms", "max": 0.5},
              "steps": [{"drop_attention": {"order": "damage", "max_layers": 1}}]}
    made = {}

    class Capped(D.Driver):
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "cache_bytes": cache_bytes})
            made["driver"] = self

        def run(self, steps):
            t = time.perf_counter()
            try:
                return super().run(steps)
            finally:
                made["seconds"] = time.perf_counter() - t

    orig, api.Driver = api.Driver, Capped
    try:
        t = time.perf_counter()
        opt = api.optimize(loaded, recipe, progress=False, measure_latency=False)
        total = time.perf_counter() - t
    finally:
        api.Driver = orig
    drv = made["driver"]
    recs = opt.report.records
    # forward passes over the batches: the first measure, one ranking trial per site, the gate's trials
    passes = 2 + len(drv.sites) + sum(r.status in ("applied", "rolled_back") for r in recs)
    driver_s = made["seconds"]          # Driver.run: the ranking trials, the gate's trials, the first measure
    st = dict(drv.cache.stats)
    run_n, skip_n = st["nodes_run"], st["nodes_skipped"]
    return {"model": name, "layers": len(drv.sites), "samples": samples, "seq_len": seq_len,
            "gate_tokens": samples * seq_len, "cache": cache_bytes > 0, "cache_cap_mib": cache_bytes / 2**20,
            "cache_mib_max": round(drv.cache.stats["bytes_max"] / 2**20, 1),
            "cuts_kept": len(drv.cache.active),
            "seconds_total": round(total, 2), "seconds_driver": round(driver_s, 2),
            "passes": passes, "seconds_per_pass": round(driver_s / passes, 3),
            "nodes_skipped_share": round(skip_n / max(run_n + skip_n, 1), 3) if cache_bytes else 0.0,
            "decisions": [(r.site, r.status, r.metric_after, r.info.get("damage_alone")) for r in recs],
            "load_average": os.getloadavg()[0]}


def main():
    from rewriter.cache import DEFAULT_CAP_BYTES
    p = argparse.ArgumentParser()
    p.add_argument("--models", default="minilm,smollm2")
    p.add_argument("--samples", default="8,16,32", help="calibration sizes (token chunks)")
    p.add_argument("--out", default=str(OUT / "optimize_cost.json"))
    a = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in a.models.split(","):
        for n in [int(x) for x in a.samples.split(",")]:
            pair = [one(name, n, cap, SEQ[name]) for cap in (0, DEFAULT_CAP_BYTES)]
            same = pair[0]["decisions"] == pair[1]["decisions"]
            for r in pair:
                r["same_decisions_as_uncached"] = same
                rows.append(r)
                print(json.dumps({k: v for k, v in r.items() if k != "decisions"}), flush=True)
            if not same:
                raise SystemExit(f"{name} samples={n}: cached and uncached runs decided differently:\n"
                                 f"{pair[0]['decisions']}\n{pair[1]['decisions']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"workload": "drop_attention order: damage, max_layers: 1 "
                                       "(one ranking trial per site, then the gate)",
                                       "torch_threads": torch.get_num_threads(), "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
