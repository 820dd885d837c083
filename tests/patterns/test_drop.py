"""drop_attention / drop_block (LLM-Drop, arXiv:2406.15786): fires, shrinks the graph, keeps the
post-norm LayerNorm, refuses where there is no residual, and the gate rolls back a damaging drop."""
import pytest
import torch
import torch.nn as nn

from rewriter import inspect, optimize
from rewriter.calibrate import Calibration

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _recipe(step, **gate):
    return {"calibration": {"samples": 16, "seq_len": 32, "batch_size": 8, "heldout": 8},
            "gate": gate or {"metric": "embedding_cosine", "min": 0.97, "min_worst": 0.9}, "steps": [step]}


def _count(gm, target):
    return sum(n.target == target for n in gm.graph.nodes)


def test_drop_attention_fires_and_graph_shrinks(minilm):
    opt = optimize(minilm, _recipe({"drop_attention": {"max_layers": 1, "compensate": "mean"}}),
                   progress=False, measure_latency=False)
    applied = [r for r in opt.report.records if r.status == "applied"]
    assert len(applied) == 1 and applied[0].rule == "drop_attention"
    assert "importance" in applied[0].info
    gm = opt.graph_module
    assert _count(gm, SDPA) == 5
    assert opt.report.params_after < opt.report.params_before
    # post-norm BERT: every LayerNorm stays (only the attention's contribution is removed)
    assert _count(gm, torch.ops.aten.layer_norm.default) == 13
    assert opt.report.heldout["metric"] == "embedding_cosine" and opt.report.heldout["value"] >= 0.97
    assert any(k.endswith("_mean") for k, _ in gm.named_buffers())   # the compensating bias is stored


def test_plain_drop_matches_paper_edit(minilm):
    """compensate=none is the paper's edit: LayerNorm(x + F(x)) → LayerNorm(x), no new tensors."""
    opt = optimize(minilm, _recipe({"drop_attention": {"max_layers": 1}}, metric="embedding_cosine", min=0.9),
                   progress=False, measure_latency=False)
    (r,) = [r for r in opt.report.records if r.status == "applied"]
    assert r.built == {} and not any(k.startswith("rw_") for k, _ in opt.graph_module.named_buffers())
    assert _count(opt.graph_module, SDPA) == 5
    assert str(opt.report.flops_after) != str(opt.report.flops_before)


def test_importance_ranks_and_drops_least_important_first(minilm):
    opt = optimize(minilm, _recipe({"drop_attention": {"max_layers": 2}}, metric="embedding_cosine", min=0.0),
                   progress=False, measure_latency=False)
    decided = [r for r in opt.report.records if r.status in ("applied", "skipped")]
    scores = [r.info["importance"] for r in decided if "importance" in r.info]
    applied = [r.info["importance"] for r in decided if r.status == "applied"]
    assert len(applied) == 2 and max(applied) <= min(s for s in scores if s not in applied)


def test_gate_rolls_back_damaging_drop(minilm):
    # patience: null, so that every ranked candidate is gated (the default stops after 3 failures)
    opt = optimize(minilm, _recipe({"drop_block": {"max_layers": 6, "patience": None}}, metric="embedding_cosine",
                                   min=0.9999),
                   progress=False, measure_latency=False)
    assert all(r.status == "rolled_back" for r in opt.report.records)
    assert all("gate: embedding_cosine" in r.reason for r in opt.report.records)
    assert _count(opt.graph_module, SDPA) == 6


class NoResidual(nn.Module):
    """Attention with no residual connection: nothing for LLM-Drop to rewire to."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(x.shape))


def test_refuses_without_residual_with_reason():
    m = NoResidual().eval()
    x = [{"x": torch.randn(2, 10, 32)} for _ in range(2)]
    calib = Calibration(batches=x, heldout=x[:1], source="random", samples=4, seq_len=10)
    assert len(inspect(m, {"x": x[0]["x"]})) == 1
    opt = optimize(m, _recipe({"drop_attention": {}}, metric="relative_rms", max=1.0), calibration=calib,
                   progress=False, measure_latency=False)
    (r,) = opt.report.records
    assert r.status == "rejected" and "no residual add" in r.reason


def test_drop_block_removes_attention_and_mlp_in_prenorm_llama():
    """Pre-norm Llama (GQA, RoPE): the block's output (the MLP residual add, read through a dtype cast)
    is rewired to its input, so the block's 7 linears go."""
    from rewriter.models import load_model
    llama = load_model("llama")
    rec = {"calibration": {"samples": 8, "seq_len": 32, "batch_size": 4, "heldout": 4},
           "gate": {"metric": "perplexity_ratio", "max": 100.0}, "steps": [{"drop_block": {"max_layers": 1}}]}
    opt = optimize(llama, rec, progress=False, measure_latency=False)
    assert [r.status for r in opt.report.records].count("applied") == 1
    linears = _count(opt.graph_module, torch.ops.aten.linear.default)
    assert _count(opt.graph_module, SDPA) == 3 and linears == 4 * 7 + 1 - 7


class Parallel(nn.Module):
    """Falcon / GPT-J block: x + (MLP(n(x)) + Attn(n(x))), the MLP sum written in place (`m += a`,
    as Falcon's `mlp_output += attention_output`) when `inplace`."""

    def __init__(self, d: int = 32, h: int = 4, inplace: bool = False):
        super().__init__()
        self.h, self.inplace = h, inplace
        self.norm, self.qkv, self.o = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        y = self.norm(x)
        q, k, v = self.qkv(y).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = self.o(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        m = self.down(nn.functional.gelu(self.up(y)))
        if self.inplace:
            m += a
            return x + m
        return x + m + a


def _calib(n=3, t=10):
    g = torch.Generator().manual_seed(0)
    xs = [{"x": torch.randn(4, t, 32, generator=g)} for _ in range(n)]
    return Calibration(batches=xs[:-1], heldout=xs[-1:], source="random", samples=4 * (n - 1), seq_len=t)


def _run(model, step):
    calib = _calib()
    opt = optimize(model, _recipe(step, metric="relative_rms", max=10.0), calibration=calib,
                   example_inputs={"x": calib.batches[0]["x"]}, progress=False, measure_latency=False)
    (r,) = [r for r in opt.report.records if r.status == "applied"]
    return opt, r, calib


def test_parallel_drop_keeps_the_mlp_branch():
    """x + MLP(n(x)) + Attn(n(x)) → x + MLP(n(x)), equal to the module with its attention output
    zeroed; importance is 1 − cos(x, x + Attn(n(x)))."""
    m = Parallel().eval()
    opt, r, calib = _run(m, {"drop_attention": {}})
    x = torch.randn(3, 7, 32)
    hook = m.o.register_forward_hook(lambda mod, i, out: torch.zeros_like(out))
    with torch.no_grad():
        want = m(x)
    hook.remove()
    with torch.no_grad():
        assert (opt(x=x) - want).abs().max().item() <= 1e-5
        assert (m(x) - want).abs().max().item() > 1e-2
    with torch.no_grad():   # the importance, computed here from the module's own values
        cos = [nn.functional.cosine_similarity(b["x"].double(), (b["x"] + _attn_out(m, b["x"])).double(),
                                               dim=-1) for b in calib.batches]
    assert r.info["importance"] == pytest.approx(1 - torch.cat(cos).mean().item(), abs=1e-6)
    names = {k for k, _ in opt.graph_module.named_parameters()}
    assert {"up.weight", "down.weight", "norm.weight"} <= names and not names & {"qkv.weight", "o.weight"}


def _attn_out(m, x):
    seen = []
    h = m.o.register_forward_hook(lambda mod, i, out: seen.append(out))
    m(x)
    h.remove()
    return seen[0]


def test_parallel_drop_compensated_by_the_mean_branch():
    """compensate: mean keeps the attention branch's calibration mean: x + MLP + mean(Attn)."""
    m = Parallel().eval()
    opt, r, calib = _run(m, {"drop_attention": {"compensate": "mean"}})
    with torch.no_grad():
        mean = torch.cat([_attn_out(m, b["x"]).reshape(-1, 32) for b in calib.batches]).mean(0)
        x = torch.randn(2, 5, 32)
        hook = m.o.register_forward_hook(lambda mod, i, out: mean.expand_as(out))
        want = m(x)
        hook.remove()
        assert (opt(x=x) - want).abs().max().item() <= 1e-5


def test_parallel_drop_block_ends_at_the_residual_add():
    """A parallel block is one add: drop_block rewires it to x."""
    m = Parallel().eval()
    opt, _, _ = _run(m, {"drop_block": {}})
    x = torch.randn(2, 5, 32)
    assert torch.equal(opt(x=x), x)
    assert _count(opt.graph_module, torch.ops.aten.linear.default) == 0


def test_inplace_merge_is_cut_without_canonicalization():
    """On a traced graph that still holds the in-place `m += a` (aten.add_; canonicalize rewrites it
    out of place, this graph never saw canonicalize), the drop erases the write instead of leaving it
    to mutate the MLP output."""
    from rewriter import graph as G
    from rewriter.analyze import analyze
    from rewriter.rule import Built, Candidate, get_rule
    from rewriter.trace import trace
    m = Parallel(inplace=True).eval()
    gm = trace(m, (), {"x": torch.randn(2, 6, 32)})
    (s,) = analyze(gm)
    assert G.node(gm, s.extra["residual"]["merge"]).target == torch.ops.aten.add_.Tensor
    rule = get_rule("drop_attention")
    rule.apply(gm, Candidate((s,)), Built(), rule.options())
    assert not any(n.target == torch.ops.aten.add_.Tensor for n in gm.graph.nodes)
    x = torch.randn(3, 6, 32)   # another batch (the plain trace keeps the length)
    hook = m.o.register_forward_hook(lambda mod, i, out: torch.zeros_like(out))
    with torch.no_grad():
        want = m(x)
    hook.remove()
    with torch.no_grad():
        assert (gm(x=x) - want).abs().max().item() <= 1e-5
