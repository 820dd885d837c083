"""CPU latency of agent attention and block-sparse (BiFormer-routed) attention against SDPA,
with a sympy cost model's predicted speed-up beside the measured one.

    python benchmarks/bench_routed_agent.py [--lengths 512 2048 8192] [--repeats 3] [--threads 1]

Writes benchmarks/results/routed_agent_cpu.json and routed_agent_cpu.png, prints a table.
These are CPU numbers of the PyTorch implementations (the ops' CPU impls, which a rewritten
model runs on CPU); Triton speed claims need a GPU run.

Cost model (FLOPs, one batch element; a GEMM of m×k by k×n costs 2mkn; every softmax score
costs `c_sm` FLOPs for max, subtract, exp, sum, divide — c_sm = 5 is an assumption):
  SDPA            4·H·N²·D + c_sm·H·N²
  agent (n)       pooling 2·H·n·N·D + stage 1 4·H·n·N·D + stage 2 4·H·N·n·D + 2·c_sm·H·n·N
  block (bs, s)   routing 2·H·(N/bs)²·D + attention 4·H·N·(s·bs)·D + c_sm·H·N·s·bs,
                  s = listed blocks per query block (top-k + own + sinks)
  block, sampled  routing by S exact query rows per block (block_routing's causal default; run
  (bs, s, S)      here without the causal mask): 4·H·(N·S/bs)·N·D + c_sm·H·(N·S/bs)·N, + attention
Predicted speed-up = cost(SDPA) / cost(op); measured = time(SDPA) / time(op).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import sympy as sp
import torch
import torch.nn.functional as F

from rewriter.kernels.agent_attention import agent_attention, pool_agents
from rewriter.kernels.block_sparse_attention import block_sparse_attention
from rewriter.kernels.routed_attention import route_blocks

RESULTS = Path(__file__).parent / "results"
CONFIGS = [  # name, query heads, kv heads, head dim
    ("12h x 32d", 12, 12, 32),
    ("9/3h x 64d (GQA)", 9, 3, 64),
]
AGENTS = 64            # agent tokens (the paper uses 49 = 7×7 on image grids; 64 for sequences)
BLOCK, TOPK, SINKS = 64, 4, [0]   # routing: 64-token blocks, top-4 + own + block 0
SAMPLES = 16                      # exact query rows per block for the sampled routing (the rule's default,
                                  # half strided, half largest ‖q‖)

N, n, D, H, bs, s, S, c_sm = sp.symbols("N n D H bs s S c_sm", positive=True)
_ATTN = 4 * H * N * s * bs * D + c_sm * H * N * s * bs
COST = {
    "sdpa": 4 * H * N**2 * D + c_sm * H * N**2,
    "agent": 2 * H * n * N * D + 8 * H * n * N * D + 2 * c_sm * H * n * N,
    "block_sparse": 2 * H * (N / bs) ** 2 * D + _ATTN,
    "block_sparse_sampled": 4 * H * (N * S / bs) * N * D + c_sm * H * (N * S / bs) * N + _ATTN,
}
SPEEDUP = {op: sp.simplify(COST["sdpa"] / COST[op]) for op in COST if op != "sdpa"}


def timed(fn, repeats: int) -> float:
    """Median wall time in ms after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run(lengths: list[int], repeats: int) -> list[dict]:
    rows = []
    torch.manual_seed(0)
    for name, heads, kv_heads, head_dim in CONFIGS:
        for length in lengths:
            q = torch.randn(1, heads, length, head_dim)
            k = torch.randn(1, kv_heads, length, head_dim)
            v = torch.randn(1, kv_heads, length, head_dim)
            listed = min(-(-length // BLOCK), TOPK + 1 + len(SINKS))
            methods = {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=kv_heads != heads),
                "agent": lambda: agent_attention(q, k, v, pool_agents(q, AGENTS), shortcut=0.075),
                "block_sparse": lambda: block_sparse_attention(
                    q, k, v, route_blocks(q, k, None, block_size=BLOCK, topk=TOPK, sinks=("first",)), BLOCK),
                "block_sparse_sampled": lambda: block_sparse_attention(
                    q, k, v, route_blocks(q, k, None, block_size=BLOCK, topk=TOPK, sinks=("first",),
                                          affinity="sampled", v=v, samples=SAMPLES), BLOCK),
            }
            values = {N: length, n: AGENTS, D: head_dim, H: heads, bs: BLOCK, s: listed, S: SAMPLES, c_sm: 5}
            with torch.inference_mode():
                ms = {m: timed(fn, repeats) for m, fn in methods.items()}
            for m in methods:
                rows.append({
                    "config": name, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "N": length,
                    "method": m, "ms": round(ms[m], 3), "gflop": float(COST[m].subs(values)) / 1e9,
                    "predicted_speedup": 1.0 if m == "sdpa" else round(float(SPEEDUP[m].subs(values)), 2),
                    "measured_speedup": round(ms["sdpa"] / ms[m], 2),
                    "params": {"agents": AGENTS} if m == "agent" else
                              {"block_size": BLOCK, "topk": TOPK, "sink_blocks": SINKS, "listed_blocks": listed}
                              | ({"samples": SAMPLES} if m == "block_sparse_sampled" else {})
                              if m.startswith("block_sparse") else {},
                })
            print(f"done {name} N={length}", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'config':<18}{'N':>6}  {'method':<13}{'ms':>10}{'GFLOP':>9}{'pred. x':>9}{'meas. x':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['config']:<18}{r['N']:>6}  {r['method']:<13}{r['ms']:>10.2f}{r['gflop']:>9.3f}"
              f"{r['predicted_speedup']:>9.2f}{r['measured_speedup']:>9.2f}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(CONFIGS), figsize=(6 * len(CONFIGS), 4.2), squeeze=False)
    for ax, (name, *_) in zip(axes[0], CONFIGS):
        for method, style in (("sdpa", "o-"), ("agent", "s-"), ("block_sparse", "^-"), ("block_sparse_sampled", "v-")):
            pts = [(r["N"], r["ms"]) for r in rows if r["config"] == name and r["method"] == method]
            ax.plot(*zip(*pts), style, label=method)
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="CPU latency (ms)", title=name)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(f"agent attention (n={AGENTS}) and block-sparse routing "
                 f"(bs={BLOCK}, top-{TOPK}+own+sink) vs SDPA, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: on a shared machine, multi-threaded "
                             "elementwise ops spin against other processes and times scatter)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.lengths, args.repeats)
    RESULTS.mkdir(parents=True, exist_ok=True)
    meta = {"device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0], "cpu_count": os.cpu_count(),
            "repeats": args.repeats, "cost_model": {k: str(v) for k, v in COST.items()},
            "predicted_speedup": {k: str(v) for k, v in SPEEDUP.items()}, "c_sm": 5}
    (RESULTS / "routed_agent_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    plot(rows, RESULTS / "routed_agent_cpu.png")
    print_table(rows)
    print(f"wrote {RESULTS / 'routed_agent_cpu.json'} and {RESULTS / 'routed_agent_cpu.png'}")


if __name__ == "__main__":
    main()
