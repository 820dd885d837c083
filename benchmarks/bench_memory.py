"""Peak resident memory of `optimize` on SmolLM2-135M against the issue-16 target.

    python benchmarks/bench_memory.py                   # measure this checkout, print one JSON row
    python benchmarks/bench_memory.py --label after --save   # ... and store it in results/memory.json
    python benchmarks/bench_memory.py --max-memory 200MB --label offload_200MB --save   # weights on disk

The run: SmolLM2, `drop_attention` on one site, 4 × 256 calibration tokens of the bundled text in
one batch (4 held out), perplexity gate, latency timed: the full `optimize` path. Each number comes
from a fresh child process, so that nothing earlier inflates it:

- `rss_after_load`: resident memory (/proc/self/statm) right after the model is loaded;
- `weights`: the model's parameters and buffers, each storage once;
- `activations_one_batch` (a child of its own): the peak RSS rise of one no_grad forward of the
  original on one calibration batch (logits included), after a warm-up forward, sampled every ms;
- `peak_rss`: the process's peak during optimize, in a child that loads the model and optimizes
  at once: getrusage's ru_maxrss where the process peak was reached during optimize (exact), else
  the maximum of /proc/self/statm sampled every millisecond;

and `target = rss_after_load + 2 × weights + activations_one_batch` (the issue's bound). `--save`
merges the row into benchmarks/results/memory.json under its label: "before" was measured on the
code before issue 16 (two deep copies; that run measured rss_after_load after a warm-up forward,
so its target reads higher), "after" on this one; `--row-nll` measures the perplexity gate with
the row-at-a-time NLL proposed for rewriter/gate.py. `--max-memory SIZE` loads the model with at
most SIZE of its weights in memory and the rest offloaded to disk (rewriter/offload.py): `weights`
is then what stays in memory, and the row also gives the offloaded bytes, the most of them in memory
at once, and the gate's values, to compare with the in-memory row's.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "memory.json"
RECIPE = {"calibration": {"text": "bundled", "lengths": [256], "samples": 4, "seq_len": 256, "batch_size": 4,
                          "heldout": 4},
          "gate": {"metric": "perplexity_ratio", "max": 10.0},
          "steps": [{"drop_attention": {"max_layers": 1}}]}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Peak:
    """The maximum of rss() sampled every `every` seconds while the block runs."""

    def __init__(self, every: float = 0.001):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    def __enter__(self):
        self.peak = rss()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.every)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss())


def _row_nll(batches, outs, io) -> float:
    """rewriter.gate._nll one row at a time: a [T, V] float64 temporary instead of [B, T, V] (the
    change proposed for gate.py; `--row-nll` measures what it would save)."""
    tot = n = 0.0
    for b, logits in zip(batches, outs):
        ids = io.labels(b)
        v = io.valid_tokens(b, logits).bool()
        v = v[:, 1:] & v[:, :-1]
        for i in range(logits.shape[0]):
            lp = logits[i, :-1].double().log_softmax(-1).gather(-1, ids[i, 1:, None]).squeeze(-1)
            tot -= lp[v[i]].sum().item()
        n += v.sum().item()
    return tot / max(n, 1)


def child(what: str, row_nll: bool = False, max_memory: str | None = None) -> dict:
    import torch

    from rewriter import optimize
    from rewriter.models import calibration_from, load_model
    from rewriter.recipe import load_recipe
    torch.manual_seed(0)
    loaded = load_model("smollm2", **({"max_memory": max_memory} if max_memory else {}))
    model = loaded.model.eval()
    after_load = rss()
    if what == "activations":          # the peak RSS rise of one forward on one calibration batch
        rec = load_recipe(RECIPE)
        calib = calibration_from(loaded, None, **rec.calibration.resolved(rec.steps))
        with torch.no_grad():          # warm-up: one-time allocations are not activations
            model(**calib.batches[0])
        base = rss()
        with Peak() as p, torch.no_grad():
            model(**calib.batches[0])
        return {"activations": p.peak - base}
    if row_nll:
        import rewriter.gate
        rewriter.gate._nll = _row_nll
    weights = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                   for t in [*model.parameters(), *model.buffers()] if not t.is_meta}.values())
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t = time.perf_counter()
    with Peak() as p:
        opt = optimize(loaded, RECIPE, progress=False)
    seconds = time.perf_counter() - t
    maxrss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    exact = maxrss1 > maxrss0
    return {"after_load": after_load, "weights": weights, "peak": maxrss1 if exact else p.peak,
            "method": "getrusage ru_maxrss" if exact else "sampled /proc/self/statm (1 ms)",
            "seconds": seconds, "applied": [r.site for r in opt.report.records if r.status == "applied"],
            "gate_values": [r.measurement.value for r in opt.report.records if r.measurement is not None],
            "report_memory": opt.report.to_dict().get("memory")}


def _run_child(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                         env={**os.environ, "PYTHONHASHSEED": "0"})
    if out.returncode:
        sys.exit(f"bench_memory child {args} failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--child", dest="child_what", choices=["activations", "optimize"], help=argparse.SUPPRESS)
    p.add_argument("--max-memory", metavar="SIZE", help="offload all but SIZE of the weights to disk")
    p.add_argument("--label", default="after", help="key of the row in results/memory.json")
    p.add_argument("--save", action="store_true", help="merge the row into results/memory.json")
    p.add_argument("--row-nll", action="store_true", help="measure with the perplexity gate's NLL taken "
                   "one row at a time (the change proposed for rewriter/gate.py)")
    a = p.parse_args()
    if a.child_what:
        print(json.dumps(child(a.child_what, a.row_nll, a.max_memory)))
        return
    cap = ["--max-memory", a.max_memory] if a.max_memory else []
    acts = _run_child("activations", *cap)["activations"]
    r = _run_child("optimize", *(["--row-nll"] if a.row_nll else []), *cap)
    gib = 2 ** 30
    row = {"model": "smollm2", "recipe": RECIPE, "applied_sites": r["applied"],
           "rss_after_load_gb": round(r["after_load"] / gib, 3), "weights_gb": round(r["weights"] / gib, 3),
           "activations_one_batch_gb": round(acts / gib, 3), "peak_rss_gb": round(r["peak"] / gib, 3),
           "peak_method": r["method"],
           "target_gb": round((r["after_load"] + 2 * r["weights"] + acts) / gib, 3),
           "seconds": round(r["seconds"], 1), "row_nll": a.row_nll, "report_memory": r["report_memory"],
           "max_memory": a.max_memory, "gate_values": r["gate_values"]}
    row["within_target"] = row["peak_rss_gb"] <= row["target_gb"]
    print(json.dumps(row, indent=2))
    if a.save:
        data = json.loads(OUT.read_text()) if OUT.exists() else {}
        data[a.label] = row
        OUT.parent.mkdir(exist_ok=True)
        OUT.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
