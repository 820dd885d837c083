"""MASA (arXiv:2508.04581): attention-projection parameter reduction vs held-out accuracy.

    python benchmarks/bench_masa.py --model minilm     # S = 5, 4, 3, 2 of 6, with and without refinements
    python benchmarks/bench_masa.py --model smollm2    # 20 % and 33 % fewer attention parameters

Rows with `reduction` cut all attention-projection parameters (atoms + coefficients + residual factors)
by that fraction; the rule spends what the atoms leave on per-layer whitened residual ranks.

Every configuration is one `optimize` run with a permissive gate (so it is measured, not rejected);
the numbers are the held-out check (texts never used for calibration): mean embedding cosine for
MiniLM, perplexity ratio for SmolLM2. Parameter counts are the attention projection weights (q, k, v,
o; biases are unchanged) and the whole model; bytes are torch.save'd state dicts of the traced model
before and after, and the size of the saved artifact (`OptimizedModel.save`: built tensors only).
Writes benchmarks/results/masa_<model>.json and masa_<model>.png and prints a table.
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import torch

from rewriter import graph as G
from rewriter import optimize
from rewriter.report import unique_numel as _unique_numel
from rewriter.models import load_model
from rewriter.trace import trace

OUT = Path(__file__).parent / "results"
DISTILL = {"steps": 100}                 # the rule's defaults: lr 3e-2, ridge 0.5
PCA, ALLOC, DIST = "matrix PCA (paper, training-free)", "+ whitened residual, allocated", "+ allocated residual + distill"
NODICT = "no dictionary: allocated whitened low-rank only (SVD-LLM)"

MINILM = [  # (label, family, masa step); 6 layers x 4 types x 384²; `reduction` cuts ALL attention-projection params
    *[(f"S={s}/6 pca", PCA, {"atoms": s}) for s in (5, 4, 3, 2)],
    ("S=5/6 +residual →10%", ALLOC, {"atoms": 5, "reduction": 0.1}),
    *[(f"S={s}/6 +residual →20%", ALLOC, {"atoms": s, "reduction": 0.2}) for s in (4, 3, 2)],
    *[(f"S={s}/6 +residual →33%", ALLOC, {"atoms": s, "reduction": 0.33}) for s in (3, 2)],
    ("S=q3k3v4o4/6 +residual →20%", ALLOC, {"atoms": {"q": 3, "k": 3, "v": 4, "o": 4}, "reduction": 0.2}),
    ("S=q2k2v3o3/6 +residual →33%", ALLOC, {"atoms": {"q": 2, "k": 2, "v": 3, "o": 3}, "reduction": 0.33}),
    ("S=4/6 +residual →20% +distill", DIST, {"atoms": 4, "reduction": 0.2, "distill": DISTILL}),
    ("S=q3k3v4o4/6 +residual →20% +distill", DIST,
     {"atoms": {"q": 3, "k": 3, "v": 4, "o": 4}, "reduction": 0.2, "distill": DISTILL}),
    ("S=q2k2v3o3/6 +residual →33% +distill", DIST,
     {"atoms": {"q": 2, "k": 2, "v": 3, "o": 3}, "reduction": 0.33, "distill": DISTILL}),
    # ablations at 20 %: uniform rank (the previous recipe), whitened atoms, no dictionary
    ("S=4/6 +residual24 (uniform rank)", "ablation: uniform rank 24", {"atoms": 4, "residual_rank": 24}),
    ("S=4/6 whitened atoms +residual →20%", "ablation: whitened atoms", {"atoms": 4, "fit": "whitened", "reduction": 0.2}),
    ("S=0 →20%", NODICT, {"atoms": {"q": 0, "k": 0, "v": 0, "o": 0}, "reduction": 0.2}),
    ("S=0 →33%", NODICT, {"atoms": {"q": 0, "k": 0, "v": 0, "o": 0}, "reduction": 0.33}),
]
QKO4 = {"q": 4, "k": 4, "v": 0, "o": 4}   # v (GQA-narrow, least low-rank in the whitened space) keeps no dictionary
SMOLLM2 = [  # attention projections: 30 x (2 x 576² + 2 x 192·576) = 26.5 M
    ("S=24/30 pca", PCA, {"atoms": 24}),                                      # 20 %
    ("S=20/30 pca", PCA, {"atoms": 20}),                                      # 33 %
    ("S=q4k4v0o4/30 +residual →20%", ALLOC, {"atoms": QKO4, "reduction": 0.2}),
    ("S=q4k4v0o4/30 +residual →33%", ALLOC, {"atoms": QKO4, "reduction": 0.33}),
    ("S=q4k4v0o4/30 +residual →20% +distill", DIST, {"atoms": QKO4, "reduction": 0.2, "distill": DISTILL}),
    ("S=q4k4v0o4/30 +residual →33% +distill", DIST, {"atoms": QKO4, "reduction": 0.33, "distill": DISTILL}),
    ("S=12/30 +residual →20%", "ablation: S=12 all types", {"atoms": 12, "reduction": 0.2}),
    ("S=20/30 +residual24 (uniform rank)", "ablation: uniform rank 24", {"atoms": 20, "residual_rank": 24}),
    ("S=0 →20%", NODICT, {"atoms": {"q": 0, "k": 0, "v": 0, "o": 0}, "reduction": 0.2}),
    ("S=0 →33%", NODICT, {"atoms": {"q": 0, "k": 0, "v": 0, "o": 0}, "reduction": 0.33}),
]
SETUP = {
    "minilm": dict(configs=MINILM, calibration={"samples": 128, "seq_len": 64, "batch_size": 16, "heldout": 64},
                   gate={"metric": "embedding_cosine", "min": 0.0}, target=("≥", 0.97)),
    "smollm2": dict(configs=SMOLLM2, calibration={"samples": 16, "seq_len": 256, "batch_size": 4, "heldout": 8},
                    gate={"metric": "perplexity_ratio", "max": 1e9}, target=("≤", 1.05)),
}


def state_bytes(m: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    return buf.tell()


def run(name: str, only: list[str] | None) -> list[dict]:
    setup = SETUP[name]
    loaded = load_model(name)
    rows, dense = [], None
    for label, family, step in setup["configs"]:
        if only and label not in only:
            continue
        recipe = {"calibration": setup["calibration"], "gate": setup["gate"], "steps": [{"masa": step}]}
        t = time.perf_counter()
        opt = optimize(loaded, recipe, progress=False, measure_latency=False)
        seconds = time.perf_counter() - t
        if dense is None:
            dense = trace(loaded.model, *opt.example)
            G.clean(dense)
        applied = [r for r in opt.report.records if r.status == "applied"]
        names = {getattr(s, f"{p}_weight") for s in opt.sites for p in "qkvo"} - {None}
        before = sum(dense.state_dict()[n].numel() for n in names)        # every attention projection weight
        after = before - sum(r.info["attn_proj_params_before"] - r.info["attn_proj_params_after"] for r in applied)
        with tempfile.TemporaryDirectory() as tmp:
            art = (opt.save(tmp) / "tensors.safetensors").stat().st_size
        h = opt.report.heldout
        rows.append({
            "model": name, "config": label, "family": family, "step": step, "applied": len(applied),
            "attn_params_before": before, "attn_params_after": after,
            "attn_reduction": round(1 - after / before, 4) if before else 0.0,
            "model_params_before": _unique_numel(dense), "model_params_after": _unique_numel(opt.graph_module),
            "state_bytes_before": state_bytes(dense), "state_bytes_after": state_bytes(opt.graph_module),
            "artifact_bytes": art, "heldout_metric": h["metric"], "heldout_value": round(h["value"], 5),
            "heldout_worst": None if h.get("worst") is None else round(h["worst"], 5),
            "calibration_seconds": round(sum(r.seconds for r in opt.report.records), 1),
            "total_seconds": round(seconds, 1),
            "fit": {k: v for r in applied for k, v in r.info.get("relative_output_error", {}).items()},
            "ranks": {k: sum(v) for r in applied for k, v in r.info.get("ranks", {}).items()},
            "dense_layers": {k: len(v) for r in applied for k, v in r.info.get("dense_layers", {}).items()},
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], target) -> str:
    op, bound = target
    ok = (lambda v: v >= bound) if op == "≥" else (lambda v: v <= bound)
    head = (f"{'config':40} {'attn params':>21} {'cut':>6} {'model params':>23} {'state MB':>13} "
            f"{rows[0]['heldout_metric'] if rows else '':>17} {'target':>6} {'calib s':>7}")
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['config']:40} {r['attn_params_before']:>10,}→{r['attn_params_after']:>10,} {r['attn_reduction']:>6.1%} "
            f"{r['model_params_before']:>11,}→{r['model_params_after']:>11,} "
            f"{r['state_bytes_before'] / 1e6:>6.2f}→{r['state_bytes_after'] / 1e6:>6.2f} "
            f"{r['heldout_value']:>17.4f} {'yes' if ok(r['heldout_value']) else 'no':>6} {r['calibration_seconds']:>7.1f}")
    return "\n".join(lines)


def plot(rows: list[dict], name: str, target) -> None:
    """Left: every row; right: the same, zoomed on the rows near the target (labels there)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ppl = bool(rows) and rows[0]["heldout_metric"] == "perplexity_ratio"
    near = (lambda v: v <= 1.3) if ppl else (lambda v: v >= 0.88)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    families = {}
    for r in rows:
        families.setdefault(r["family"], []).append(r)
    for ax, zoom in zip(axes, (False, True)):
        for i, (fam, rs) in enumerate(families.items()):
            rs = sorted((r for r in rs if not zoom or near(r["heldout_value"])), key=lambda r: r["attn_reduction"])
            if not rs:
                ax.plot([], [], color=f"C{i}", label=fam)
                continue
            ax.plot([100 * r["attn_reduction"] for r in rs], [r["heldout_value"] for r in rs],
                    # a line only where it is a curve (one point per cut); several S at one cut: markers
                    "o-" if len({r["attn_reduction"] for r in rs}) == len(rs) > 1 else "o", color=f"C{i}", label=fam)
            for r in rs if zoom else []:
                ax.annotate(r["config"].split()[0], (100 * r["attn_reduction"], r["heldout_value"]), fontsize=6,
                            xytext=(3, 3), textcoords="offset points")
        if ppl and not zoom:
            ax.set_yscale("log")
        ax.axhline(target[1], color="grey", ls="--", lw=1, label=f"target {target[0]} {target[1]}")
        ax.axvline(20, color="grey", ls=":", lw=1)
        ax.set_xlabel("attention-projection parameters removed (%)")
        ax.set_ylabel(f"held-out {rows[0]['heldout_metric']}")
        ax.set_title(f"MASA on {name}" + (" (zoom)" if zoom else ""))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(OUT / f"masa_{name}.png", dpi=120)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=sorted(SETUP), default="minilm")
    p.add_argument("--only", nargs="*", help="run only the configs with these labels (merged into earlier results)")
    p.add_argument("--replot", action="store_true", help="only redraw the table and PNG from the JSON")
    a = p.parse_args()
    torch.manual_seed(0)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"masa_{a.model}.json"
    if a.replot:
        rows = json.loads(path.read_text())["rows"]
        plot(rows, a.model, SETUP[a.model]["target"])
        print(table(rows, SETUP[a.model]["target"]))
        return
    rows = run(a.model, a.only)
    if a.only and path.exists():   # merge a partial run into earlier results
        old = [r for r in json.loads(path.read_text())["rows"] if r["config"] not in {r["config"] for r in rows}]
        rows = old + rows
    order = [c for c, *_ in SETUP[a.model]["configs"]]
    rows.sort(key=lambda r: order.index(r["config"]) if r["config"] in order else len(order))
    path.write_text(json.dumps({"calibration": SETUP[a.model]["calibration"], "gate": SETUP[a.model]["gate"],
                                "rows": rows}, indent=2))
    plot(rows, a.model, SETUP[a.model]["target"])
    print(table(rows, SETUP[a.model]["target"]))


if __name__ == "__main__":
    main()
