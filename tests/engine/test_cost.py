"""The whole-model cost model (rewriter.cost): every node's FLOPs as a sympy expression in N, read from
the traced graph's symbolic shapes, against hand counts; our ops' formulas (kernels/<op>/flops.py);
unknown ops named; and the report's speed part: the keys, their save/load round trip, the latency
sweep's lengths, the crossover and the slower-at-the-recipe's-length warning."""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import sympy
import torch
import torch.nn.functional as F

from rewriter import cost as C
from rewriter import load, optimize
from rewriter.io import PlainIO
from rewriter.report import N, Report, crossover, latency_warning, stretch, sweep_lengths
from rewriter.trace import trace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import zoo_factory  # noqa: E402

aten = torch.ops.aten
OPEN_GATE = {"metric": "relative_rms", "max": 100.0}


class SeqIO(PlainIO):
    """A bare module whose inputs [B, T, ...] vary in batch and length."""

    def dynamic_dims(self, x):
        return {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} if x.dim() >= 2 else None


class Block(torch.nn.Module):
    """One post-norm transformer block written out: q/k/v/o, SDPA, residual, LayerNorm, GELU MLP."""

    def __init__(self, d=32, heads=4, ffn=64, causal=False):
        super().__init__()
        self.d, self.h, self.causal = d, heads, causal
        self.q, self.k, self.v, self.o = (torch.nn.Linear(d, d) for _ in range(4))
        self.up, self.down, self.ln = torch.nn.Linear(d, ffn), torch.nn.Linear(ffn, d), torch.nn.LayerNorm(d)

    def forward(self, x):
        B, T, _ = x.shape
        split = lambda y: y.view(B, T, self.h, self.d // self.h).transpose(1, 2)   # noqa: E731
        a = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           is_causal=self.causal)
        x = self.ln(x + self.o(a.transpose(1, 2).reshape(B, T, self.d)))
        return x + self.down(F.gelu(self.up(x)))


def _order(per_token: sympy.Expr) -> int:
    """The power of N a per-token count grows with (constant terms over N included)."""
    return sympy.degree(sympy.expand(per_token * N), N) - 1


def _block_by_hand(d=32, h=4, f=64, causal=False) -> sympy.Expr:
    """FLOPs per token at batch 1: linears 2·in·out + out (bias), SDPA per pair 2·dh + 2·dh + 5
    (causal: the triangle's (N + 1)/2 pairs per query), elementwise 1, LayerNorm 5 per element."""
    dh = d // h
    pairs = (N + 1) / 2 if causal else N
    return (4 * (2 * d * d + d) + h * pairs * (4 * dh + 5) + d + 5 * d + (2 * d * f + f) + f
            + (2 * f * d + d) + d)


@pytest.mark.parametrize("causal", [False, True])
def test_a_written_out_block_counts_as_by_hand(causal):
    m = Block(causal=causal).eval()
    gm = trace(m, (torch.randn(2, 12, 32),), {}, io=SeqIO())
    c = C.graph_flops(gm)
    assert c.unknown == {} and c.fixed == {}
    assert sympy.simplify(c.per_token - _block_by_hand(causal=causal)) == 0, c.per_token
    assert c.at(100) == pytest.approx(float(_block_by_hand(causal=causal).subs(N, 100)) * 100)
    # batch: the count scales with the stated batch, the sequence symbol is still N
    assert sympy.simplify(C.graph_flops(gm, batch=3).total - 3 * c.total) == 0


def test_tiny_bert_linears_and_attention_match_the_weights():
    """HF BERT (2 layers, hidden 32, 4 heads): each linear node counts 2·in·out + out per token, read
    from its weight; each SDPA node N²·heads·(4·dh + 5); the sequence symbol is found from the
    attention nodes, the batch from dim 0."""
    from rewriter.api import _prepare, _resolve
    loaded = _resolve(zoo_factory.family("bert"), None)
    gm = _prepare(loaded, loaded.example_inputs(batch=2, seq_len=12))[0]
    c = C.graph_flops(gm)
    assert c.unknown == {}
    assert "attention" in c.symbols.how
    linears = [n for n in gm.graph.nodes if n.target is aten.linear.default]
    sdpas = [n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert len(linears) == 2 * 6 + 1 and len(sdpas) == 2          # q k v o up down per layer + pooler
    for n in linears:
        out_f, in_f = n.args[1].meta["val"].shape
        rows = 1 if n.name == linears[-1].name else N               # the pooler sees the CLS row only
        assert sympy.simplify(c.by_node[n.name] - rows * (2 * in_f * out_f + out_f)) == 0, n.name
    for n in sdpas:
        assert sympy.simplify(c.by_node[n.name] - N * N * 4 * (4 * 8 + 5)) == 0
    assert _order(c.per_token) == 1


def test_drop_attention_ratio_matches_the_removed_nodes(bert):
    """drop_attention on one layer of the seeded tiny BERT: the FLOPs the count loses are the nodes the
    drop removed (q/k/v/o + SDPA of that layer, by hand), and the predicted speed-up is before / after."""
    from rewriter.api import _prepare
    opt = optimize(bert, {"steps": [{"drop_attention": {"layers": [1]}}], "gate": OPEN_GATE,
                          "calibration": {"samples": 4, "seq_len": 16, "batch_size": 4, "heldout": 0}},
                   progress=False, measure_latency=False)
    assert [r.status for r in opt.records] == ["applied"]
    site = opt.sites[1]
    before_gm = _prepare(bert, opt.example[1])[0]
    before = C.graph_flops(before_gm)
    after = C.graph_flops(opt.graph_module, symbols=before.symbols)
    kept = {n.name for n in opt.graph_module.graph.nodes}
    total = lambda es: sympy.expand(sum(es, sympy.Integer(0)))                     # noqa: E731
    removed = total(e for k, e in before.by_node.items() if k not in kept)
    added = total(e for k, e in after.by_node.items() if k not in before.by_node)
    assert sympy.simplify(before.total - after.total - (removed - added)) == 0
    d, h, dh = site.heads * site.head_dim, site.heads, site.head_dim
    lost = sympy.expand((removed - added) / N)
    assert sympy.simplify(lost.coeff(N, 1) - h * (4 * dh + 5)) == 0            # the layer's attention core
    projections = 4 * (2 * d * d + d)
    assert projections <= lost.coeff(N, 0) <= projections + 8 * d             # + a few elementwise ops
    n = 256
    assert C.predicted(before, after, n) == pytest.approx(before.at(n) / (before.at(n) - float(
        (removed - added).subs(N, n))), rel=1e-4)


def test_linear_attention_makes_the_count_linear_in_n(bert):
    """Every site → rewriter::linear_attention: no N² attention term is left but the graph's own
    [B, 1, N, N] mask arithmetic; our op's formula is used (nothing unknown)."""
    from rewriter.api import _prepare
    opt = optimize(bert, {"steps": [{"linear_attention": {"feature_map": "elu1"}}], "gate": OPEN_GATE,
                          "calibration": {"samples": 4, "seq_len": 16, "batch_size": 4, "heldout": 0}},
                   progress=False, measure_latency=False)
    assert all(r.status == "applied" for r in opt.records)
    before = C.graph_flops(_prepare(bert, opt.example[1])[0])
    after = C.graph_flops(opt.graph_module, symbols=before.symbols)
    assert after.unknown == {}
    ops = {n.target for n in opt.graph_module.graph.nodes}
    assert torch.ops.rewriter.linear_attention.default in ops
    quad = lambda c: c.per_token.coeff(N, 1)                  # noqa: E731
    assert quad(after) < quad(before) / 20                    # the mask's few FLOPs per pair remain
    assert C.predicted(before, after, 4096) > C.predicted(before, after, 64) > 1


class FFTMix(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.lin(torch.fft.rfft(x, dim=1).real)


def test_an_op_without_a_rule_is_named_not_counted_silently():
    gm = trace(FFTMix().eval(), (torch.randn(2, 12, 16),), {}, io=SeqIO())
    c = C.graph_flops(gm)
    assert list(c.unknown) == ["_fft_r2c"] and c.unknown["_fft_r2c"]        # the op and its node(s)
    whole = C.model_cost(c, gm, seq_len=12)
    assert whole.info["unknown_ops"] == {"before": ["_fft_r2c"], "after": ["_fft_r2c"]}
    r = Report("m", "generic", [], [], 1, 1, sympy.Integer(0), sympy.Integer(0),
               flops_per_token=whole.per_token, predicted_speedup=whole.predicted, cost=whole.info)
    assert "ops without a FLOP count" in str(r) and "_fft_r2c" in str(r)


def _schema_args(name: str) -> list[str]:
    op = getattr(torch.ops.rewriter, name).default
    return [a.name for a in op._schema.arguments]


def test_every_rewriter_op_has_a_formula_taking_its_arguments():
    """Every op registered under rewriter:: has a formula next to it whose parameters are the op's own
    arguments, in order; called with shapes it gives a positive count."""
    import rewriter.kernels  # noqa: F401  (registers the ops)
    from rewriter.kernels.flops import formula
    ops = sorted(n.split("::")[1] for n in torch._C._dispatch_get_all_op_names()
                 if n.startswith("rewriter::"))
    assert len(ops) >= 10
    missing = [op for op in ops if formula(f"rewriter::{op}") is None]
    assert missing == []
    B, H, T, D = sympy.symbols("B H T D", positive=True)
    for op in ops:
        f = formula(f"rewriter::{op}")
        params = [p.name for p in inspect.signature(f).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        schema = _schema_args(op)
        assert params == schema[:len(params)] and params, (op, params, schema)
        # every tensor argument a 4-D shape, the rest their defaults or small ints
        opd = getattr(torch.ops.rewriter, op).default
        args = []
        for a in opd._schema.arguments:
            t = str(a.type)
            if "Tensor" in t and "[]" not in t:
                args.append((B, H, T, D))
            elif a.has_default_value():
                args.append(a.default_value)
            elif t in ("int", "SymInt"):
                args.append(16)
            elif t == "float":
                args.append(0.125)
            elif t == "bool":
                args.append(False)
            else:
                args.append(None)
        value = sympy.sympify(f(*args)).subs({B: 1, H: 4, T: 64, D: 16})
        assert value.is_number and value > 0, (op, value)


def test_expressions_print_as_text_the_artifact_reader_takes():
    """FloorDiv, Min and the like from torch's symbolic sizes come out as floor / Min, which
    rewriter.artifact.parse_flops reads back (a saved report must load)."""
    from rewriter.artifact import parse_flops
    from torch.utils._sympy.functions import CeilDiv, FloorDiv, Mod
    s = sympy.Symbol("s0", positive=True, integer=True)
    e = C._to_plain((FloorDiv(s + 15, 16) * 3 + CeilDiv(s, 64) + Mod(s, 8)).xreplace({s: N}))
    assert sympy.simplify(parse_flops(str(e), "report.json", "k") - e) == 0
    for n in (1, 17, 100):
        assert int(e.subs(N, n)) == (n + 15) // 16 * 3 + -(-n // 64) + n % 8


# ---- the report's speed part -------------------------------------------------------------------

def test_report_keys_exist_and_round_trip(bert, tmp_path):
    opt = optimize(bert, {"steps": [{"drop_attention": {"layers": [0, 1]}}], "gate": OPEN_GATE,
                          "calibration": {"samples": 2, "seq_len": 16, "batch_size": 2, "heldout": 0}},
                   progress=False)
    d = opt.report.to_dict()
    assert set(d["flops_per_token"]) == {"before", "after"} and "attention_flops_per_token" in d
    before, after = (opt.report.flops_per_token[k] for k in ("before", "after"))
    assert _order(after) == 1 and after.subs(N, 64) < before.subs(N, 64)
    L = d["latency"]
    lengths = [r["seq_len"] for r in L["by_length"]]
    assert lengths[0] == 16 and lengths == sorted(lengths) and max(lengths) <= bert.max_positions["input_ids"]
    assert set(d["predicted_speedup"]) == {str(n) for n in lengths}
    for r in L["by_length"]:
        assert r["before_ms"] > 0 and r["after_ms"] > 0 and r["predicted_speedup"] > 1
        assert r["predicted_speedup"] == d["predicted_speedup"][str(r["seq_len"])]
    assert L["crossover"]["why"] and isinstance(L["slower"], bool)
    text = str(opt.report)
    assert "FLOPs/token, whole model" in text and "latency across lengths" in text
    again = load(opt.save(tmp_path / "m"))
    assert again.report.flops_per_token == opt.report.flops_per_token
    assert again.report.predicted_speedup == {int(k): v for k, v in d["predicted_speedup"].items()}
    assert again.report.to_dict()["latency"] == L


def test_measure_latency_false_skips_the_timing_and_the_whole_model_count(bert):
    opt = optimize(bert, {"steps": [{"drop_attention": {"layers": [0]}}], "gate": OPEN_GATE,
                          "calibration": {"samples": 2, "seq_len": 16, "batch_size": 2, "heldout": 0}},
                   progress=False, measure_latency=False)
    d = opt.report.to_dict()
    assert d["latency"] == {} and "flops_per_token" not in d and "attention_flops_per_token" in d


def test_crossover_on_synthetic_timings():
    rows = lambda *s: [{"seq_len": 128 * 4 ** i, "speedup": x} for i, x in enumerate(s)]  # noqa: E731
    assert crossover(rows(0.8, 0.95, 1.3)) == {"seq_len": 2048,
                                               "why": "slower up to 512, faster from 2048 on"}
    assert crossover(rows(1.1, 1.2, 1.5))["seq_len"] == 128
    assert crossover(rows(0.7, 0.8, 0.9)) == {"seq_len": None,
                                              "why": "slower at every measured length up to 2048"}
    assert crossover(rows(1.2, 1.1, 0.9))["seq_len"] is None                 # slower at the longest
    assert crossover(rows(1.2, 0.9, 1.1))["seq_len"] == 2048                 # pays for good from 2048
    assert crossover(list(reversed(rows(0.9, 1.0))))["seq_len"] == 512       # any order; 1.0× counts
    assert crossover([])["seq_len"] is None


def test_slower_at_the_recipes_length_warns_in_notes_and_rendering():
    lat = {"seq_len": 128, "batch": 8, "before_ms": 10.0, "after_ms": 12.5, "speedup": 0.8,
           "by_length": [], "crossover": {"seq_len": 2048, "why": "slower up to 512, faster from 2048 on"}}
    w = latency_warning(lat)
    assert "SLOWER" in w and "128 tokens" in w and "0.80×" in w and "pays from 2048" in w
    r = Report("m", "encoder", [], [], 1, 1, sympy.Integer(0), sympy.Integer(0), latency=lat)
    assert r.notes == [w] and f"warning: {w}" in " ".join(str(r).split())     # rich wraps lines
    again = Report.from_dict(r.to_dict())                        # a saved report does not warn twice
    assert again.notes == [w]
    assert latency_warning({**lat, "speedup": 0.99}) is None and latency_warning({}) is None   # noise


def test_sweep_lengths_stop_at_the_position_limit_and_the_flop_cap():
    assert sweep_lengths(128, None) == [128, 512, 2048]
    assert sweep_lengths(128, 512) == [128, 512]
    assert sweep_lengths(128, 1000) == [128, 512, 1000]
    assert sweep_lengths(512, 512) == [512]
    assert sweep_lengths(128, None, cost=lambda n: n * 1e9, max_flops=1e12) == [128, 512]
    assert sweep_lengths(4096, None, cost=lambda n: 1e15) == [4096]             # the recipe's length always


def test_stretch_builds_one_row_at_another_length():
    batch = {"input_ids": torch.arange(10).view(2, 5), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "flag": True}
    out = stretch(batch, 12, {"input_ids": [1], "attention_mask": [1]})
    assert out["input_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]]
    assert out["attention_mask"].shape == (1, 12) and out["flag"] is True
    assert stretch(batch, 3, {"input_ids": [1]}, rows=2)["input_ids"].tolist() == [[0, 1, 2], [0, 1, 2]]


def test_counting_a_routed_graph_logs_no_errors(llama, caplog):
    """Block routing's run-time code pads by symbolic sizes, which fake tensors' meta kernels reject
    (and log at ERROR with a traceback) before the counter runs the op's decomposition: the count
    completes and the user sees no traceback."""
    opt = optimize(llama, {"calibration": {"samples": 4, "seq_len": 32, "batch_size": 4, "heldout": 0},
                           "gate": {"metric": "relative_rms", "max": 100.0},
                           "steps": [{"block_routing": {"layers": [0], "keep": 0.5, "affinity": "sampled"}}]},
                   progress=False, measure_latency=False)
    assert [r.status for r in opt.records] == ["applied"]
    caplog.clear()
    with caplog.at_level("DEBUG"):
        cost = C.graph_flops(opt.graph_module)
    assert cost.total.free_symbols and not cost.unknown
    errors = [r for r in caplog.records if r.levelno >= 40]
    assert not errors, errors[0].getMessage()[:300]
