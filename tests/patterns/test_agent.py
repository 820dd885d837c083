"""agent_attention (Agent Attention, arXiv:2312.08874): fires on MiniLM within the gate, the
rewritten site computes exactly the agent formula on its own q/k/v (padding and CLS handled),
calibration lowers the error, causal sites are refused with the reason, a damaging setting
is rolled back with the model bit-identical, and save → load reproduces."""
import torch

from rewriter import load, optimize
from rewriter import graph as G
from rewriter.driver import Context
from rewriter.kernels.agent_attention import agent_attention_ref, agent_bias, agent_block, agent_windows, pool_agents
from rewriter.models import main_output as main_tensor

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
        assert torch.equal(r.built["beta"], torch.tensor([[0.0, 2.0]]).repeat(12, 1))   # β₁ = 0, β₂ = 2
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
    _, live, dist = agent_windows(km, 3, 20, 5, prefix=1)
    _, b2 = agent_bias(live, dist, None, torch.full((12,), 2.0))
    ref = agent_attention_ref(q, k, v, agents, km, s, s, None, b2, torch.full((12,), 0.1))
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


def _agent_site_inputs(B=2, H=4, T=12, D=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    return q, k, v, torch.full((H,), D ** -0.5), torch.zeros(H)


def test_output_of_a_sentence_does_not_depend_on_its_batch():
    """A 7-token sample gives the same agent-attention output alone and padded to 12 beside a
    longer one (its dead agents are masked, not repeated)."""
    q, k, v, s, c = _agent_site_inputs()
    beta = torch.tensor([[0.0, 2.0]]).repeat(4, 1)
    km = torch.ones(2, 12, dtype=torch.bool)
    km[1, 7:] = False
    batched = agent_block(q, k, v, km, s, s, c, beta, agents=10, prefix=1)
    alone = agent_block(q[1:, :, :7], k[1:, :, :7], v[1:, :, :7], km[1:, :7], s, s, c, beta, agents=10, prefix=1)
    torch.testing.assert_close(batched[1:, :, :7], alone, rtol=1e-5, atol=1e-6)


def test_one_token_per_agent_with_a_strong_bias_is_exact_attention():
    """n ≥ tokens puts one token in each window; a large β₂ then sends every token to its own
    agent, whose stage-1 row is that token's exact attention."""
    q, k, v, s, c = _agent_site_inputs()
    km = torch.ones(2, 12, dtype=torch.bool)
    km[1, 9:] = False
    beta = torch.tensor([[0.0, 60.0]]).repeat(4, 1)
    out = agent_block(q, k, v, km, s, s, c, beta, agents=16, prefix=0)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=km[:, None, None, :])
    torch.testing.assert_close(out[0], exact[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[1, :, :9], exact[1, :, :9], rtol=1e-4, atol=1e-5)
