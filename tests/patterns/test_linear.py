"""linear_attention (Katharopoulos 2020; Hedgehog arXiv:2402.04347; LoLCATs arXiv:2410.10254): fires and
replaces SDPA, the window ≥ T setting is exact, the rewritten graph computes what attention transfer
fitted, the attention-weight loss fits on length-bucketed minibatches, refuses with reasons, the gate
rolls back damage bit-identically, auto ranks by damage, and save → load / torch.compile reproduce
outputs."""
import torch

from rewriter import graph as G
from rewriter import load, optimize
from rewriter.driver import Context
from rewriter.kernels.keymask import key_valid
from rewriter.patterns._feature_maps import (Sample, elu1, evaluate, hedgehog, hedgehog_init, minibatches,
                                             predict, transfer, weights_and_output)

SDPA = torch.ops.aten.scaled_dot_product_attention.default
LINEAR = torch.ops.rewriter.linear_attention.default
HYBRID = torch.ops.rewriter.hybrid_window_attention.default


def _recipe(step, seq_len=32, **gate):
    return {"calibration": {"samples": 16, "seq_len": seq_len, "batch_size": 8, "heldout": 8},
            "gate": gate or {"metric": "relative_rms", "max": 1.0}, "steps": [{"linear_attention": step}]}


def _count(gm, target):
    return sum(n.op == "call_function" and n.target == target for n in gm.graph.nodes)


def _run(m, batch):
    with torch.no_grad():
        out = m(**batch)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_fires_on_encoder_and_replaces_every_sdpa(bert):
    opt = optimize(bert, _recipe({"feature_map": "hedgehog", "steps": 30}), progress=False, measure_latency=False)
    recs = opt.report.records
    assert [r.status for r in recs] == ["applied"] * 4 and {r.rule for r in recs} == {"linear_attention"}
    assert set(recs[0].built) == {"wq", "bq", "wk", "bk"} and recs[0].built["wq"].shape == (4, 16, 16)
    assert all(r.info["transfer_error_after"] < r.info["transfer_error_before"] for r in recs)   # the fit fits
    gm = opt.graph_module
    assert _count(gm, SDPA) == 0 and _count(gm, LINEAR) == 4
    assert all(n.meta["rewriter"]["rule"] == "linear_attention" for n in gm.graph.nodes if n.target == LINEAR)
    # the report's cost model: softmax attention grows with N, the rewritten attention does not
    assert "N" in str(opt.report.flops_before) and "N" not in str(opt.report.flops_after)


def test_window_covering_the_sequence_is_exact_softmax(llama):
    """LoLCATs hybrid with window ≥ T: the linear part is empty, so the output is softmax attention.
    Tiny Llama: RoPE, GQA with k/v repeated before the SDPA, causal+padding mask."""
    opt = optimize(llama, _recipe({"window": 64, "steps": 0}, seq_len=32), progress=False, measure_latency=False)
    assert [r.status for r in opt.report.records] == ["applied"] * 4
    assert _count(opt.graph_module, SDPA) == 0 and _count(opt.graph_module, HYBRID) == 4
    batch = llama.example_inputs(batch=2, seq_len=32)
    torch.testing.assert_close(_run(opt, batch), _run(llama.model, batch), rtol=1e-5, atol=1e-5)


def test_layers_sharing_a_mask_share_one_key_mask_reduction(llama):
    """A decoder's layers read one [B, 1, T, T] mask: the rewritten graph reduces it to real keys once
    (one key_valid node feeding every hybrid op), not once per layer, and padding still gives the
    outputs of the unpadded rows (the window ≥ T setting is exact softmax)."""
    opt = optimize(llama, _recipe({"window": 64, "steps": 0}, seq_len=32), progress=False, measure_latency=False)
    gm = opt.graph_module
    kv = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is key_valid]
    assert len(kv) == 1 and _count(gm, HYBRID) == 4
    assert all(n.args[8] is kv[0] for n in gm.graph.nodes if n.target == HYBRID)
    batch = llama.example_inputs(batch=2, seq_len=32)
    batch["attention_mask"][1, :7] = 0                  # left padding in one row
    torch.testing.assert_close(_run(opt, batch), _run(llama.model, batch), rtol=1e-4, atol=1e-4)


def test_rewritten_graph_computes_the_fitted_attention(bert):
    """The aten feature-map nodes + mask reduction in the graph equal the eager math the fit optimized."""
    opt = optimize(bert, _recipe({"steps": 5, "layers": [1]}), progress=False, measure_latency=False)
    (rec,) = [r for r in opt.report.records if r.status == "applied"]
    gm = opt.graph_module
    new = next(n for n in gm.graph.nodes if n.target == LINEAR)
    fq, fk, v, km = new.args[:4]
    batch = bert.example_inputs(batch=3, seq_len=20)          # rows after the first are padded
    ctx = Context(gm, opt.sites, None, "encoder")
    got = ctx.capture([new.name, fq.name, fk.name, v.name, km.name], batches=[batch])
    base = optimize(bert, _recipe({"steps": 0, "layers": [99]}), progress=False, measure_latency=False)
    site = base.sites[1]
    a = G.sdpa_args(G.node(base.graph_module, site.node))
    ref = Context(base.graph_module, base.sites, None, "encoder").capture(
        [a["query"].name, a["key"].name, a["attn_mask"].name, site.node], batches=[batch])
    q, k, mask, y = (ref[n][0] for n in (a["query"].name, a["key"].name, a["attn_mask"].name, site.node))
    p = rec.built
    torch.testing.assert_close(got[fq.name][0], hedgehog(q, p["wq"], p["bq"]), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[fk.name][0], hedgehog(k, p["wk"], p["bk"]), rtol=1e-6, atol=1e-6)
    assert km.target is key_valid                       # the calibration's reading of the mask, in the graph
    assert torch.equal(got[km.name][0], batch["attention_mask"].bool())
    s = Sample(q, k, got[v.name][0], key_valid(mask, q.shape[0]), y)
    eager = predict(s, p, feature_map="hedgehog", causal=False, window=None, scale=site.scale, eps=1e-6)
    torch.testing.assert_close(got[new.name][0], eager, rtol=1e-5, atol=1e-5)


def test_key_mask_reduction_is_exact_for_padding_and_causal_masks():
    """The rule's reading of the SDPA mask (rewriter.kernels.keymask.key_valid), in every encoding
    models write: before, an additive mask counted a key as real when its bias was above
    finfo.min, so the −1e9 and −10000 of older code let padded keys into linear attention."""
    real = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)            # [B, T]
    left = real.flip(-1)                                                            # left padding
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    for keys in (real, left):
        for m in (keys[:, None, None, :].expand(2, 1, 4, 4),                        # padding
                  causal[None, None] & keys[:, None, None, :]):                     # causal + padding
            assert torch.equal(key_valid(m, 2), keys)
            for fill in (float("-inf"), torch.finfo(torch.float32).min, -1e9, -1e4):
                additive = torch.zeros(m.shape).masked_fill(~m, fill)
                assert torch.equal(key_valid(additive, 2), keys), fill
            older = (1.0 - keys[:, None, None, :].float()) * -10000.0             # (1 − mask) · −10000
            assert torch.equal(key_valid(older, 2), keys)
    assert torch.equal(key_valid(causal, 2), torch.ones(2, 4, dtype=torch.bool))  # [T, T], no batch
    assert key_valid(None, 2) is None
    x = torch.tensor([-1.0, 0.0, 2.0])
    assert torch.equal(elu1(x), torch.tensor([torch.exp(torch.tensor(-1.0)).item(), 1.0, 3.0]))


def test_window_refused_on_encoder_with_reason(bert):
    opt = optimize(bert, _recipe({"window": 8}), progress=False, measure_latency=False)
    assert [r.status for r in opt.report.records] == ["rejected"] * 4
    assert all("needs a causal model" in r.reason and "'padding'" in r.reason for r in opt.report.records)
    assert _count(opt.graph_module, SDPA) == 4


def test_gate_rolls_back_untrained_elu1_bit_identically(minilm):
    """Training-free elu+1 on a real model loses too much (the paper's point): refused per site."""
    batch = minilm.example_inputs(batch=3, seq_len=20)
    opt = optimize(minilm, _recipe({"feature_map": "elu1", "layers": "1-2"}, metric="embedding_cosine", min=0.99),
                   progress=False, measure_latency=False)
    assert [r.status for r in opt.report.records] == ["rolled_back"] * 2
    assert all(r.reason.startswith("gate: embedding_cosine") for r in opt.report.records)
    assert _count(opt.graph_module, SDPA) == 6 and _count(opt.graph_module, LINEAR) == 0
    assert not any(k.startswith("rw_") for k, _ in opt.graph_module.named_buffers())
    assert torch.equal(_run(opt, batch), _run(minilm.model, batch))


def test_auto_converts_least_damaging_first(bert):
    opt = optimize(bert, _recipe({"layers": "auto", "steps": 4}), progress=False, measure_latency=False)
    recs = [r for r in opt.report.records if r.site is not None]
    damage = [r.info["damage_alone"] for r in recs]
    assert len(recs) == 4 and damage == sorted(damage) and all(d > 0 for d in damage)
    assert any(r.status == "applied" for r in recs)


def test_save_load_and_compile_reproduce_outputs(llama, tmp_path):
    """Hybrid window 8 < T = 32, so the fitted feature maps and mixing weights are in use."""
    opt = optimize(llama, _recipe({"window": 8, "steps": 10, "layers": "0-1"}, seq_len=32),
                   progress=False, measure_latency=False)
    applied = [r for r in opt.report.records if r.status == "applied"]
    assert len(applied) == 2 and set(applied[0].built) == {"wq", "bq", "wk", "bk", "mix"}
    assert torch.all(applied[0].built["mix"] > 0)
    opt.save(tmp_path / "m")
    again = load(tmp_path / "m", model=llama)
    batch = llama.example_inputs(batch=2, seq_len=40)           # longer than calibration: dynamic T
    out = _run(opt, batch)
    assert torch.equal(out, _run(again, batch))
    compiled = torch.compile(opt.graph_module, backend="inductor")
    torch.testing.assert_close(_run(compiled, batch), out, rtol=1e-4, atol=1e-4)


def test_weights_loss_fits_and_minibatches_keep_the_loss(bert):
    """Hedgehog's attention-weight distillation (`loss: weights`) fits: each site's output error ends
    below the unfitted maps' (the identity-initialized hedgehog). On synthetic samples `both` lowers
    the output error and the weights' KL. Length-bucketed minibatches hold the same rows: the loss
    over them equals the loss over the padded calibration batches."""
    opt = optimize(bert, _recipe({"steps": 30, "loss": "weights", "layers": "0-1"}), progress=False,
                   measure_latency=False)
    recs = [r for r in opt.report.records if r.site is not None]
    assert [r.status for r in recs] == ["applied"] * 2
    assert all(r.info["transfer_error_after"] < r.info["transfer_error_before"] for r in recs)

    g = torch.Generator().manual_seed(0)
    B, H, T, d = 3, 2, 9, 4
    q, k, v = (torch.randn(B, H, T, d, generator=g) for _ in range(3))
    real = torch.arange(T)[None, :] < torch.tensor([9, 4, 6])[:, None]
    y = torch.softmax((0.5 * q @ k.transpose(-1, -2)).masked_fill(~real[:, None, None, :], float("-inf")), -1) @ v
    samples = [Sample(q, k, v, real, y), Sample(q[:2], k[:2], v[:2], real[:2], y[:2])]
    how = dict(feature_map="hedgehog", causal=False, window=None, scale=0.5, eps=1e-6)
    fitted, info = transfer(samples, feature_dim=5, steps=40, lr=1e-2, seed=0, loss="both", **how)
    (wq, bq), (wk, bk) = hedgehog_init(H, d, 5, 0), hedgehog_init(H, d, 5, 1)    # transfer's start
    p = {"wq": wq, "bq": bq, "wk": wk, "bk": bk}
    kl = lambda params, ss: sum(weights_and_output(s, params, **how)[0].item() for s in ss)
    assert info["transfer_error_after"] < info["transfer_error_before"]
    assert kl(fitted, samples) < kl(p, samples)
    packed = minibatches(samples, seed=0)
    assert sum(int(s.key_mask.sum()) for s in packed) == int(real.sum() + real[:2].sum())
    assert max(s.q.shape[2] for s in packed) == T and min(s.q.shape[2] for s in packed) < T
    assert abs(evaluate(packed, p, **how) - evaluate(samples, p, **how)) < 1e-6
    assert abs(kl(p, packed) - kl(p, samples)) < 1e-4 and kl(p, samples) > 0


def test_weights_of_the_rewritten_attention_match_its_output():
    """The quadratic weights the `weights` loss reads give the op's output (linear, causal, and the
    LoLCATs hybrid with GQA), and a window covering the sequence has the softmax's weights (KL 0)."""
    g = torch.Generator().manual_seed(1)
    B, H, Hk, T, d = 2, 4, 2, 11, 6
    q = torch.randn(B, H, T, d, generator=g)
    k, v = torch.randn(B, Hk, T, d, generator=g), torch.randn(B, Hk, T, d, generator=g)
    real = torch.arange(T)[None, :] < torch.tensor([11, 7])[:, None]
    wq, bq = hedgehog_init(H, d, 8, 0)
    wk, bk = hedgehog_init(Hk, d, 8, 1)
    p = {"wq": wq + 0.3 * torch.randn(wq.shape, generator=g), "bq": bq, "wk": wk, "bk": bk,
         "mix": torch.rand(H, generator=g) + 0.5}
    s = Sample(q, k, v, real, torch.zeros(B, H, T, d))
    rows = real[:, None, :, None]
    for causal, window in ((False, None), (True, None), (True, 4)):
        how = dict(feature_map="hedgehog", causal=causal, window=window, scale=0.4, eps=1e-6)
        kl, y = weights_and_output(s, p, **how)
        torch.testing.assert_close(y * rows, predict(s, p, **how) * rows, rtol=1e-5, atol=1e-5)
        assert kl > 0.01
    kl, _ = weights_and_output(s, p, feature_map="hedgehog", causal=True, window=T, scale=0.4, eps=1e-6)
    assert abs(kl.item()) < 1e-3
