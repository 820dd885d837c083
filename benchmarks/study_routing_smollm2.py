"""What limits post-hoc routed attention on SmolLM2 at 2048 tokens: the block ranking, or the clustering?

    python benchmarks/study_routing_smollm2.py [--threads 2] [--ppl-chunks 4] [--only exact sampled_mixed ...]

Writes benchmarks/results/study_routing_smollm2.json and prints one line per variant.

Every attention layer of the Hugging Face model is swapped (transformers' AttentionInterface) for
exact attention under a (query, key) mask that the variant builds from the layer's own q/k/v; each
variant reports the held-out perplexity change against the original and the fraction of the causal
(query, key) pairs it keeps. Masks are dense: this measures accuracy, not speed (the rules'
kernels are timed in bench_routed_models.py / bench_routed_agent.py). Calibration and held-out
text as in bench_routed_models.py: 2 × 2048 calibration tokens, 4 held-out 2048-token pydoc chunks.

Block variants — b = 64, keep 0.25 of the causal pairs, forced first + previous + own block, and
the per-head row counts of the rule's own calibration (`_head_rows`, keep 0.25) — differ only in
how the remaining blocks are ranked:
  sampled_strided / sampled_mixed / sampled_largest_q: the rule's run-time ranking (`block_scores`,
      affinity "sampled", 8 rows per block, chosen by `sample_rows`); sampled_mixed_16: 16 rows,
      the rule's default;
  exact: each key block's exact output share ‖Σ_{j∈block} p_j v_j‖, mean over the query block's
      rows — the ceiling for this budget shape, at the cost of dense attention;
  antidiagonal: XAttention's antidiagonal scores at stride 8 (arXiv:2503.16428, same cost as 8
      sampled rows), weighted by the key group's mean value norm, max over the block's groups.
K-means variants — 8 centroids per head, clusters of 256 tokens (the rule's kmeans_routing at
`clusters: 8`), centroids by spherical k-means on the calibration tokens:
  local_only: each query's own and previous 64-token block and the first block, no clusters;
  rule: the rule's `kmeans_routed_attention` (shared routing vector normalize(q̂ + k̂), local block
      256 + first block, partials merged by log-sum-exp, so a pair in two partials counts twice);
  rule_union: the same clusters and local blocks, each pair counted once;
  union_local64: the same clusters, local part as in local_only;
  separate: queries join by q̂·μ, keys by k̂·μ (centroids fitted on q̂ and k̂ together), local as in
      local_only;
  key_clusters_oracle: keys join their nearest of 16 centroids (fitted on k̂); each query takes the
      2 clusters holding the most of its EXACT attention mass (an oracle), local as in local_only.
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

from transformers import AttentionInterface                 # noqa: E402

from rewriter.gate import perplexity, run                    # noqa: E402
from rewriter.kernels import routed_attention as R           # noqa: E402
from rewriter.kernels.block_sparse_attention import dense_block_mask  # noqa: E402
from rewriter.models import load_model, make_calibration     # noqa: E402
from rewriter.patterns._routing import spherical_kmeans      # noqa: E402
from rewriter.patterns.routing import BlockRoutingOptions, _head_rows, _output_shares  # noqa: E402

RESULTS = Path(__file__).parent / "results"
B_, KEEP, SAMPLES = 64, 250, 8
CLUSTERS, WINDOW = 8, 256
BLOCK = ("sampled_strided", "sampled_mixed", "sampled_largest_q", "sampled_mixed_16", "exact", "antidiagonal")
KMEANS = ("local_only", "rule", "rule_union", "union_local64", "separate", "key_clusters_oracle")

STATE: dict = {"mode": "dense"}
CAL: dict = {}          # layer -> {"rows": [H] per mille, "q": [...], "k": [...]}
COUNT = {"kept": 0.0, "pairs": 0.0}


def exact_shares(p, v):
    """Each head's exact block output shares, [B, H, nb, nb] (the rule's per-head-budget measure)."""
    Bz, H, T, _ = p.shape
    qw = torch.ones(Bz, T // B_, B_)
    return torch.stack([_output_shares(p[:, h], v[:, h], qw) for h in range(H)], dim=1)


def antidiagonal(q, k, v, scale, stride=8):
    """XAttention's antidiagonal block scores (value-weighted, max over the block's row groups)."""
    Bz, H, T, D = q.shape
    qa = q.view(Bz, H, T // stride, stride, D).flip(3).reshape(Bz, H, T // stride, stride * D)
    ka = k.view(Bz, H, T // stride, stride, D).reshape(Bz, H, T // stride, stride * D)
    tri = torch.ones(T // stride, T // stride, dtype=torch.bool).tril()
    pa = ((qa @ ka.transpose(-1, -2)) * scale / stride).masked_fill(~tri, float("-inf")).softmax(-1)
    pa = pa * v.view(Bz, H, T // stride, stride, -1).norm(dim=-1).mean(-1).unsqueeze(2)
    g, nb = B_ // stride, T // B_
    return pa.view(Bz, H, nb, g, nb, g).sum(-1).amax(3)


def block_mask(name, q, k, v, p, scale, rows):
    how, samples = name.removeprefix("sampled_") if name.startswith("sampled_") else "strided", SAMPLES
    if how.rsplit("_", 1)[-1].isdigit():                         # sampled_mixed_16: 16 rows
        how, samples = how.rsplit("_", 1)[0], int(how.rsplit("_", 1)[1])
    score, n_forced = R.block_scores(q, k, None, block_size=B_, causal=True, sinks=R.default_sinks(True),
                                     route_by="own", affinity="sampled", scale=scale, v=v,
                                     samples=samples, sample_rows=how)
    if name in ("exact", "antidiagonal"):
        g = q.shape[1] // k.shape[1]
        kf, vf = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        est = exact_shares(p, vf) if name == "exact" else antidiagonal(q, kf, vf, scale)
        score = torch.where(torch.isfinite(score), est, score)
    table = R.select_blocks(score, n_forced, topk=None, keep_permille=KEEP, causal=True, n_sinks=2,
                            head_rows=rows, max_row_permille=int(rows.max()))
    T = q.shape[2]
    return dense_block_mask(table, B_, T, T)


def local_mask(T, size, previous):
    blk = torch.arange(T) // size
    qb, kb = blk.view(T, 1), blk.view(1, T)
    m = (kb == qb) | (kb == 0)
    return m | (kb == qb - 1) if previous else m


def members(scores, w):
    """bool [B, H, C, T]: each centroid's top-w tokens (balanced clusters)."""
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, scores.topk(w, -1).indices, True)


def pairs_of(qm, km):
    return torch.einsum("bhci,bhcj->bhij", qm.float(), km.float()) > 0


def kmeans_mask(name, q, k, p, cents):
    T = q.shape[2]
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    if name == "local_only":
        return local_mask(T, B_, True).expand(q.shape[0], q.shape[1], T, T)
    if name in ("rule_union", "union_local64"):
        m = members(torch.einsum("bhtd,hcd->bhct", R.routing_vectors(q, k), cents["shared"]), WINDOW)
        local = local_mask(T, WINDOW, False) if name == "rule_union" else local_mask(T, B_, True)
        return pairs_of(m, m) | local
    if name == "separate":
        c = cents["separate"]
        qm = members(torch.einsum("bhtd,hcd->bhct", qn, c), WINDOW)
        km = members(torch.einsum("bhtd,hcd->bhct", kn, c), WINDOW)
        return pairs_of(qm, km) | local_mask(T, B_, True)
    # key_clusters_oracle
    c = cents["keys"]
    onehot = F.one_hot(torch.einsum("bhtd,hcd->bhct", kn, c).argmax(2), c.shape[1]).float()   # [B, H, T, C]
    mass = p @ onehot                                                                          # [B, H, T, C]
    pick = torch.zeros_like(mass).scatter_(-1, mass.topk(2, -1).indices, 1.0)
    return (pick @ onehot.transpose(-1, -2) > 0) | local_mask(T, B_, True)


def attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
    """Exact attention (fp32) under the variant's mask; records calibration statistics when asked."""
    Bz, H, T, D = q.shape
    g = H // k.shape[1]
    q, k, v = q.float(), k.float().repeat_interleave(g, 1), v.float().repeat_interleave(g, 1)
    tri = torch.ones(T, T, dtype=torch.bool).tril()
    s = (q @ k.transpose(-1, -2)) * scaling
    p = s.masked_fill(~tri, float("-inf")).softmax(-1)
    mode, layer = STATE["mode"], module.layer_idx
    if mode == "calibrate":
        c = CAL.setdefault(layer, {"rows": [], "q": [], "k": []})
        opts = BlockRoutingOptions(block_size=B_, keep=KEEP / 1000)
        c["rows"].append(_head_rows(q, k[:, ::g], v[:, ::g], None, True, scaling, opts))
        c["q"].append(q[0])
        c["k"].append(k[0])
    if mode in ("dense", "calibrate"):
        return (p @ v).to(q.dtype).transpose(1, 2).contiguous(), None
    name = STATE["variant"]
    if name == "rule":
        out = R.kmeans_routed_attention(q, k, v, None, CAL[layer]["cents"]["shared"], window=WINDOW, causal=True,
                                        scale=scaling, local_block=WINDOW)
        mask = kmeans_mask("rule_union", q, k, p, CAL[layer]["cents"]) & tri
    else:
        if name in BLOCK:
            kv = k[:, ::g].contiguous(), v[:, ::g].contiguous()
            mask = block_mask(name, q, *kv, p, scaling, CAL[layer]["head_rows"])
        else:
            mask = kmeans_mask(name, q, k, p, CAL[layer]["cents"])
        mask = mask & tri
        out = s.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    COUNT["kept"] += float(mask.sum())
    COUNT["pairs"] += float(tri.sum()) * Bz * H
    return out.to(torch.float32).transpose(1, 2).contiguous(), None


def fit_centroids() -> None:
    for layer, c in CAL.items():
        qs, ks = torch.cat(c.pop("q"), 1), torch.cat(c.pop("k"), 1)                   # [H, M, D]
        qn, kn = F.normalize(qs, dim=-1), F.normalize(ks, dim=-1)
        pts = {"shared": F.normalize(qn + kn, dim=-1), "separate": torch.cat([qn, kn], 1), "keys": kn}
        n = {"shared": CLUSTERS, "separate": CLUSTERS, "keys": 16}
        c["cents"] = {key: torch.stack([spherical_kmeans(x[h], n[key], 25, seed=h) for h in range(x.shape[0])])
                      for key, x in pts.items()}
        c["head_rows"] = (1000 * torch.stack(c.pop("rows")).mean(0)).round().long()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ppl-chunks", type=int, default=4)
    ap.add_argument("--only", nargs="*", default=None, help=f"variants to run (of {', '.join(BLOCK + KMEANS)})")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    AttentionInterface.register("routing_study", attention)
    L = load_model("smollm2")
    cal = make_calibration(L, text="pydoc", samples=2, seq_len=2048, batch_size=1, heldout=args.ppl_chunks)
    L.model.set_attn_implementation("routing_study")
    t0 = time.perf_counter()
    with torch.no_grad():
        STATE["mode"] = "calibrate"
        run(L.model, cal.batches, L)
        fit_centroids()
        STATE["mode"] = "dense"
        ref = perplexity(cal.heldout, run(L.model, cal.heldout, L), L)
    print(f"SmolLM2 2048, original perplexity {ref:.3f} ({time.perf_counter() - t0:.0f} s with calibration)", flush=True)
    res = {"seq_len": 2048, "heldout_chunks": args.ppl_chunks, "ppl_original": ref, "block_size": B_,
           "keep": KEEP / 1000, "samples": SAMPLES, "clusters": CLUSTERS, "window": WINDOW, "variants": {}}
    for name in args.only or (BLOCK + KMEANS):
        STATE.update(mode="variant", variant=name)
        COUNT.update(kept=0.0, pairs=0.0)
        t0 = time.perf_counter()
        with torch.no_grad():
            p = perplexity(cal.heldout, run(L.model, cal.heldout, L), L)
        r = {"ppl": p, "ppl_change": p / ref - 1, "kept": COUNT["kept"] / COUNT["pairs"],
             "seconds": time.perf_counter() - t0}
        res["variants"][name] = r
        print(f"{name:22s} kept {r['kept']:.3f}  ppl {p:.3f} ({r['ppl_change']:+.2%})  {r['seconds']:.0f} s", flush=True)
    out = RESULTS / "study_routing_smollm2.json"
    if args.only and out.exists():          # a partial run updates the variants it ran
        old = json.loads(out.read_text())
        old["variants"].update(res["variants"])
        res["variants"] = old["variants"]
    out.write_text(json.dumps(res, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
