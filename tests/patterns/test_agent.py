"""agent_attention (Agent Attention, arXiv:2312.08874): fires on MiniLM within the gate, the
rewritten site computes exactly the agent formula on its own q/k/v (padding and CLS handled),
calibration lowers the error, causal sites are refused with the reason, a damaging setting
is rolled back with the model bit-identical, and save → load reproduces."""
import torch

from rewriter import load, optimize
from rewriter import graph as G
from rewriter.driver import Context
from rewriter.gate import main_tensor
from rewriter.kernels.agent_attention import agent_attention_ref, pool_agents
from rewriter.patterns.agent import agent_block

CAL = {"samples": 16, "seq_len": 32, "batch_size": 8, "heldout": 8}


def _run(model, step, **gate):
    return optimize(model, {"calibration": CAL, "gate": gate or {"metric": "embedding_cosine", "min": 0.9},
                            "steps": [step]}, progress=False, measure_latency=False)


def _applied(opt):
    return [r for r in opt.report.records if r.status == "applied"]


def test_fires_on_minilm_within_gate(minilm):
    opt = _run(minilm, {"agent_attention": {"agents": 16}}, metric="embedding_cosine", min=0.98)
    recs = _applied(opt)
    assert recs and all(r.rule == "agent_attention" for r in recs)
    assert all(r.metric_after >= 0.98 for r in recs)
    assert opt.report.heldout["value"] >= 0.95
    for r in recs:   # training-free: s₁ = s₂ = the site's scale, no shortcut
        assert torch.allclose(r.built["scale1"], torch.full((12,), 32 ** -0.5))
        assert torch.equal(r.built["shortcut"], torch.zeros(12))
    assert str(opt.report.flops_after) != str(opt.report.flops_before)


def test_rewritten_site_is_the_agent_formula(minilm):
    """On the rewritten graph, the node that replaced SDPA equals the fp32 reference computed from
    the same q/k/v, with agents pooled over the real tokens and CLS kept out (prefix=1)."""
    opt = _run(minilm, {"agent_attention": {"agents": 5, "prefix": 1, "shortcut": 0.1, "layers": [2]}}, metric="relative_rms", max=10.0)
    (r,) = _applied(opt)
    gm = opt.graph_module
    (new,) = [n for n in gm.graph.nodes if n.target is agent_block]
    q, k, v, key_mask = new.args[:4]
    batch = minilm.example_inputs(batch=3, seq_len=20)
    batch["attention_mask"][2, 9:] = 0                      # a shorter sentence in the batch
    acts = Context(gm, [], None, "encoder").capture([q.name, k.name, v.name, key_mask.name, new.name], [batch])
    q, k, v, km, out = (acts[n][0] for n in (q.name, k.name, v.name, key_mask.name, new.name))
    assert torch.equal(km, batch["attention_mask"].bool())
    agents = pool_agents(q, 5, km, prefix=1)
    assert torch.allclose(agents[2, :, 0], q[2, :, 1:3].mean(1), atol=1e-6)   # ranks 1..2 of 8 pooled tokens
    s = torch.full((12,), 32 ** -0.5)
    ref = agent_attention_ref(q, k, v, agents, km, s, s, None, None, torch.full((12,), 0.1))
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


def test_calibration_lowers_error(minilm):
    step = {"agents": 8, "layers": [0]}
    free = _run(minilm, {"agent_attention": step}, metric="relative_rms", max=10.0)
    fit = _run(minilm, {"agent_attention": {**step, "calibrate": True, "steps": 60}}, metric="relative_rms", max=10.0)
    (a,), (b,) = _applied(free), _applied(fit)
    assert b.metric_after < a.metric_after
    assert set(b.built) == {"scale1", "scale2", "shortcut", "beta"} and b.built["beta"].shape == (12, 2)
    assert not torch.equal(b.built["scale2"], a.built["scale2"])


def test_refuses_causal_with_reason():
    from rewriter.models import load_model
    opt = _run(load_model("gpt2"), {"agent_attention": {}}, metric="relative_rms", max=1.0)
    assert [r.status for r in opt.report.records] == ["rejected"] * 4
    assert all("causal attention" in r.reason and "future tokens" in r.reason for r in opt.report.records)


def test_gate_rolls_back_damaging_setting(minilm):
    opt = _run(minilm, {"agent_attention": {"agents": 1}}, metric="embedding_cosine", min=0.9999)
    assert [r.status for r in opt.report.records] == ["rolled_back"] * 6
    gm = opt.graph_module
    assert sum(n.target is G.SDPA for n in gm.graph.nodes) == 6
    assert not any(k.startswith("rw_") for k, _ in gm.named_buffers())
    b = minilm.example_inputs(batch=2, seq_len=24)
    with torch.no_grad():
        assert torch.equal(main_tensor(opt(**b)), main_tensor(minilm.model(**b)))


def test_save_load_reproduces_calibrated(minilm, tmp_path):
    opt = _run(minilm, {"agent_attention": {"agents": 8, "calibrate": True, "steps": 20, "layers": "0-1"}}, metric="embedding_cosine", min=0.5)
    assert len(_applied(opt)) == 2
    again = load(opt.save(tmp_path / "agent"), minilm)
    b = minilm.example_inputs(batch=3, seq_len=30)
    with torch.no_grad():
        assert torch.equal(main_tensor(opt(**b)), main_tensor(again(**b)))
