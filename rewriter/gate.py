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

from .io import ModelIO, PlainIO


def _valid(io: ModelIO, batch: dict, y: torch.Tensor) -> torch.Tensor:
    """[B, T] bool of real tokens ([B] for [B, C] outputs), from the model's I/O."""
    return io.valid_tokens(batch, y).bool()


@dataclass
class Measurement:
    metric: str
    value: float            # the metric (mean over samples where it is a mean)
    worst: float | None     # worst sample (embedding_cosine only)
    ok: bool
    why: str                # "embedding_cosine 0.962 < min 0.97"


def compare(metric: str, batches: list[dict], ref_outs: list[torch.Tensor], new_outs: list[torch.Tensor],
            io: ModelIO | None = None):
    """Return (value, worst) of `metric` for candidate outputs against reference outputs."""
    io = io or PlainIO()
    if metric == "embedding_cosine":
        cos = []
        for b, y0, y in zip(batches, ref_outs, new_outs):
            if y0.dim() == 3:
                w = _valid(io, b, y0).unsqueeze(-1).to(y0.dtype)
                y0, y = (y0 * w).sum(1) / w.sum(1), (y * w).sum(1) / w.sum(1)
            cos.append(F.cosine_similarity(y0.double(), y.double(), dim=-1))
        c = torch.cat(cos)
        return c.mean().item(), c.min().item()
    if metric == "relative_rms":
        num = den = 0.0
        for b, y0, y in zip(batches, ref_outs, new_outs):
            v = _valid(io, b, y0)
            num += (y - y0).double()[v].pow(2).sum().item()
            den += y0.double()[v].pow(2).sum().item()
        return math.sqrt(num / max(den, 1e-30)), None
    if metric in ("kl", "top1_agreement"):
        tot = n = 0.0
        for b, y0, y in zip(batches, ref_outs, new_outs):
            v = _valid(io, b, y0)
            l0, l1 = y0.double()[v], y.double()[v]
            if metric == "kl":
                p0 = l0.log_softmax(-1)
                tot += (p0.exp() * (p0 - l1.log_softmax(-1))).sum().item()
            else:
                tot += (l0.argmax(-1) == l1.argmax(-1)).sum().item()
            n += v.sum().item()
        return tot / max(n, 1), None
    if metric == "perplexity_ratio":
        return math.exp(_nll(batches, new_outs, io) - _nll(batches, ref_outs, io)), None
    raise ValueError(f"unknown gate metric {metric!r}; allowed: relative_rms, embedding_cosine, kl, "
                     "top1_agreement, perplexity_ratio")


def _nll(batches, outs, io: ModelIO) -> float:
    tot = n = 0.0
    for b, logits in zip(batches, outs):
        ids = io.labels(b)
        if ids is None:
            raise ValueError(f"{io.name}: perplexity needs next-token labels, and this model's I/O gives none "
                             f"(kind {io.kind!r}); use another gate metric")
        v = _valid(io, b, logits)[:, 1:] & _valid(io, b, logits)[:, :-1]
        lp = logits[:, :-1].double().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        tot -= lp[v].sum().item()
        n += v.sum().item()
    return tot / max(n, 1)


def perplexity(batches, outs, io: ModelIO | None = None) -> float:
    return math.exp(_nll(batches, outs, io or PlainIO()))


class Gate:
    """Holds the original model's outputs on a fixed input set and judges candidates against them."""

    def __init__(self, spec, batches: list[dict], reference_outputs: list[torch.Tensor], io: ModelIO | None = None):
        self.spec, self.batches, self.ref, self.io = spec, batches, reference_outputs, io or PlainIO()

    @classmethod
    def from_model(cls, spec, model, batches, io: ModelIO | None = None):
        return cls(spec, batches, run(model, batches, io), io)

    def measure(self, model) -> Measurement:
        return self.judge(run(model, self.batches, self.io))

    def judge(self, outs: list[torch.Tensor]) -> Measurement:
        value, worst = compare(self.spec.metric, self.batches, self.ref, outs, self.io)
        fails = self.spec.failures(value, worst)
        return Measurement(self.spec.metric, value, worst, not fails, "; ".join(fails) or "within bound")


@torch.no_grad()
def run(model, batches: list[dict], io: ModelIO | None = None) -> list[torch.Tensor]:
    """The main output of `model` on each batch (io.main_output; the first tensor without an io)."""
    main = (io or PlainIO()).main_output
    return [main(model(**b)).detach() for b in batches]
