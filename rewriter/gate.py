"""Accuracy gate: compare a candidate model with the ORIGINAL model's cached outputs.

Metrics (recipe names, DESIGN.md §5):
  relative_rms      ‖y − y₀‖ / ‖y₀‖ of the main output over valid tokens        bound: max
  embedding_cosine  cosine of mean-pooled embeddings, mean over samples          bound: min (+ min_worst)
  kl                mean KL(p₀ ‖ p) of next-token distributions                  bound: max
  top1_agreement    fraction of positions whose argmax agrees                     bound: min
  perplexity_ratio  perplexity(candidate) / perplexity(original) on the inputs    bound: max
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HIGHER_IS_BETTER = {"embedding_cosine": True, "top1_agreement": True, "relative_rms": False,
                    "kl": False, "perplexity_ratio": False}


def main_tensor(out) -> torch.Tensor:
    """The output a user cares about: logits, else last_hidden_state, else the first tensor."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict):
        for key in ("logits", "last_hidden_state"):
            if out.get(key) is not None:
                return out[key]
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        for x in out:
            if isinstance(x, torch.Tensor):
                return x
            if isinstance(x, (list, tuple, dict)):
                return main_tensor(x)
    raise TypeError(f"cannot find a tensor in model output of type {type(out).__name__}")


def _valid(batch: dict, y: torch.Tensor) -> torch.Tensor:
    """[B, T] bool of real tokens (all True without an attention mask or for [B, C] outputs)."""
    m = batch.get("attention_mask")
    if y.dim() >= 3 and isinstance(m, torch.Tensor) and m.shape == y.shape[:2]:
        return m.bool()
    return torch.ones(y.shape[:2] if y.dim() >= 3 else y.shape[:1], dtype=torch.bool)


@dataclass
class Measurement:
    metric: str
    value: float            # the metric (mean over samples where it is a mean)
    worst: float | None     # worst sample (embedding_cosine only)
    ok: bool
    why: str                # "embedding_cosine 0.962 < min 0.97"

    def to_dict(self):
        return {"metric": self.metric, "value": self.value, "worst": self.worst, "ok": self.ok}


def compare(metric: str, batches: list[dict], ref_outs: list[torch.Tensor], new_outs: list[torch.Tensor]):
    """Return (value, worst) of `metric` for candidate outputs against reference outputs."""
    if metric == "embedding_cosine":
        cos = []
        for b, y0, y in zip(batches, ref_outs, new_outs):
            if y0.dim() == 3:
                w = _valid(b, y0).unsqueeze(-1).to(y0.dtype)
                y0, y = (y0 * w).sum(1) / w.sum(1), (y * w).sum(1) / w.sum(1)
            cos.append(F.cosine_similarity(y0.double(), y.double(), dim=-1))
        c = torch.cat(cos)
        return c.mean().item(), c.min().item()
    if metric == "relative_rms":
        num = den = 0.0
        for b, y0, y in zip(batches, ref_outs, new_outs):
            v = _valid(b, y0)
            num += (y - y0).double()[v].pow(2).sum().item()
            den += y0.double()[v].pow(2).sum().item()
        return math.sqrt(num / max(den, 1e-30)), None
    if metric in ("kl", "top1_agreement"):
        tot = n = 0.0
        for b, y0, y in zip(batches, ref_outs, new_outs):
            v = _valid(b, y0)
            l0, l1 = y0.double()[v], y.double()[v]
            if metric == "kl":
                p0 = l0.log_softmax(-1)
                tot += (p0.exp() * (p0 - l1.log_softmax(-1))).sum().item()
            else:
                tot += (l0.argmax(-1) == l1.argmax(-1)).sum().item()
            n += v.sum().item()
        return tot / max(n, 1), None
    if metric == "perplexity_ratio":
        return math.exp(_nll(batches, new_outs) - _nll(batches, ref_outs)), None
    raise ValueError(f"unknown gate metric {metric!r}; allowed: {', '.join(HIGHER_IS_BETTER)}")


def _nll(batches, outs) -> float:
    tot = n = 0.0
    for b, logits in zip(batches, outs):
        ids = b["input_ids"]
        v = _valid(b, logits)[:, 1:] & _valid(b, logits)[:, :-1]
        lp = logits[:, :-1].double().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        tot -= lp[v].sum().item()
        n += v.sum().item()
    return tot / max(n, 1)


def perplexity(batches, outs) -> float:
    return math.exp(_nll(batches, outs))


class Gate:
    """Holds the original model's outputs on a fixed input set and judges candidates against them."""

    def __init__(self, spec, batches: list[dict], reference_outputs: list[torch.Tensor]):
        self.spec, self.batches, self.ref = spec, batches, reference_outputs

    @classmethod
    def from_model(cls, spec, model, batches):
        return cls(spec, batches, run(model, batches))

    def measure(self, model) -> Measurement:
        return self.judge(run(model, self.batches))

    def judge(self, outs: list[torch.Tensor]) -> Measurement:
        s = self.spec
        value, worst = compare(s.metric, self.batches, self.ref, outs)
        fails = []
        if not math.isfinite(value):
            fails.append(f"{s.metric} is {value}")
        if s.min is not None and not value >= s.min:
            fails.append(f"{s.metric} {value:.4f} < min {s.min}")
        if s.max is not None and not value <= s.max:
            fails.append(f"{s.metric} {value:.4f} > max {s.max}")
        if getattr(s, "min_worst", None) is not None and worst is not None and not worst >= s.min_worst:
            fails.append(f"worst-sample {s.metric} {worst:.4f} < min_worst {s.min_worst}")
        return Measurement(s.metric, value, worst, not fails, "; ".join(fails) or "within bound")


@torch.no_grad()
def run(model, batches: list[dict]) -> list[torch.Tensor]:
    return [main_tensor(model(**b)).detach() for b in batches]
