"""Padding invariance (issue 14): for every approximate rule and every way model code writes its
attention mask, the real rows of a padded sample equal the same sample run alone (fp32, ≤ 1e-5),
on encoders (right padding) and on left-padded decoders.

Subjects. `Tiny` is a custom six-layer pre-norm transformer whose attention writes its mask in
one of the encodings user code writes, one encoding per layer:
bool (SDPA), −inf (SDPA with an additive mask), finfo.min (an additive bias, as HF's eager code),
−1e9 (masked_fill), −1e4 (where) and `(1 − mask) · −10000` (the older BERT / GPT-2 code: an
arithmetic bias). Each layer is its own attention site with its own mask, so one optimize per rule
covers every encoding (a model per encoding would take six times as long; drop, drop_block and
MASA, which read no mask and keep the softmax of the layers they leave, share one), and the per-layer
hidden states the model also returns name the first layer, hence the encoding, at which a padded
sample parts from itself. `Tiny` is built as an encoder (right padding) and as a decoder (causal,
left padding, positions counted over real tokens). Beside it, the tiny HF BERT and Llama
(transformers' own boolean masks; Llama left-padded, RoPE, GQA), one rule per layer for the rules
that read the mask (tracing an HF model costs more than the rest of its run).
Llama gets `position_ids` counted over real tokens, as transformers' `generate` passes them for
left-padded batches: with positions 0 … T − 1 the real tokens sit at an offset, which softmax
attention under RoPE does not see (it reads only relative positions) but linear attention's feature
maps and k-means' routing vectors do (elu1 on the tiny Llama: 1.4e-2), so that setting is not
padding-invariant for any rewrite of RoPE attention that is not a function of relative positions.

Every rule runs under an open gate, so it applies to every site it accepts; `test_every_rule_is_covered`
fails when a built-in approximate rule is added without a case here.
"""
from __future__ import annotations

import math
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rewriter import optimize
from rewriter.calibrate import Calibration
from rewriter.driver import Context
from rewriter.models import Loaded, main_output, make_calibration
from rewriter.rule import all_rules

OPEN_GATE = {"metric": "relative_rms", "max": 100.0}
ENCODINGS = ("bool", "-inf", "finfo.min", "-1e9", "-1e4", "(1-mask)*-10000")
VOCAB, T, LENGTHS = 40, 12, (7, 10)          # padded length; the two padded samples' real lengths
ENCODERS, DECODERS = ("tiny_encoder", "bert"), ("tiny_decoder", "llama")
TINY = ("tiny_encoder", "tiny_decoder")

# Tiny: id -> (rule, options, the Tiny subjects it applies to); one optimize per case
CASES = {
    "linear_elu1": ("linear_attention", {"feature_map": "elu1"}, TINY),
    "linear_hedgehog": ("linear_attention", {"feature_dim": 4, "steps": 2}, TINY),
    "linear_window": ("linear_attention", {"feature_dim": 4, "steps": 2, "window": 3}, ("tiny_decoder",)),
    "agent_attention": ("agent_attention", {"agents": 3}, ("tiny_encoder",)),
    "block_routing_keep": ("block_routing", {"block_size": 2, "keep": 0.5}, TINY),
    "block_routing_topk": ("block_routing", {"block_size": 2, "topk": 1}, TINY),
    "kmeans_routing": ("kmeans_routing", {"clusters": 2, "iters": 5}, TINY),
}
# Rules that keep softmax attention and its mask for the layers they leave (they read no mask), in
# one optimize per subject: layer 0's attention dropped, block 1 dropped, layers 2-5 shared by MASA
KEEP_STEPS = [{"drop_attention": {"layers": [0]}}, {"drop_block": {"layers": [1]}},
              {"masa": {"atoms": 0.5, "layers": [2, 3, 4, 5]}}]
# HF models: the rules that read the mask, one layer each, in one optimize per model
HF_STEPS = {
    "bert": [{"linear_attention": {"feature_map": "elu1", "layers": [0]}},
             {"agent_attention": {"agents": 3, "layers": [1]}},
             {"block_routing": {"block_size": 2, "keep": 0.5, "layers": [2]}},
             {"kmeans_routing": {"clusters": 2, "iters": 5, "layers": [3]}}],
    "llama": [{"linear_attention": {"feature_map": "elu1", "layers": [0]}},
              {"linear_attention": {"feature_dim": 4, "steps": 2, "window": 3, "layers": [1]}},
              {"block_routing": {"block_size": 2, "keep": 0.5, "layers": [2]}},
              {"kmeans_routing": {"clusters": 2, "iters": 5, "layers": [3]}}],
}
# rules that accept none of these subjects, and the words of their refusal
REFUSED = {"normlin": ("normlin", "text model", ENCODERS + DECODERS),
           "agent_attention": ("agent_attention", "causal", DECODERS)}


# ---------------------------------------------------------------------------- the one definition

def test_one_definition_of_a_masked_pair_serves_rules_kernels_and_the_analyzer():
    """rewriter.kernels.keymask: bool False, or additive ≤ −1e4 (−inf, finfo.min, −1e9, −1e4, and
    the (1 − mask)·−10000 of older code in fp16 and bf16 too) masks a pair; key j is real iff some
    query row may attend to it, so a causal mask's keys are real and left padding is not. The
    analyzer calls exactly those masks padding or causal, and a smaller bias arbitrary."""
    from rewriter.kernels.keymask import MASKED, is_masked, key_valid
    from rewriter.masks import _classify

    assert MASKED == -1e4
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        values = torch.tensor([float("-inf"), torch.finfo(dtype).min, -1e9, -1e4, -9000.0, -1.0, 0.0])
        values = values.to(dtype)
        assert is_masked(values).tolist() == [True] * 4 + [False] * 3, dtype
        older = (1.0 - torch.tensor([1, 0]).to(dtype)) * -10000.0
        assert is_masked(older).tolist() == [False, True], dtype
    assert is_masked(torch.tensor([True, False])).tolist() == [False, True]
    with pytest.raises(TypeError, match="bool or floating point"):
        is_masked(torch.tensor([0, 1]))

    real = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)           # left padding, [B, T]
    tril = torch.ones(4, 4, dtype=torch.bool).tril()
    allowed = tril & real[:, None, None, :]                                      # padded rows see nothing
    for fill in (float("-inf"), -1e9, -1e4):
        assert torch.equal(key_valid(torch.zeros(2, 1, 4, 4).masked_fill(~allowed, fill)), real), fill
    assert torch.equal(key_valid(tril), torch.ones(1, 4, dtype=torch.bool))      # causal: every key is real
    assert key_valid(tril, 3).shape == (3, 4)
    assert _classify(torch.zeros(1, 1, 4, 4).masked_fill(~tril, -1e4), 4, 4) == "causal"
    assert _classify(torch.zeros(1, 1, 4, 4).masked_fill(~tril, -9000.0), 4, 4) == "arbitrary"


# ---------------------------------------------------------------------------- the custom model

class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, encoding: str, causal: bool):
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"unknown mask encoding {encoding!r}; known: {ENCODINGS}")
        self.heads, self.head_dim, self.encoding, self.causal = heads, dim // heads, encoding, causal
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, attention_mask):
        B, t, _ = x.shape
        heads = lambda y: y.view(B, t, self.heads, self.head_dim).transpose(1, 2)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        keep = attention_mask[:, None, None, :].bool()                                   # [B, 1, 1, T]
        tril = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        if self.causal:
            keep = keep & tril
        if self.encoding == "bool":
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        elif self.encoding == "-inf":
            bias = torch.zeros(keep.shape, dtype=q.dtype, device=x.device).masked_fill(~keep, float("-inf"))
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            s = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if self.encoding == "finfo.min":
                bias = torch.zeros(keep.shape, dtype=s.dtype, device=x.device)
                s = s + bias.masked_fill(~keep, torch.finfo(s.dtype).min)
            elif self.encoding == "-1e9":
                s = s.masked_fill(~keep, -1e9)
            elif self.encoding == "-1e4":
                s = torch.where(keep, s, -1e4)
            else:                       # older BERT / GPT-2: causal by where, padding as an arithmetic bias
                if self.causal:
                    s = torch.where(tril, s, -1e4)
                s = s + (1.0 - attention_mask[:, None, None, :].to(s.dtype)) * -10000.0
            o = s.softmax(-1) @ v
        return self.o(o.transpose(1, 2).reshape(B, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, encoding: str, causal: bool):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, encoding, causal)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                                                nn.Linear(2 * dim, dim))

    def forward(self, x, attention_mask):
        x = x + self.attn(self.norm1(x), attention_mask)
        return x + self.mlp(self.norm2(x))


class Tiny(nn.Module):
    """A pre-norm transformer with one attention mask encoding per layer. Returns (main output,
    per-layer hidden states [layers, B, T, dim]); the decoder's main output is logits."""

    def __init__(self, encodings=ENCODINGS, causal: bool = False, dim: int = 16, heads: int = 2,
                 seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.causal = causal
            self.emb, self.pos = nn.Embedding(VOCAB, dim), nn.Embedding(64, dim)
            self.blocks = nn.ModuleList(Block(dim, heads, e, causal) for e in encodings)
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, VOCAB) if causal else None

    def forward(self, input_ids, attention_mask):
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)      # counted over real tokens
        x = self.emb(input_ids) + self.pos(positions)
        hidden = []
        for block in self.blocks:
            x = block(x, attention_mask)
            hidden.append(x)
        x = self.norm(x)
        return (self.head(x) if self.causal else x), torch.stack(hidden)


# ---------------------------------------------------------------------------- inputs

def _sample(g, n: int, vocab: int) -> torch.Tensor:
    return torch.randint(1, vocab, (n,), generator=g)


def _pad(rows: list[torch.Tensor], t: int, left: bool) -> dict:
    """Token rows padded (id 0) to t on the left or on the right, with their attention_mask."""
    ids = torch.zeros(len(rows), t, dtype=torch.long)
    mask = torch.zeros(len(rows), t, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if left else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    return {"input_ids": ids, "attention_mask": mask}


def _inputs(batch: dict, names) -> dict:
    """`batch` with the other inputs among `names` (the traced ones): BERT's token_type_ids (zeros),
    position_ids counted over real tokens (what `generate` passes for left-padded batches)."""
    extra = {"token_type_ids": torch.zeros_like(batch["input_ids"]),
             "position_ids": (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)}
    return {**batch, **{k: v for k, v in extra.items() if k in names}}


def _tiny_calibration(left: bool) -> Calibration:
    g = torch.Generator().manual_seed(1)
    rows = [_sample(g, n, VOCAB) for n in (T, 9, 6, 11)]
    return Calibration(batches=[_pad(rows, T, left)], heldout=[], source="random tokens", samples=4,
                       seq_len=T)


@pytest.fixture(scope="module")
def subjects(bert, llama):
    """id → (Loaded, Calibration, left-padded?, vocabulary size)."""
    tiny = {}
    for name, causal in (("tiny_encoder", False), ("tiny_decoder", True)):
        model = Tiny(causal=causal).eval()
        tiny[name] = (Loaded(name, model, "causal_lm" if causal else "encoder", None, 64),
                      _tiny_calibration(left=causal), causal, VOCAB)
    cal = {"samples": 4, "seq_len": 16, "batch_size": 4, "heldout": 0}
    llama_cal = make_calibration(llama, **cal)
    llama_cal.batches = [_inputs(b, ["position_ids"]) for b in llama_cal.batches]
    hf = {"bert": (bert, make_calibration(bert, **cal), False, bert.model.config.vocab_size),
          "llama": (llama, llama_cal, True, llama.model.config.vocab_size)}
    return {**tiny, **hf}


# ---------------------------------------------------------------------------- the property

def _outputs(out) -> list[torch.Tensor]:
    """The main output, then (Tiny) each layer's hidden states."""
    main = main_output(out)
    return [main, *out[1].unbind(0)] if isinstance(out, tuple) else [main]


def padding_gaps(model, names, left: bool, vocab: int) -> list[float]:
    """Max |Δ| over the real rows between each sample of a padded batch and the sample run alone
    (batch 1, no padding), per output of `_outputs` (main output first). The batch: samples of
    LENGTHS real tokens padded to T beside a row without padding; `names`: the model's inputs."""
    g = torch.Generator().manual_seed(7)
    rows = [_sample(g, n, vocab) for n in LENGTHS]
    padded = _inputs(_pad(rows + [_sample(g, T, vocab)], T, left), names)
    gaps = None
    with torch.no_grad():
        together = _outputs(model(**padded))
        for i, r in enumerate(rows):
            alone = _outputs(model(**_inputs(_pad([r], len(r), left), names)))
            real = slice(T - len(r), T) if left else slice(0, len(r))
            d = [(a[i, real] - b[0]).abs().max().item() for a, b in zip(together, alone)]
            gaps = d if gaps is None else [max(x, y) for x, y in zip(gaps, d)]
    return gaps


def _explain(gaps: list[float], model_id: str) -> str:
    bad = [i for i, d in enumerate(gaps[1:]) if d > 1e-5]
    where = (f"; first at layer {bad[0]} (mask encoding {ENCODINGS[bad[0]]!r})" if bad and
             model_id.startswith("tiny") else "")
    return f"real rows of a padded sample differ from the sample alone by {max(gaps):.2e}{where}"


@pytest.mark.parametrize("model_id", ENCODERS + DECODERS)
def test_the_original_models_are_padding_invariant(model_id, subjects):
    """The property is the models' own: what a rewrite must keep."""
    loaded, calib, left, vocab = subjects[model_id]
    gaps = padding_gaps(loaded.model, calib.batches[0], left, vocab)
    assert max(gaps) <= 1e-5, _explain(gaps, model_id)


@pytest.fixture(scope="module")
def optimized(subjects):
    """(subject, steps) -> its OptimizedModel under the open gate, built once per module."""
    done = {}

    def get(model_id: str, steps: list[dict]):
        key = (model_id, repr(steps))
        if key not in done:
            loaded, calib, _, _ = subjects[model_id]
            done[key] = optimize(loaded, {"gate": OPEN_GATE, "steps": steps}, calibration=calib,
                                 progress=False, measure_latency=False)
        return done[key]
    return get


def _check_applied(opt, steps: list[dict]) -> None:
    """Every site the steps select was rewritten (no refusal, rollback, error or skip)."""
    odd = {(r.rule, r.status, r.reason) for r in opt.records if r.status != "applied"}
    assert not odd, odd
    every = [s.index for s in opt.sites]
    chosen = {i for step in steps for o in step.values() for i in o.get("layers", every)}
    covered = {s for r in opt.records if r.status == "applied" for s in r.sites}
    assert covered == chosen, (covered, chosen)


PARAMS = [(m, c) for c, (_, _, models) in CASES.items() for m in models]


@pytest.mark.parametrize("model_id, case", PARAMS, ids=[f"{c}-{m}" for m, c in PARAMS])
def test_real_rows_of_a_padded_sample_equal_the_sample_alone(model_id, case, subjects, optimized):
    _, calib, left, vocab = subjects[model_id]
    rule, options, _ = CASES[case]
    steps = [{rule: options}]
    opt = optimized(model_id, steps)
    _check_applied(opt, steps)
    gaps = padding_gaps(opt, calib.batches[0], left, vocab)
    assert max(gaps) <= 1e-5, f"{case} on {model_id}: " + _explain(gaps, model_id)


STEPPED = [(m, steps) for m in TINY for steps in [KEEP_STEPS]] + list(HF_STEPS.items())


@pytest.mark.parametrize("model_id, steps", STEPPED, ids=[f"{'hf' if m in HF_STEPS else 'drop_masa'}-{m}"
                                                          for m, _ in STEPPED])
def test_one_rule_per_layer_keeps_the_padded_rows(model_id, steps, subjects, optimized):
    """Several rules in one model, each on its own layers: drop, drop_block and MASA on Tiny (they
    keep the softmax and its mask of the layers they leave), the mask-reading rules on HF models."""
    _, calib, left, vocab = subjects[model_id]
    opt = optimized(model_id, steps)
    _check_applied(opt, steps)
    gaps = padding_gaps(opt, calib.batches[0], left, vocab)
    rules = [f"{next(iter(s))} (layers {next(iter(s.values()))['layers']})" for s in steps]
    assert max(gaps) <= 1e-5, f"{', '.join(rules)} on {model_id}: " + _explain(gaps, model_id)


@pytest.mark.parametrize("model_id", ENCODERS + DECODERS)
def test_rules_that_do_not_apply_refuse_every_site_with_a_reason(model_id, subjects, optimized):
    """The rule's own plan and check, as the driver runs them, on the sites as analyzed."""
    loaded, calib, _, _ = subjects[model_id]
    opt = optimized(model_id, HF_STEPS.get(model_id, KEEP_STEPS))
    ctx = Context(opt.graph_module, list(opt.sites), calib, loaded)
    rules = all_rules()
    for rule, words, models in REFUSED.values():
        if model_id not in models:
            continue
        r, opts = rules[rule], rules[rule].options()
        candidates = r.plan(ctx, list(opt.sites), opts)
        assert len(candidates) == len(opt.sites)
        for c in candidates:
            reason = r.check(c, opts)
            assert reason and words in reason, (rule, c.site.index, reason)


def _builtin(rule) -> bool:
    """A rule shipped by an installed package (an entry point of group rewriter.rules), not one a
    test registered."""
    modules = [ep.value for ep in entry_points(group="rewriter.rules")]
    return any(rule.build.__module__ == m or rule.build.__module__.startswith(m + ".") for m in modules)


def test_every_rule_is_covered():
    """Every approximate built-in rule has a case here, or is refused by every subject."""
    approximate = {name for name, r in all_rules().items() if not r.exact and _builtin(r)}
    covered = ({rule for rule, _, _ in CASES.values()} | {rule for rule, _, _ in REFUSED.values()}
               | {rule for steps in [KEEP_STEPS, *HF_STEPS.values()] for step in steps for rule in step})
    assert approximate, "no approximate rule found"
    missing = sorted(approximate - covered)
    assert not missing, f"approximate rules without a padding case: {missing}"
