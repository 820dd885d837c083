"""Writes the artifacts in tests/data/legacy/ with the version of rewriter at 8045e6d (before the
rule-contract redesign), so that tests/engine/test_legacy_artifacts.py can check that artifacts
saved by that version still load and give identical outputs. Kept for the record; rerunning it
with a later version would overwrite the evidence, so it refuses to overwrite.

    python tests/data/make_legacy.py
"""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from rewriter import optimize  # noqa: E402
from rewriter.models import load_model  # noqa: E402

HERE = Path(__file__).parent / "legacy"
CAL = {"samples": 8, "seq_len": 32, "batch_size": 4, "heldout": 0}
OPEN = {"metric": "relative_rms", "max": 100.0}

CASES = {
    "bert-drop-mean": ("bert", [{"drop_attention": {"max_layers": 2, "compensate": "mean"}}]),
    "bert-block-routing": ("bert", [{"block_routing": {"block_size": 8, "topk": 1}}]),
    "bert-agent": ("bert", [{"agent_attention": {"agents": 4, "calibrate": True, "steps": 3}}]),
    "llama-masa": ("llama", [{"masa": {"atoms": 0.5, "groups": 2, "residual_rank": 4}}]),
    "llama-linear-window": ("llama", [{"linear_attention": {"feature_dim": 8, "window": 8, "steps": 3, "layers": "auto"}}]),
    "llama-routing-fastpath": ("llama", [{"block_routing": {"block_size": 8, "layers": "0-1"}},
                                         {"kmeans_routing": {"clusters": 4, "layers": "2"}},
                                         {"causal_fastpath": {}}]),
}


def digest(y) -> torch.Tensor:
    """The main output, or for logits (vocab 30522) its first 256 columns beside the log-sum-exp
    over the whole vocabulary: enough to show a changed output, at 1 % of the size."""
    if getattr(y, "logits", None) is not None:
        return torch.cat([y.logits[..., :256], y.logits.logsumexp(-1, keepdim=True)], -1).contiguous()
    return y.last_hidden_state.contiguous()


def main():
    for name, (model, steps) in CASES.items():
        out = HERE / name
        if out.exists():
            sys.exit(f"{out} exists: legacy artifacts are evidence of the old format; not overwriting")
        loaded = load_model(model)
        recipe = {"model": model, "calibration": CAL, "gate": OPEN, "steps": steps}
        opt = optimize(loaded, recipe, measure_latency=False, progress=False)
        opt.save(out)
        # outputs on the saved example and on a differently sized, padded batch
        other = loaded.example_inputs(batch=3, seq_len=24)
        with torch.no_grad():
            y0 = opt(**opt.example[1])
            y1 = opt(**other)
        save_file({"example": digest(y0), "other": digest(y1),
                   **{f"other_input.{k}": v.contiguous() for k, v in other.items()}},
                  str(out / "expected.safetensors"))
        print(name, [(r.rule, r.site, r.status) for r in opt.report.records])


if __name__ == "__main__":
    main()
