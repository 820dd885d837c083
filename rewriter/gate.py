"""Accuracy gate: compare a candidate model with the ORIGINAL model's cached outputs.

Metrics (recipe names, DESIGN.md §5):
  relative_rms      ‖y − y₀‖ / ‖y₀‖ of the main output over valid tokens        bound: max
  embedding_cosine  cosine of mean-pooled embeddings, mean over samples          bound: min (+ min_worst)
  kl                mean KL(p₀ ‖ p) of next-token distributions                  bound: max
  top1_agreement    fraction of positions whose argmax agrees                     bound: min
  perplexity_ratio  perplexity(candidate) / perplexity(original) on the inputs    bound: max

Labelled batches (a kind of text and a length per batch, or per row of a batch that holds several
kinds: rewriter.calibrate.Calibration) are judged per label and the worst label decides: a bound
met on average but broken on Python source at 1024 tokens is broken. The measurement lists every
label's value.

Data parallel (rewriter/distributed.py): with N processes each rank runs the forward passes of its
share of the batches (batch i on rank i mod N); the per-batch outputs (per-token NLLs for a
perplexity gate) are all-gathered and judged by the same code, in the same batch order, on every
rank, so every rank's measurement equals the one-process measurement bit for bit.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .calibrate import row_labels
from .distributed import SINGLE, World
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
    groups: list[dict] = field(default_factory=list)   # per label: {text, tokens, value, worst, ok}
    label: tuple[str, int] | None = None                # the label that decided (the worst)

    def to_dict(self) -> dict:
        return {"metric": self.metric, "value": self.value, "worst": self.worst, "ok": self.ok,
                "why": self.why, "groups": self.groups,
                **({"text": self.label[0], "tokens": self.label[1]} if self.label else {})}


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
    if metric == "token_nll":          # perplexity_ratio of outputs already reduced by token_nll
        return math.exp(_mean_nll(new_outs) - _mean_nll(ref_outs)), None
    raise ValueError(f"unknown gate metric {metric!r}; allowed: relative_rms, embedding_cosine, kl, "
                     "top1_agreement, perplexity_ratio")


def token_nll(io: ModelIO, batch: dict, logits: torch.Tensor) -> torch.Tensor:
    """[B, T − 1] float64 next-token negative log-likelihoods of `logits` [B, T, V], NaN where the
    pair is not two real tokens. One row at a time, so no float64 copy of the whole batch's logits
    exists; a gate on perplexity keeps these instead of the logits (V times smaller)."""
    ids = io.labels(batch)
    if ids is None:
        raise ValueError(f"{io.name}: perplexity needs next-token labels, and this model's I/O gives none "
                         f"(kind {io.kind!r}); use another gate metric")
    valid = _valid(io, batch, logits)
    v = valid[:, 1:] & valid[:, :-1]
    out = torch.empty(v.shape, dtype=torch.float64)
    for i in range(logits.shape[0]):
        out[i] = -logits[i, :-1].double().log_softmax(-1).gather(-1, ids[i, 1:, None]).squeeze(-1)
    return out.masked_fill(~v, math.nan)


def prefill_length(tokens: int, share: float) -> int:
    """How many of a batch's `tokens` a teacher-forced run prefills (gate.decode): round(share ×
    tokens), at least one and at most tokens − 1, so at least one token is decoded."""
    return min(max(1, round(share * tokens)), max(tokens - 1, 1))


def decoded_only(nll: torch.Tensor, share: float) -> torch.Tensor:
    """Per-token NLLs [B, T − 1] (token_nll) kept only where the prediction came from a decode step
    of a teacher-forced run prefilling `share` of the T tokens: the prediction of token j + 1 is
    made at position j, a decode step's for j ≥ the prefill length; NaN (not judged) before."""
    p = prefill_length(nll.shape[1] + 1, share)
    out = nll.clone()
    out[:, :p] = math.nan
    return out


def _mean_nll(nlls: list[torch.Tensor]) -> float:
    tot = n = 0.0
    for t in nlls:
        real = ~t.isnan()
        tot += t[real].sum().item()
        n += real.sum().item()
    return tot / max(n, 1)


def _nll(batches, outs, io: ModelIO) -> float:
    return _mean_nll([token_nll(io, b, y) for b, y in zip(batches, outs)])


def perplexity(batches, outs, io: ModelIO | None = None) -> float:
    return math.exp(_nll(batches, outs, io or PlainIO()))


class Gate:
    """Holds the original model's outputs on a fixed input set and judges candidates against them."""

    def __init__(self, spec, batches: list[dict], reference_outputs: list[torch.Tensor],
                 io: ModelIO | None = None, labels: list | None = None, reduced: bool = False,
                 world: World = SINGLE):
        """`reference_outputs`: the original's main outputs on `batches` (`reduced`: for a perplexity
        gate, already its per-token NLLs, token_nll). `world`: the processes that share the forward
        passes (each runs its own batches, `World.mine`; the outputs are gathered)."""
        self.spec, self.batches, self.ref, self.io = spec, batches, reference_outputs, io or PlainIO()
        self.world = world
        labels = list(labels or [])
        if labels and len(labels) != len(batches):
            raise ValueError(f"Gate: {len(labels)} labels for {len(batches)} batches")
        # per batch, the label of each row: a batch's label is (text, tokens) or one such per row
        self.rows = [row_labels(lb, len(y)) for lb, y in zip(labels, reference_outputs)]
        self.labels = list(dict.fromkeys(x for r in self.rows for x in r))
        # perplexity needs only each token's NLL: kept instead of the logits (V times smaller)
        self.reduce = spec.metric == "perplexity_ratio"
        if self.reduce and not reduced:
            self.ref = [token_nll(self.io, b, y) for b, y in zip(batches, reference_outputs)]
        # gate.decode: only the tokens a teacher-forced run decodes are judged (the original's from
        # its full forward: it is what generation reproduces); the driver runs candidates decoded
        self.decode = getattr(spec, "decode_share", None)
        if self.decode is not None:
            self.ref = [decoded_only(r, self.decode) for r in self.ref]

    @classmethod
    def from_model(cls, spec, model, batches, io: ModelIO | None = None, labels=None,
                   world: World = SINGLE):
        io, reduced = io or PlainIO(), spec.metric == "perplexity_ratio"
        # reduced batch by batch: one batch's logits exist at a time
        red = functools.partial(token_nll, io) if reduced else None
        ref = world.shard(lambda bs: run(model, bs, io, red), batches, "computing the original's outputs")
        return cls(spec, batches, ref, io, labels, reduced, world)

    def measure(self, model, runner=None) -> Measurement:
        """Judge `model` on the gate's batches. `runner(model, batches, io, reduce=)` computes its main
        outputs (default `run`, the full forward; the driver passes rewriter.cache.ActivationCache.run,
        equal bit for bit and resumed from cached activations). With several processes `runner` gets
        this rank's batches (`World.mine`) and the outputs of all are gathered."""
        runner = runner or run
        # a perplexity gate reduces each batch's logits to per-token NLLs as they come (one batch's
        # logits at a time)
        kw = {"reduce": self._reduce} if self.reduce else {}
        outs = self.world.shard(lambda bs: runner(model, bs, self.io, **kw), self.batches,
                                "measuring a candidate")
        return self.judge(outs, reduced=self.reduce)

    def _reduce(self, batch: dict, logits: torch.Tensor) -> torch.Tensor:
        nll = token_nll(self.io, batch, logits)
        return nll if self.decode is None else decoded_only(nll, self.decode)

    def judge(self, outs: list[torch.Tensor], reduced: bool = False) -> Measurement:
        """The measurement of candidate outputs (`reduced`: already per-token NLLs, token_nll)."""
        metric = how = self.spec.metric
        if self.reduce:
            if not reduced:
                outs = [self._reduce(b, y) for b, y in zip(self.batches, outs)]
            how = "token_nll"
        if len(self.labels) <= 1:
            value, worst = compare(how, self.batches, self.ref, outs, self.io)
            fails = self.spec.failures(value, worst)
            return Measurement(metric, value, worst, not fails, "; ".join(fails) or "within bound",
                               label=self.labels[0] if self.labels else None)
        groups, order = [], self.labels
        for lb in order:
            parts = [self._rows(i, lb, outs) for i in range(len(self.batches))]
            parts = [p for p in parts if p is not None]
            value, worst = compare(how, *map(list, zip(*parts)), self.io)
            fails = self.spec.failures(value, worst)
            groups.append({"text": lb[0], "tokens": lb[1], "value": value, "worst": worst, "ok": not fails,
                           "why": "; ".join(fails)})
        sign = 1 if self.spec.higher_is_better else -1      # the worst group: lowest score, or highest loss
        bad = min(range(len(groups)),
                  key=lambda i: (groups[i]["ok"], sign * _finite(groups[i]["value"], sign)))
        g = groups[bad]
        worsts = [x["worst"] for x in groups if x["worst"] is not None]
        worst = min(worsts) if worsts else None
        fails = self.spec.failures(g["value"], worst)
        where = f" (worst of {len(groups)}: {g['text']} at {g['tokens']} tokens)"
        why = ("; ".join(fails) if fails else f"within bound: {metric} {g['value']:.4g}") + where
        return Measurement(metric, g["value"], worst, not fails, why, groups, order[bad])

    def _rows(self, i: int, label, outs) -> tuple | None:
        """(batch, reference, candidate output) of batch `i` cut to its rows labelled `label`."""
        pick = [r == label for r in self.rows[i]]
        if not any(pick):
            return None
        if all(pick):
            return self.batches[i], self.ref[i], outs[i]
        idx = torch.tensor([j for j, p in enumerate(pick) if p])
        n = len(pick)
        b = {k: v[idx] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v
             for k, v in self.batches[i].items()}
        return b, self.ref[i][idx], outs[i][idx]


def _finite(v: float, sign: int) -> float:
    """`v`, with NaN ranked worst whichever way the bound points."""
    return v if math.isfinite(v) else -sign * math.inf


@torch.no_grad()
def run(model, batches: list[dict], io: ModelIO | None = None, reduce=None) -> list[torch.Tensor]:
    """The main output of `model` on each batch (io.main_output; the first tensor without an io);
    `reduce(batch, y)`, if given, applied to each as soon as it is computed."""
    main = (io or PlainIO()).main_output
    out = []
    for b in batches:
        y = main(model(**b)).detach()
        out.append(y if reduce is None else reduce(b, y))
    return out
