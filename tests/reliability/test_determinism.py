"""The same recipe and seed give the same records and the same weights, bit for bit: two runs in fresh
processes, with different Python hash seeds (set and dict-of-set iteration orders) and different
global torch RNG states, of a recipe whose rules fit (hedgehog linear attention, MASA, k-means
centroids, calibrated per-head routing budgets, `layers: auto`'s damage order). Only wall-clock times
(`seconds`, `*_seconds`) and the process's resident memory (`*_rss_bytes`) may differ."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

RECIPE = {"calibration": {"samples": 4, "seq_len": 16, "batch_size": 2, "heldout": 2, "validation": 2},
          "gate": {"metric": "relative_rms", "max": 100.0},
          "steps": [{"masa": {}},
                    {"linear_attention": {"feature_map": "hedgehog", "steps": 10, "window": 4,
                                          "layers": "auto", "max_applied": 1}},   # damage order
                    {"kmeans_routing": {"layers": [2, 3], "max_applied": 1}},
                    {"block_routing": {"block_size": 4, "keep": 0.5, "budget": "heads"}}]}

RUN = """
import json, sys, torch
from rewriter import optimize
from rewriter.models import load_model
torch.set_num_threads(1)
torch.manual_seed(int(sys.argv[2]))          # the global RNG state must not matter
opt = optimize(load_model("llama"), json.loads(sys.argv[3]), progress=False,
               measure_latency=False)
opt.save(sys.argv[1])
"""


def _untimed(x):
    """`x` without wall-clock times and resident memory: keys `seconds`, `*_seconds`, `*_rss_bytes`."""
    if isinstance(x, dict):
        return {k: _untimed(v) for k, v in x.items()
                if not (k == "seconds" or k.endswith(("_seconds", "_rss_bytes")))}
    if isinstance(x, list):
        return [_untimed(v) for v in x]
    return x


def _run(out: Path, seed: int):
    env = {**os.environ, "PYTHONHASHSEED": str(seed)}
    done = subprocess.run([sys.executable, "-c", RUN, str(out), str(seed), json.dumps(RECIPE)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return (json.loads((out / "records.json").read_text()), json.loads((out / "report.json").read_text()),
            load_file(str(out / "tensors.safetensors")))


def test_same_recipe_and_seed_give_the_same_records_and_weights_bit_for_bit(tmp_path):
    meta_a, report_a, tensors_a = _run(tmp_path / "a", 1)
    meta_b, report_b, tensors_b = _run(tmp_path / "b", 2)
    applied = {r["rule"] for r in meta_a["records"] if r["status"] == "applied"}
    assert applied == {"linear_attention", "masa", "kmeans_routing", "block_routing"}, applied
    assert any(r["built"] for r in meta_a["records"] if r["rule"] == "linear_attention")
    assert _untimed(meta_a) == _untimed(meta_b)             # records, options, facts, metrics, manifest
    assert _untimed(report_a) == _untimed(report_b)         # held-out check, params, FLOPs
    assert tensors_a.keys() == tensors_b.keys()
    for k in tensors_a:
        assert tensors_a[k].dtype == tensors_b[k].dtype and torch.equal(tensors_a[k], tensors_b[k]), k
