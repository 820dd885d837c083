"""CPU attention-core latency: SDPA vs the linear attention ops, with a FLOP cost model.

Katharopoulos et al. 2020 (arXiv:2006.16236) replace softmax attention's O(N²·d) with O(N·F·d);
LoLCATs (arXiv:2410.10254) add a sliding window of exact softmax attention, O(N·w·d). This
measures the attention core only (q, k, v, φ(q), φ(k) given; no projections, no feature map),
batch 1, fp32, on the CPU (one thread unless --threads), for

    12 heads × 32 dims (MiniLM-L6 / BERT-small shapes)  and  9 query / 3 kv heads × 64 dims
    (SmolLM2-135M, grouped-query attention),  at N = 512, 2048, 8192,

with the feature dimension F = 2·d (Hedgehog's [softmax(xW), softmax(−xW)]). Pairs compared:
non-causal SDPA vs rewriter::linear_attention(causal=False); causal SDPA vs
rewriter::linear_attention(causal=True) and vs rewriter::hybrid_window_attention(window=64).

The cost model (sympy, FLOPs as expressions in N; 2 FLOPs per multiply-add, softmax
exponentials and normalizations left out, which favours SDPA) predicts each speed-up; the
measured one sits beside it. CPU numbers only: they say nothing about the Triton kernels.

    python benchmarks/bench_linear_attention.py [--sizes 512 2048 8192] [--repeats 3] [--threads 1]

Writes benchmarks/results/linear_attention_cpu.json and .png, and prints a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import sympy as sp
import torch
import torch.nn.functional as F

import rewriter.kernels  # noqa: F401  (registers torch.ops.rewriter.*)
from rewriter.kernels.linear_attention.cpu import CHUNK

WINDOW = 64
CONFIGS = [  # name, query heads, kv heads, head dim
    ("12x32", 12, 12, 32),
    ("9/3x64", 9, 3, 64),
]

# ---- cost model ----------------------------------------------------------------------------
N, d, Fd, H, Hkv, C, Cw = sp.symbols("N d F H H_kv C C_w", positive=True)
COST = {
    # QKᵀ and PV over all N² pairs
    "sdpa": 4 * N**2 * d * H,
    # only the j ≤ i half (the CPU flash kernel skips blocks above the diagonal)
    "sdpa_causal": 2 * N**2 * d * H,
    # S = φKᵀV per kv head, then φQ·S and φQ·z per query head
    "linear": 2 * N * Fd * d * Hkv + 2 * N * Fd * (d + 1) * H,
    # chunks of C: full C×C φQφKᵀ and its product with V, φQ·S, and the per-chunk φKᵀV
    "linear_causal": 2 * N * C * (Fd + d) * H + 2 * N * Fd * d * H + 2 * N * Fd * d * Hkv,
    # the window scores 2·C_w keys per query (chunks c−1 and c of C_w = max(w, C)), plus the
    # linear terms (chunked as above, keys shifted by w)
    "hybrid": 2 * N * 2 * Cw * 2 * d * H
              + 2 * N * C * (Fd + d) * H + 2 * N * Fd * d * H + 2 * N * Fd * d * Hkv,
}
PAIRS = [("linear", "sdpa"), ("linear_causal", "sdpa_causal"), ("hybrid", "sdpa_causal")]


def flops(name: str, n: int, h: int, hkv: int, dim: int) -> int:
    subs = {N: n, d: dim, Fd: 2 * dim, H: h, Hkv: hkv, C: min(CHUNK, n), Cw: min(max(WINDOW, CHUNK), n)}
    return int(COST[name].subs(subs))


# ---- measurement ---------------------------------------------------------------------------
def timeit(fn, repeats: int) -> tuple[float, float]:
    """(min, median) seconds. The min is reported: on a shared machine it is the run least
    disturbed by other processes; the median is kept in the JSON."""
    fn()                                                   # warm-up (allocator, first-call paths)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times)


def run_config(name, h, hkv, dim, n, repeats):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, hh, n, dim, generator=g) for hh in (h, hkv, hkv))
    fq = torch.softmax(torch.randn(1, h, n, 2 * dim, generator=g), -1)
    fk = torch.softmax(torch.randn(1, hkv, n, 2 * dim, generator=g), -1)
    mix = torch.ones(h)
    gqa = h != hkv
    fns = {
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa),
        "sdpa_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa),
        "linear": lambda: torch.ops.rewriter.linear_attention(fq, fk, v, None, False, 1e-6),
        "linear_causal": lambda: torch.ops.rewriter.linear_attention(fq, fk, v, None, True, 1e-6),
        "hybrid": lambda: torch.ops.rewriter.hybrid_window_attention(
            q, k, v, fq, fk, WINDOW, dim ** -0.5, mix, None, 1e-6),
    }
    rows = []
    with torch.inference_mode():
        timed = {op: timeit(fn, repeats) for op, fn in fns.items()}
    secs = {op: t[0] for op, t in timed.items()}
    for fast, base in PAIRS:
        f_fast, f_base = flops(fast, n, h, hkv, dim), flops(base, n, h, hkv, dim)
        rows.append(dict(config=name, heads=h, kv_heads=hkv, head_dim=dim, feature_dim=2 * dim, N=n,
                         op=fast, baseline=base, ms=secs[fast] * 1e3, baseline_ms=secs[base] * 1e3,
                         median_ms=timed[fast][1] * 1e3, baseline_median_ms=timed[base][1] * 1e3,
                         flops=f_fast, baseline_flops=f_base,
                         predicted_speedup=f_base / f_fast, measured_speedup=secs[base] / secs[fast]))
    return rows


def plot(rows, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no PNG written")
        return False
    fig, axes = plt.subplots(1, len(CONFIGS), figsize=(6 * len(CONFIGS), 4.5), squeeze=False)
    for ax, (name, *_rest) in zip(axes[0], CONFIGS):
        sub = [r for r in rows if r["config"] == name]
        series = {}
        for r in sub:
            series.setdefault(r["baseline"], {})[r["N"]] = r["baseline_ms"]
            series.setdefault(r["op"], {})[r["N"]] = r["ms"]
        for op, pts in series.items():
            ns = sorted(pts)
            ax.plot(ns, [pts[x] for x in ns], marker="o", linestyle="--" if op.startswith("sdpa") else "-",
                    label=op)
        ax.set(xscale="log", yscale="log", xlabel="sequence length N", ylabel="ms (min of repeats)",
               title=f"{name} heads×dim, batch 1, CPU fp32")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: stable numbers on a shared machine)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    rows = []
    for name, h, hkv, dim in CONFIGS:
        for n in args.sizes:
            rows.extend(run_config(name, h, hkv, dim, n, args.repeats))
            print(f"  measured {name} N={n}", flush=True)

    header = f"{'config':8} {'N':>5}  {'op':14} {'vs':12} {'ms':>9} {'base ms':>9} {'pred x':>7} {'meas x':>7}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['config']:8} {r['N']:>5}  {r['op']:14} {r['baseline']:12} {r['ms']:9.2f} "
              f"{r['baseline_ms']:9.2f} {r['predicted_speedup']:7.2f} {r['measured_speedup']:7.2f}")
    model = {k: str(sp.expand(v)) for k, v in COST.items()}
    result = dict(
        what="CPU attention-core latency, SDPA vs rewriter linear attention ops (batch 1, fp32)",
        machine=dict(platform=platform.platform(), processor=platform.processor(),
                     torch=torch.__version__, threads=torch.get_num_threads()),
        window=WINDOW, chunk=CHUNK, repeats=args.repeats, cost_model_flops=model, rows=rows)
    (args.out / "linear_attention_cpu.json").write_text(json.dumps(result, indent=2))
    wrote_png = plot(rows, args.out / "linear_attention_cpu.png")
    print(f"wrote {args.out / 'linear_attention_cpu.json'}" + (" and .png" if wrote_png else ""))


if __name__ == "__main__":
    main()
