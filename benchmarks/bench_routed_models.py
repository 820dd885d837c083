"""Accuracy vs kept fraction of the routed-attention rules on real models, and the CPU
attention-core speed-up of the rewritten attention against SDPA.

    python benchmarks/bench_routed_models.py [--threads 1] [--ppl-chunks 4] [--text pydoc] [--skip-smollm2]

Writes benchmarks/results/routed_models.json and routed_models.png, prints a table.

MiniLM-L6 (pretrained, 6 sites, padding masks): agent_attention n=16 training-free (with the
  default agent bias, and AgentSD's form without it) vs calibrated (s₁, s₂, c, bias slopes fitted
  on 32 calibration samples at up to 256 tokens), on the 64 held-out bundled sentences and on
  32 held-out samples (sentences and paragraphs) at up to 256 tokens; block_routing (b=8) and
  kmeans_routing curves on the latter: mean embedding cosine vs the fraction of attention kept.
SmolLM2-135M (30 causal GQA sites) at 2048-token inputs: block_routing (b=64; the rule's causal
  defaults — value-aware ranking by 16 sampled rows per block, half strided and half largest-‖q‖,
  per-head budgets — at keep 0.25 / 0.35 and at top-k 5 (8 of 32 blocks per query block); with 8
  sampled rows, mixed and strided (the previous default); each half of the default alone; pooled
  ranking with a uniform budget at keep 0.25 / 0.5; BiFormer's block means at top-k 2) and
  kmeans_routing perplexity on held-out 2048-token chunks vs the original, and the attention
  core (one layer's shapes) timed against SDPA with the model's boolean causal mask and with
  is_causal=True.

Every rule is applied to EVERY site with the rule's own check/build/apply (no gate), which is
the stress case; optimize() with a gate would stop at the first site that fails its bound.
For speed, k-means centroids and the agents' calibration read activations captured once from
the ORIGINAL model (the driver captures the cumulatively rewritten model per site; the
difference is the usual one-pass vs iterative calibration). SmolLM2 is scaled for a CPU:
2 × 2048 calibration tokens for the centroids, `--ppl-chunks` held-out chunks (default 4) of `--text`
(default pydoc: the bundled text holds only one 2048-token held-out chunk, which earlier runs repeated).

Kept fraction = attention (query, key) pairs computed / pairs the exact model computes
(padding and the causal triangle excluded), measured on the held-out inputs from the routing
tables (block_routing) or from cluster sizes (kmeans_routing: Σ_clusters w² (causal: w(w+1)/2)
plus the local blocks, an upper bound because cluster overlaps are counted twice).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rewriter import graph as G                          # noqa: E402
from rewriter.api import _prepare                          # noqa: E402
from rewriter.driver import Context                        # noqa: E402
from rewriter.gate import compare, perplexity, run         # noqa: E402
from rewriter.kernels import routed_attention as R         # noqa: E402
from rewriter.kernels.block_sparse_attention import dense_block_mask  # noqa: E402
from rewriter.models import load_model, make_calibration   # noqa: E402
from rewriter.patterns.routing import _resolved            # noqa: E402
from rewriter.rule import Built, Candidate, get_rule       # noqa: E402
from rewriter.trace import restore, snapshot               # noqa: E402

from bench_routed_agent import timed                       # noqa: E402  (same folder)

RESULTS = Path(__file__).parent / "results"
# SmolLM2 block_routing: the causal defaults at three budgets, cheaper and earlier row choices, each
# half of the default alone, the pooled ranking with a uniform budget, and BiFormer's block means with
# first + last sinks (the rule's first behaviour)
SMOLLM2_BLOCK = ({"keep": 0.25},
                 {"keep": 0.25, "samples": 8},                                  # half the routing cost
                 {"keep": 0.25, "samples": 8, "sample_rows": "strided"},        # the rule's previous default
                 {"keep": 0.35},
                 {"topk": 5},                            # 8 of 32 blocks per query block: BiFormer's "25 % of blocks"
                 {"keep": 0.25, "affinity": "sampled", "budget": "uniform"},   # what each half of the default gives
                 {"keep": 0.25, "affinity": "pooled", "budget": "heads"},
                 {"keep": 0.25, "affinity": "pooled", "budget": "uniform"},    # the rule's default before those
                 {"keep": 0.5, "affinity": "pooled", "budget": "uniform"},
                 {"topk": 2, "affinity": "means", "sinks": ["first", "last"], "budget": "uniform"})
CLUSTERS = (8, 45)         # SmolLM2 kmeans_routing: 45 ≈ √2048 (the paper's default)


class CachedContext(Context):
    """A Context whose capture() serves activations captured once from the original graph."""

    def __init__(self, gm, sites, calibration, kind, cache: dict):
        super().__init__(gm, sites, calibration, kind)
        self.cache = cache

    def capture(self, names, batches=None, gm=None):
        return {n: self.cache[n] for n in names}


def sdpa_inputs(gm, site) -> dict:
    a = G.sdpa_args(G.node(gm, site.node))
    out = {"q": a["query"].name, "k": a["key"].name, "v": a["value"].name, "out": site.node}
    if isinstance(a["attn_mask"], torch.fx.Node):
        out["mask"] = a["attn_mask"].name
    return out


def apply_all(gm, snap, sites, rule_name, opts, calib, kind, cache) -> dict:
    """Restore the original graph, then check/build/apply the rule at every site."""
    restore(gm, snap)
    rule = get_rule(rule_name)
    o = rule.options(**opts)
    ctx = CachedContext(gm, sites, calib, kind, cache)
    built = {}
    for s in sites:
        c = Candidate((s,))
        reason = rule.check(c, o)
        if reason:
            raise RuntimeError(f"{rule_name} refused site {s.index}: {reason}")
        b = Built.of(rule.build(ctx, c, o))
        rule.apply(gm, c, b, o)
        built[s.index] = b.tensors
        G.clean(gm)
    return built


def block_kept(acts, sites, names, opts, causal: bool, built: dict) -> float:
    """Listed real (query, key) pairs / allowed pairs, over held-out batches and sites, from the
    tables the rewritten sites build (`built`: each site's calibrated constants)."""
    listed = allowed = 0.0
    o = get_rule("block_routing").options(**opts)
    sinks, affinity = _resolved(o, causal)
    for s in sites:
        n, rows = names[s.index], built[s.index].get("head_rows")
        for q, k, v, m in zip(acts[n["q"]], acts[n["k"]], acts[n["v"]], acts[n["mask"]]):
            km = R.key_mask_from_attn_mask(m, q)
            table = R.route_blocks(q, k, km, block_size=opts["block_size"], topk=opts.get("topk"),
                                   keep_permille=None if "topk" in opts else round(1000 * opts["keep"]),
                                   causal=causal, sinks=sinks, affinity=affinity, scale=s.scale, v=v,
                                   samples=o.samples, sample_rows=o.sample_rows, head_rows=rows,
                                   max_row_permille=None if rows is None else int(rows.max()))
            bs, t = opts["block_size"], q.shape[2]
            vis = dense_block_mask(table, bs, t, t) & km[:, None, None, :]
            full = km[:, None, None, :].expand_as(vis) & km[:, None, :, None]
            if causal:
                tri = torch.ones(t, t, dtype=torch.bool).tril()
                vis, full = vis & tri, full & tri
            listed += float((vis & full).sum())
            allowed += float(full.sum())
    return listed / allowed


def kmeans_kept(real: int, clusters: int, window: int, causal: bool) -> float:
    """(cluster pairs + local pairs) / exact pairs for one sequence of `real` tokens: each cluster
    holds min(window, real) tokens; the local part is each token's own block plus block 0."""
    pairs = (lambda n: n * (n + 1) / 2) if causal else (lambda n: n * n)     # noqa: E731
    w = min(window, real)
    first = min(window, real)
    local = sum(pairs(min(window, real - i)) for i in range(0, real, window)) + (real - first) * first
    return min(1.0, (clusters * pairs(w) + local) / pairs(real))


# ---------------------------------------------------------------------------- MiniLM

def heldout_sentences(L, batch_size: int = 16) -> list[dict]:
    """The bundled held-out SENTENCES (the held-out set also holds paragraphs), batched."""
    from rewriter.models.calibration import _batched, _encode_encoder
    from rewriter.models.text import bundled_sentences, load_source
    sents = set(bundled_sentences())
    held = [x for x in load_source("bundled").heldout_samples if x in sents]
    return [_encode_encoder(L, b, 256) for b in _batched(held, batch_size)]


def minilm(res: dict) -> None:
    L = load_model("minilm")
    cal = make_calibration(L, samples=32, seq_len=256, batch_size=8, heldout=32)
    gm, sites, _, _ = _prepare(L, cal.batches[0])
    snap = snapshot(gm)
    names = {s.index: sdpa_inputs(gm, s) for s in sites}
    want = sorted({v for n in names.values() for v in n.values()})
    cal_acts = Context(gm, sites, cal, L).capture(want)
    held_acts = Context(gm, sites, cal, L).capture(want, cal.heldout)
    ref = run(L.model, cal.heldout, L)
    sentences = heldout_sentences(L)
    ref_sentences = run(L.model, sentences, L)

    def cos(rule, opts):
        t0 = time.perf_counter()
        built = apply_all(gm, snap, sites, rule, opts, cal, L, cal_acts)
        value, worst = compare("embedding_cosine", cal.heldout, ref, run(gm, cal.heldout, L), L)
        return {"options": opts, "cosine": value, "worst": worst, "seconds": time.perf_counter() - t0}, built

    def agent(opts):
        r, _ = cos("agent_attention", opts)
        r["sentences_cosine"], r["sentences_worst"] = compare("embedding_cosine", sentences, ref_sentences,
                                                              run(gm, sentences, L), L)
        return r

    out = res["minilm"] = {"heldout_samples": 32, "max_tokens": 256,
                           "heldout_sentences": sum(len(b["input_ids"]) for b in sentences)}
    free = agent({"agents": 16})
    fit = agent({"agents": 16, "calibrate": True})
    out["agent_n16"] = {"training_free": free, "calibrated": fit, "gain": fit["cosine"] - free["cosine"],
                        "gain_sentences": fit["sentences_cosine"] - free["sentences_cosine"],
                        "agentsd_form": agent({"agents": 16, "position_bias": 0.0})}
    for n in (4, 8, 32, 64):
        out.setdefault("agent_curve", []).append(cos("agent_attention", {"agents": n})[0] | {"agents": n})
    out["agent_curve"].insert(1, free | {"agents": 16})
    for keep in (0.125, 0.25, 0.5, 0.75):
        opts = {"block_size": 8, "keep": keep}
        r, built = cos("block_routing", opts)
        r["kept"] = block_kept(held_acts, sites, names, opts, False, built)
        out.setdefault("block_routing", []).append(r)
    lens = [int(x) for b in cal.heldout for x in b["attention_mask"].sum(1)]
    for clusters in (2, 4, 8):
        r, _ = cos("kmeans_routing", {"clusters": clusters})
        window = -(-max(b["input_ids"].shape[1] for b in cal.batches) // clusters)    # the rule's default
        r["kept"] = sum(kmeans_kept(n, clusters, window, False) for n in lens) / len(lens)
        out.setdefault("kmeans_routing", []).append(r)


# ---------------------------------------------------------------------------- SmolLM2

def smollm2(res: dict, chunks: int, block_settings: list[dict], clusters_list: list[int], text: str) -> None:
    L = load_model("smollm2")
    cal = make_calibration(L, text=text, samples=2, seq_len=2048, batch_size=1, heldout=chunks)
    gm, sites, _, _ = _prepare(L, {k: v[:, :64] for k, v in cal.batches[0].items()})
    snap = snapshot(gm)
    names = {s.index: sdpa_inputs(gm, s) for s in sites}
    ref_ppl = perplexity(cal.heldout, run(L.model, cal.heldout, L), L)
    out = res["smollm2"] = {"seq_len": 2048, "text": text, "heldout_chunks": chunks, "calibration_chunks": 2,
                            "ppl_original": ref_ppl, "sites": len(sites)}

    def ppl(rule, opts, cache):
        t0 = time.perf_counter()
        built = apply_all(gm, snap, sites, rule, opts, cal, L, cache)
        p = perplexity(cal.heldout, run(gm, cal.heldout, L), L)
        return {"options": opts, "ppl": p, "ppl_change": p / ref_ppl - 1,
                "seconds": time.perf_counter() - t0}, built

    # q/k/v of the calibration chunks (k-means centroids, per-head budgets), original model, 2 × 2048 tokens
    cache = {}
    for i in range(0, len(sites), 10):
        restore(gm, snap)
        cache.update(Context(gm, sites, cal, L).capture(
            sorted({names[s.index][x] for s in sites[i:i + 10] for x in ("q", "k", "v", "mask")})))

    # kept fractions from one held-out chunk's q/k/v on the ORIGINAL model, captured once for every setting
    held = {}
    if block_settings:
        restore(gm, snap)
        for i in range(0, len(sites), 10):
            held.update(Context(gm, sites, cal, L).capture(
                sorted({names[s.index][x] for s in sites[i:i + 10] for x in ("q", "k", "v", "mask")}),
                cal.heldout[:1]))
    built_default = None
    for setting in block_settings:
        opts = {"block_size": 64} | setting
        r, built = ppl("block_routing", opts, cache)
        built_default = built_default or (built if setting == {"keep": 0.25} else None)
        r["kept"] = block_kept(held, sites, names, opts, True, built)
        rows = [b["head_rows"] for b in built.values() if "head_rows" in b]
        if rows:                             # per-head budgets: blocks per query block at 2048 tokens (of 32)
            blocks = torch.stack(rows).double() * 32 / 1000
            r["head_blocks_min_median_max"] = [float(blocks.min()), float(blocks.median()), float(blocks.max())]
        out.setdefault("block_routing", []).append(r)
        print(f"smollm2 block_routing {setting}: kept {r['kept']:.3f} ppl {r['ppl']:.3f} ({r['ppl_change']:+.2%})",
              flush=True)

    for clusters in clusters_list:
        r, _ = ppl("kmeans_routing", {"clusters": clusters}, cache)
        r["kept"] = kmeans_kept(2048, clusters, -(-2048 // clusters), True)
        out.setdefault("kmeans_routing", []).append(r)
        print(f"smollm2 kmeans clusters={clusters}: kept {r['kept']:.3f} ppl {r['ppl']:.3f} ({r['ppl_change']:+.2%})",
              flush=True)

    # attention core, one layer's shapes: [1, 9, 2048, 64] (SDPA inputs are already GQA-repeated)
    s0 = sites[0]
    acts = Context(gm, sites, cal, L).capture([names[s0.index][x] for x in ("q", "k", "v", "mask")], one)
    q, k, v, m = (acts[names[s0.index][x]][0].contiguous() for x in ("q", "k", "v", "mask"))
    km = R.key_mask_from_attn_mask(m, q)
    cents = F.normalize(torch.randn(9, 45, 64), dim=-1)
    core = {
        "sdpa_bool_mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=m),
        "sdpa_is_causal": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    }
    for keep in (0.25, 0.35):
        core[f"block_routing_keep{keep}_pooled"] = lambda keep=keep: R.block_routed_attention(
            q, k, v, km, block_size=64, topk=None, keep_permille=round(1000 * keep), causal=True,
            sinks=R.default_sinks(True), route_by="own", scale=s0.scale, affinity="pooled")
    if built_default is not None:        # the rule's causal default: sampled rows, per-head budgets
        rows = built_default[s0.index]["head_rows"]
        for samples in (16, 8):
            name = "block_routing_keep0.25_default" + ("" if samples == 16 else "_samples8")
            core[name] = lambda samples=samples: R.block_routed_attention(
                q, k, v, km, rows, block_size=64, topk=None, keep_permille=250, causal=True,
                sinks=R.default_sinks(True), route_by="own", scale=s0.scale, affinity="sampled", samples=samples,
                sample_rows="mixed", max_row_permille=int(rows.max()))
    for topk in (2, 4):
        core[f"block_routing_means_top{topk}"] = lambda topk=topk: R.block_routed_attention(
            q, k, v, km, block_size=64, topk=topk, keep_permille=None, causal=True, sinks=("first", "last"),
            route_by="own", scale=s0.scale, affinity="means")
    core["kmeans_45"] = lambda: R.kmeans_routed_attention(q, k, v, km, cents, window=46, causal=True,
                                                          scale=s0.scale, local_block=46)
    ms = {name: timed(fn, 3) for name, fn in core.items()}
    out["core_ms"] = ms
    out["core_speedup_vs_sdpa_bool_mask"] = {n: ms["sdpa_bool_mask"] / t for n, t in ms.items()}
    out["core_speedup_vs_sdpa_is_causal"] = {n: ms["sdpa_is_causal"] / t for n, t in ms.items()}


# ---------------------------------------------------------------------------- report

def plot(res: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.5))
    if "minilm" in res:
        ax, m = axes[0], res["minilm"]
        for rule, mark in (("block_routing", "o-"), ("kmeans_routing", "s-")):
            pts = sorted((r["kept"], r["cosine"]) for r in m[rule])
            ax.plot(*zip(*pts), mark, label=rule)
        ax.axhline(m["agent_n16"]["training_free"]["cosine"], ls="--", c="g", label="agent n=16 (training-free)")
        ax.axhline(m["agent_n16"]["calibrated"]["cosine"], ls=":", c="g", label="agent n=16 (calibrated)")
        ax.set(xlabel="kept fraction of attention pairs", ylabel="held-out embedding cosine",
               title="MiniLM-L6, all 6 sites, ≤256 tokens")
        ax.legend(fontsize=8)
    if "smollm2" in res:
        ax, s = axes[1], res["smollm2"]
        series: dict = {}
        for rule in ("block_routing", "kmeans_routing"):
            for r in s.get(rule, []):
                o = r["options"]
                label = rule if rule == "kmeans_routing" else (
                    f"{rule} b={o.get('block_size', 64)} ({o.get('affinity', 'sampled')}, "
                    f"{o.get('budget', 'heads')} budget, sinks {'+'.join(o.get('sinks', ['first', 'previous']))})")
                series.setdefault(label, []).append((r["kept"], 100 * r["ppl_change"]))
        for label, pts in series.items():
            ax.plot(*zip(*sorted(pts)), "s-" if label.startswith("kmeans") else "o-", label=label)
        ax.axhline(3, ls="--", c="r", label="+3 % bound")
        ax.set(xlabel="kept fraction of causal attention pairs", ylabel="perplexity change (%)",
               title=f"SmolLM2-135M, all 30 sites, 2048 tokens ({s.get('text', 'bundled')} held-out)",
               yscale="log")
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ppl-chunks", type=int, default=4)
    ap.add_argument("--text", default="pydoc", help="SmolLM2 calibration/held-out text (the bundled text holds "
                    "one 2048-token held-out chunk; pydoc holds dozens)")
    ap.add_argument("--skip-smollm2", action="store_true")
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--smollm2-block", type=json.loads, default=list(SMOLLM2_BLOCK),
                    help='JSON list of block_routing settings (block_size 64), e.g. \'[{"topk": 2, "sinks": ["first", "previous"]}]\'')
    ap.add_argument("--smollm2-clusters", type=json.loads, default=list(CLUSTERS), help="JSON list of cluster counts")
    ap.add_argument("--tag", default="", help="suffix of the output files (extra SmolLM2 runs merge into the main file)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res: dict = {"threads": args.threads, "torch": torch.__version__}
    RESULTS.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    if not args.skip_minilm:
        minilm(res)
        m = res["minilm"]
        a = m["agent_n16"]
        print(f"MiniLM agent n=16 on {m['heldout_sentences']} held-out sentences: training-free cos "
              f"{a['training_free']['sentences_cosine']:.4f} (AgentSD form without the agent bias "
              f"{a['agentsd_form']['sentences_cosine']:.4f}), calibrated {a['calibrated']['sentences_cosine']:.4f}")
        print(f"MiniLM agent n=16 on 32 held-out samples ≤ 256 tokens: training-free cos "
              f"{a['training_free']['cosine']:.4f}, calibrated {a['calibrated']['cosine']:.4f} (gain {a['gain']:+.4f})")
        for rule in ("block_routing", "kmeans_routing"):
            for r in m[rule]:
                print(f"MiniLM {rule} {r['options']}: kept {r['kept']:.3f} cos {r['cosine']:.4f} (worst {r['worst']:.4f})")
        for r in m["agent_curve"]:
            print(f"MiniLM agent n={r['agents']}: cos {r['cosine']:.4f} (worst {r['worst']:.4f})")
    if not args.skip_smollm2:
        smollm2(res, args.ppl_chunks, args.smollm2_block, args.smollm2_clusters, args.text)
        s = res["smollm2"]
        print(f"SmolLM2 2048: original ppl {s['ppl_original']:.3f}")
        for name, ms in s["core_ms"].items():
            print(f"  core {name:24s} {ms:8.1f} ms  ×{s['core_speedup_vs_sdpa_bool_mask'][name]:.2f} vs SDPA(mask) "
                  f"×{s['core_speedup_vs_sdpa_is_causal'][name]:.2f} vs SDPA(is_causal)")
    res["seconds"] = time.perf_counter() - t0
    name = "routed_models" + ("_minilm" if args.skip_smollm2 else "_smollm2" if args.skip_minilm else "") + args.tag
    (RESULTS / f"{name}.json").write_text(json.dumps(res, indent=2, default=str))
    plot(res, RESULTS / f"{name}.png")
    print(f"wrote {RESULTS / name}.json / .png in {res['seconds']:.0f} s")
    parts = [RESULTS / f"routed_models_{m}.json" for m in ("minilm", "smollm2")]
    if name != "routed_models" and all(p.exists() for p in parts):     # runs made separately: merge them
        merged = {}
        for p in parts:
            merged.update(json.loads(p.read_text()))
        for extra in sorted(RESULTS.glob("routed_models_smollm2_*.json")):  # tagged extra settings
            for rule in ("block_routing", "kmeans_routing"):
                merged["smollm2"].setdefault(rule, []).extend(json.loads(extra.read_text())["smollm2"].get(rule, []))
        (RESULTS / "routed_models.json").write_text(json.dumps(merged, indent=2))
        plot(merged, RESULTS / "routed_models.png")
        print(f"merged into {RESULTS / 'routed_models'}.json / .png")


if __name__ == "__main__":
    main()
