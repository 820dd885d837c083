"""Generation on SmolLM2: transformers (sdpa, dynamic cache) vs our lowered model
(`rewriter.generate`, rewriter/lower.py) with no rule, 6 dropped attention layers, linear attention
(LoLCATs window 64) on the 17 layers the 5 % perplexity budget converted, and block routing on every
layer (blocks of 64, keep 0.25 of the causal pairs, uniform budget).

    python benchmarks/bench_generate.py [--threads 2] [--contexts 512 2048] [--new 64] [--repeats 3] [--compile]

Batch 1, greedy, `--new` tokens without early stop. The machine this runs on may be shared, so the
models are interleaved step by step: every model prefills the same prompt, then each decode step is
taken for every model in turn (transformers: its forward with the DynamicCache, what its generate
calls per token, without generate's own per-step overhead; ours: `rewriter.generate.stream`, the
loop `OptimizedModel.generate` runs). Per row: prefill ms (prompt in → first token; median over the
repeats), decode ms per token and tokens/s (median over every step of every repeat), the state bytes
at the end (KV caches / linear states), and two floors for one decode step: `gemv_floor_ms`, one
measured GEMV pass over every 2-D weight (the practical fp32 floor on a CPU) plus the state bytes at
the measured read bandwidth, and `roofline_ms`, all bytes read per token ÷ that bandwidth. The
linear-attention row times the ops, not a fit: its feature maps are untrained (steps: 0) on the layers
and options of the gated run in results/linear_models_smollm2.json (held-out perplexity ×1.045).
The block-routing row times its decode form (kernels/routed_attention/block_decode.py: the KV cache
plus per-block min/max keys; each step gathers its first, previous and own blocks and the best
others, ⌈n·(1 − √0.75)⌉ of the n blocks so far, once per kv head), not its accuracy (ungated
here). K-means routing has no decode form: the JSON records its one-line refusal. Writes
results/generate_smollm2.json and .png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rewriter import optimize                                   # noqa: E402
from rewriter.generate import GenerationError, lowered, stream  # noqa: E402
from rewriter.models import load_model                          # noqa: E402

OUT = Path(__file__).parent / "results"
DROPS = [26, 25, 28, 29, 7, 6]          # bench_drop.py's SmolLM2 ranking (as bench_fastpath.py)
LINEAR = [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 13, 16, 26, 27, 28, 29]   # linear_models_smollm2.json (5 %)
CAL = {"samples": 2, "seq_len": 64, "batch_size": 2, "heldout": 0}
OPEN = {"metric": "relative_rms", "max": 100.0}       # chosen layers, not gated here (accuracy: elsewhere)


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def hf_stream(model, ids, mask, new: int, stats: dict):
    """transformers' greedy decode loop (what its generate runs per token): prefill with the last
    logits only, then one forward per token with the DynamicCache."""
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
    cache, pos = out.past_key_values, mask.sum(-1, keepdim=True) - 1
    for i in range(new):
        nxt = out.logits[:, -1].float().argmax(-1)
        stats["state_bytes"] = _bytes(t for layer in cache.layers for t in vars(layer).values()
                                      if isinstance(t, torch.Tensor))
        yield nxt
        if i == new - 1:
            break
        mask, pos = torch.cat([mask, torch.ones_like(mask[:, :1])], 1), pos + 1
        with torch.no_grad():
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True)
        cache = out.past_key_values


def _floors(model) -> dict:
    """Measured: one GEMV pass over every 2-D weight (fp32, [1, in] @ Wᵀ), and the read bandwidth
    (a sum over a 512 MB buffer); both medians of 5."""
    ws = [p for n, p in model.named_parameters() if p.dim() == 2]
    xs = [torch.randn(1, w.shape[1]) for w in ws]
    buf = torch.randn(128 * 2 ** 20)

    def med(fn):
        fn()
        ts = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        return statistics.median(ts)
    with torch.no_grad():
        gemv = med(lambda: [torch.nn.functional.linear(x, w) for x, w in zip(xs, ws)])
        bw = buf.numel() * 4 / med(lambda: buf.sum())
    return {"gemv_ms": gemv * 1e3, "weight_bytes": _bytes(ws), "read_GBps": bw / 1e9}


def _interleaved(streams: dict) -> dict:
    """Advance every stream one step in turn; per stream: the seconds to its first token (prefill)
    and to each later one (decode steps), and its tokens."""
    out = {k: {"prefill": None, "steps": [], "tokens": []} for k in streams}
    live = dict(streams)
    while live:
        for name, it in list(live.items()):
            t = time.perf_counter()
            try:
                tok = next(it)
            except StopIteration:
                del live[name]
                continue
            dt = time.perf_counter() - t
            if out[name]["prefill"] is None:
                out[name]["prefill"] = dt
            else:
                out[name]["steps"].append(dt)
            out[name]["tokens"].append(tok)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--only", nargs="+", choices=["none", "drop6", "linear17_w64", "block30_keep0.25"],
                    default=None, help="time only these of our models (default: all four)")
    ap.add_argument("--out", default="generate_smollm2", help="results/<out>.json and .png")
    ap.add_argument("--compile", action="store_true", help="also time each of our models with its decode "
                    "steps through torch.compile (rows '<name>+compile'; the compiling step is left out)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    L = load_model("smollm2")

    def opt(steps):
        return optimize(L, {"calibration": CAL, "gate": OPEN, "steps": steps}, progress=False,
                        measure_latency=False)
    recipes = {"none": [{"drop_attention": {"layers": [99]}}],
               "drop6": [{"drop_attention": {"layers": DROPS}}],
               "linear17_w64": [{"linear_attention": {"layers": LINEAR, "window": 64, "feature_dim": 64,
                                                      "steps": 0}}],
               "block30_keep0.25": [{"block_routing": {"keep": 0.25, "budget": "uniform"}}]}
    ours = {k: opt(v) for k, v in recipes.items() if args.only is None or k in args.only}
    refused = {}
    try:
        if args.only is None:
            lowered(opt([{"kmeans_routing": {"layers": [0]}}]))
    except GenerationError as e:
        refused["kmeans_routing"] = str(e)
    floors = _floors(L.model)
    res = {"threads": torch.get_num_threads(), "torch": torch.__version__, "new_tokens": args.new,
           "repeats": args.repeats, "floors": floors, "refused": refused,
           "load_average_at_start": os.getloadavg(),
           "lowering": {k: lowered(m).summary() for k, m in ours.items()}, "by_context": {}}
    variants = {k: (m, False) for k, m in ours.items()}
    if args.compile:
        variants |= {f"{k}+compile": (m, True) for k, m in ours.items()}
    bw = floors["read_GBps"] * 1e9
    for n in args.contexts:
        batch = L.example_inputs(batch=1, seq_len=n)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        runs: dict[str, list] = {"transformers": [], **{k: [] for k in variants}}
        compile_s: dict[str, float] = {}
        for _ in range(args.repeats):
            stats = {k: {} for k in runs}
            its = {"transformers": hf_stream(L.model, ids, mask, args.new, stats["transformers"])}
            its |= {k: stream(m, ids, mask, max_new_tokens=args.new, eos_token_id=[], stats=stats[k], compile=c)
                    for k, (m, c) in variants.items()}
            got = _interleaved(its)
            for k in runs:
                if "compile_s" in stats[k]:           # the step that compiled (or found the cache)
                    compile_s.setdefault(k, stats[k]["compile_s"])
                    got[k]["steps"] = got[k]["steps"][1:]
                runs[k].append({**got[k], "state_bytes": stats[k]["state_bytes"]})
        rows = {}
        for name, r in runs.items():
            steps = [s for run in r for s in run["steps"]]
            ms = statistics.median(steps) * 1e3
            state = r[-1]["state_bytes"]
            rows[name] = {"prefill_ms": round(statistics.median(run["prefill"] for run in r) * 1e3, 1),
                          "decode_ms_per_token": round(ms, 1), "decode_tokens_per_s": round(1e3 / ms, 2),
                          "state_bytes": int(state),
                          "gemv_floor_ms": round(floors["gemv_ms"] + state / bw * 1e3, 1),
                          "roofline_ms": round((floors["weight_bytes"] + state) / bw * 1e3, 1)}
            if name in compile_s:
                rows[name]["compile_s"] = round(compile_s[name], 1)
        base = rows["transformers"]
        for name, row in rows.items():
            speedup = base["decode_ms_per_token"] / row["decode_ms_per_token"]
            row["decode_speedup_vs_transformers"] = round(speedup, 3)
            row["prefill_speedup_vs_transformers"] = round(base["prefill_ms"] / row["prefill_ms"], 3)
            row["state_vs_transformers"] = round(row["state_bytes"] / base["state_bytes"], 3)
            row["of_gemv_floor"] = round(row["gemv_floor_ms"] / row["decode_ms_per_token"], 3)
        for name in (k for k in runs if k.split("+")[0] == "none"):
            rows[name]["same_tokens_as_transformers"] = all(
                torch.equal(torch.stack(a["tokens"]), torch.stack(b["tokens"]))
                for a, b in zip(runs[name], runs["transformers"]))
        res["by_context"][n] = rows
        print(f"context {n}: " + "; ".join(
            f"{k} prefill {v['prefill_ms']:.0f} ms, {v['decode_ms_per_token']:.1f} ms/token "
            f"(×{v['decode_speedup_vs_transformers']:.2f}), state {v['state_bytes'] / 2 ** 20:.1f} MiB"
            for k, v in rows.items()), flush=True)
    res["load_average_at_end"] = os.getloadavg()     # the machine was shared: other jobs share its cores
    OUT.mkdir(exist_ok=True)
    (OUT / f"{args.out}.json").write_text(json.dumps(res, indent=2))
    _plot(res, args.out)


def _plot(res, out: str = "generate_smollm2"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ctx = list(res["by_context"])
    names = list(res["by_context"][ctx[0]])
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    w = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * w for j in range(len(ctx))]
        a.bar(xs, [res["by_context"][c][name]["decode_tokens_per_s"] for c in ctx], w, label=name)
        b.bar(xs, [res["by_context"][c][name]["state_bytes"] / 2 ** 20 for c in ctx], w, label=name)
    for ax, title in ((a, "decode tokens/s"), (b, "state MiB at the end")):
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(ctx))], [f"context {c}" for c in ctx])
        ax.set_title(f"SmolLM2, batch 1, {res['new_tokens']} new tokens: {title}", fontsize=9)
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(OUT / f"{out}.png", dpi=120)


if __name__ == "__main__":
    main()
