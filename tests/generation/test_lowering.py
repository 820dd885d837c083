"""Lowering for generation (rewriter.lower): prefill of T tokens then N single-token decode steps
reproduces the rewritten model's full-sequence logits, per op the rewrites leave (SDPA,
causal_attention, a dropped site, MASA after materialize, linear attention with and without a
window), on tiny GQA decoders of two HF families; the state is functional and GQA caches stay at
kv-heads width; left-padded rows decode as they do alone; what cannot be lowered says which site
and why, in one line."""
import functools
import sys
from pathlib import Path

import pytest
import torch

from rewriter import optimize
from rewriter.generate import GenerationError, lowered

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import zoo_factory as Z  # noqa: E402

OPEN_GATE = {"metric": "relative_rms", "max": 100.0}       # every rewrite applies: exactness is the point
CAL = {"samples": 4, "seq_len": 16, "batch_size": 4, "heldout": 0}
KV_HEADS, HEAD_DIM, LAYERS = 2, 8, 2                        # the zoo's tiny decoders: 4 heads, 2 kv heads

RULES = {   # name: (steps, the state form each site gets)
    "none": ([{"drop_attention": {"layers": [99]}}], ["kv", "kv"]),
    "causal_fastpath": ([{"causal_fastpath": {}}], ["kv", "kv"]),
    "drop_attention": ([{"drop_attention": {"layers": [0]}}], ["dropped", "kv"]),
    "drop_block+fastpath": ([{"drop_block": {"layers": [1]}}, {"causal_fastpath": {}}], ["kv", "dropped"]),
    "masa": ([{"masa": {"atoms": 0.5}}], ["kv", "kv"]),
    "linear_attention": ([{"linear_attention": {"steps": 3}}], ["linear", "linear"]),
    "linear_attention_window": ([{"linear_attention": {"steps": 3, "window": 3}}], ["hybrid", "hybrid"]),
}


def _calibration(seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 128, (4, 16), generator=g),
             "attention_mask": torch.ones(4, 16, dtype=torch.long)} for _ in range(2)]


@functools.cache
def _rewritten(family: str, rule: str):
    """The tiny `family` decoder rewritten by RULES[rule], built once for the tests of this file."""
    return _optimized(family, RULES[rule][0])


def _optimized(family: str, steps: list):
    return optimize(Z.family(family), {"calibration": CAL, "gate": OPEN_GATE, "steps": steps},
                    calibration=_calibration(), progress=False, measure_latency=False)


def _stepwise_logits(low, ids, mask, T):
    """Logits of prefill(ids[:, :T]) then one decode step per later token, [B, len, V]."""
    B, total = ids.shape
    real = mask.bool()
    pos = (real.long().cumsum(-1) - 1).masked_fill(~real, 0)
    out = low.prefill(ids[:, :T], mask[:, :T], pos[:, :T])
    logits = [out[0]]
    state = low.start(list(out[low.n_outputs:]), total)
    key_valid = torch.zeros(B, total, dtype=torch.bool)
    key_valid[:, :T] = real[:, :T]
    for s in range(T, total):
        key_valid[:, s] = real[:, s]
        out = low.decode(ids[:, s:s + 1], mask[:, s:s + 1], pos[:, s:s + 1], torch.tensor([s]), key_valid,
                         *state)
        logits.append(out[0])
        state = list(out[low.n_outputs:])
    return torch.cat(logits, 1), state


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=[(f, r) for f in ("llama", "qwen2") for r in RULES],
                ids=lambda p: f"{p[0]}-{p[1]}")
def rewritten(request):
    family, rule = request.param
    steps, forms = RULES[rule]
    opt = _rewritten(family, rule)
    if rule != "none":
        why = [(r.rule, r.status, r.reason) for r in opt.records]
        assert all(r.status in ("applied", "skipped") for r in opt.records), why   # skipped: a dropped site
        assert {r.rule for r in opt.records if r.status == "applied"} == {next(iter(s)) for s in steps}, why
    return family, rule, forms, opt


def test_prefill_then_steps_reproduce_the_full_sequence_logits(rewritten):
    family, rule, forms, opt = rewritten
    low = lowered(opt)
    assert [s.form for s in low.sites] == forms
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = opt(input_ids=ids, attention_mask=mask).logits
        steps, state = _stepwise_logits(low, ids, mask, T=6)
    assert _rel(steps, full) <= 1e-4, (family, rule, _rel(steps, full))
    # the decode graph runs no full-sequence attention, and the state has the documented shapes
    targets = {n.target for n in low.decode.graph.nodes if n.op == "call_function"}
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets
    assert torch.ops.rewriter.causal_attention.default not in targets
    shapes = iter(state)
    for s in low.sites:
        if s.form == "kv":                              # GQA: cached at kv-heads width, no repeat_kv copy
            for t in (next(shapes), next(shapes)):
                assert tuple(t.shape) == (2, KV_HEADS, 13, HEAD_DIM)
        elif s.form == "linear":
            S, z = next(shapes), next(shapes)
            assert S.dtype == torch.float32 and S.shape[:2] == z.shape[:2] == (2, 4)   # k repeated to 4 heads
            assert S.shape[-1] == HEAD_DIM
        elif s.form == "hybrid":
            S, z, kw, vw, fkw, wv = (next(shapes) for _ in range(6))
            assert kw.shape[2] == vw.shape[2] == fkw.shape[2] == 3 and wv.dtype == torch.bool
        else:
            assert s.saved_bytes == 2 * KV_HEADS * HEAD_DIM * 4 and s.names == ()


def test_state_is_functional(rewritten):
    """A decode step takes its state and returns a new one: its inputs are left as they were."""
    _, _, _, opt = rewritten
    low = lowered(opt)
    ids = torch.randint(3, 128, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    pos = torch.arange(5)[None].expand(2, 5)
    out = low.prefill(ids[:, :4], mask[:, :4], pos[:, :4])
    state = low.start(list(out[low.n_outputs:]), 5)
    before = [t.clone() for t in state]
    key_valid = torch.ones(2, 5, dtype=torch.bool)
    after = low.decode(ids[:, 4:], mask[:, 4:], pos[:, 4:], torch.tensor([4]), key_valid, *state)
    after = after[low.n_outputs:]
    assert all(torch.equal(a, b) for a, b in zip(state, before))
    assert len(after) == len(state)
    assert any(not torch.equal(a, b) for a, b in zip(after, before)) == bool(state)


@pytest.mark.parametrize("rule", ["none", "linear_attention", "linear_attention_window"])
def test_a_left_padded_row_decodes_as_it_does_alone(rule):
    """Row 0 is a shorter prompt, left-padded: its generated tokens and step logits equal those of
    the same prompt run alone (key validity hides the padding slots; the linear state adds nothing
    for them; positions count from the first real token)."""
    opt = _rewritten("llama", rule)
    low = lowered(opt)
    g = torch.Generator().manual_seed(4)
    long, short = torch.randint(3, 128, (1, 9), generator=g), torch.randint(3, 128, (1, 5), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    batch = opt.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    alone = opt.generate(short, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(batch[0, 4:], alone[0]) and torch.equal(batch[1], opt.generate(long, max_new_tokens=6,
                                                                                        eos_token_id=[])[0])
    with torch.no_grad():
        padded, _ = _stepwise_logits(low, torch.cat([ids, batch[:, 9:]], 1)[:, :13], torch.cat(
            [mask, torch.ones(2, 4, dtype=torch.long)], 1), T=9)
        single, _ = _stepwise_logits(low, alone[:, :9], torch.ones(1, 9, dtype=torch.long), T=5)
    assert _rel(padded[0, 4:], single[0]) <= 1e-4


@pytest.mark.parametrize("family", ["llama", "gpt2"])   # RoPE / learned absolute position embeddings
def test_greedy_generate_matches_transformers_on_a_left_padded_batch(family):
    """transformers counts a left-padded row's positions from its first real token; so do we, by
    feeding position_ids where the traced graph built its positions from arange(T)."""
    model = Z.family(family)
    opt = _rewritten(family, "none")
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, 128, (2, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    ids[0, :3] = 0
    want = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = opt.generate(ids, mask, max_new_tokens=12)       # eos and pad from the model's generation_config
    assert torch.equal(got, want)
    if family == "gpt2":                                    # and the steps reproduce the full sequence
        full_ids = torch.randint(3, 128, (2, 11), generator=g)
        with torch.no_grad():
            full = opt(input_ids=full_ids, attention_mask=torch.ones_like(full_ids)).logits
            steps, _ = _stepwise_logits(lowered(opt), full_ids, torch.ones_like(full_ids), T=4)
        assert _rel(steps, full) <= 1e-4


@pytest.mark.parametrize("rule", ["drop_attention", "linear_attention"])
def test_the_report_states_the_cache_each_token_costs(rule):
    """report.generation: the original's KV bytes per token (every site at kv-heads width), the
    lowered model's, what the drops save; it survives to_dict → from_dict and shows in the report."""
    from rewriter.report import Report
    opt = _rewritten("llama", rule)
    g = opt.report.generation
    per_site = 2 * KV_HEADS * HEAD_DIM * 4
    dropped = RULES[rule][1].count("dropped")
    kv = RULES[rule][1].count("kv")
    assert g["kv_bytes_per_token_before"] == LAYERS * per_site
    assert g["kv_bytes_per_token_after"] == kv * per_site and g["saved_bytes_per_token"] == dropped * per_site
    assert sum(g["forms"].values()) == LAYERS
    assert Report.from_dict(opt.report.to_dict()).generation == g
    assert "KV cache 256 → " in _rendered(opt.report)


def _rendered(report) -> str:
    import io

    from rich.console import Console
    buf = io.StringIO()
    report.render(Console(file=buf, width=200))
    return buf.getvalue()


@pytest.mark.parametrize("rule", ["none", "linear_attention_window"])
def test_compiled_decode_generates_what_the_eager_steps_generate(rule):
    """generate(compile=True) runs each decode step through torch.compile (inductor): on a
    left-padded batch it gives the eager steps' tokens, its first step is reported as compilation,
    and a second call reuses the compiled step."""
    opt = _rewritten("llama", rule)
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(3, 128, (2, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    eager = opt.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    stats: dict = {}
    got = opt.generate(ids, mask, max_new_tokens=6, eos_token_id=[], compile=True, stats=stats)
    assert torch.equal(got, eager)
    assert stats["compile_s"] > 0 and stats["decode_steps"] == 4
    low = lowered(opt)
    assert low.compiled_decode() is low.compiled_decode()


def test_sampling_eos_and_streamer():
    opt = _rewritten("llama", "none")
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(6))
    greedy = opt.generate(ids, max_new_tokens=5, eos_token_id=[])
    assert torch.equal(opt.generate(ids, max_new_tokens=5, do_sample=True, top_k=1, eos_token_id=[]), greedy)
    def draw(seed):
        return opt.generate(ids, max_new_tokens=5, do_sample=True, temperature=1.5, top_p=0.9,
                            eos_token_id=[], generator=torch.Generator().manual_seed(seed))
    assert torch.equal(draw(0), draw(0)) and draw(0).shape == (2, 11)
    # eos: the first greedy token of row 0 ends row 0; row 1 goes on, row 0 gets the pad token
    eos = int(greedy[0, 6])
    out = opt.generate(ids, max_new_tokens=5, eos_token_id=eos, pad_token_id=1)
    if eos not in greedy[1, 6:].tolist():
        assert out.shape == (2, 11) and out[0, 7:].tolist() == [1] * 4 and torch.equal(out[1], greedy[1])

    class Streamer:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, x):
            self.puts.append(x.clone())

        def end(self):
            self.ended = True
    s = Streamer()
    out = opt.generate(ids[:1], max_new_tokens=4, eos_token_id=[], streamer=s)
    assert s.ended and torch.equal(s.puts[0], ids[:1]) and torch.equal(torch.cat(s.puts[1:]), out[0, 6:])


def _one_line_error(fn, pattern: str) -> str:
    with pytest.raises(GenerationError, match=pattern) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_what_cannot_be_lowered_says_which_site_and_why():
    site0 = r"site 0 \(model\.layers\.0\.self_attn\): "
    routed = _optimized("llama", [{"kmeans_routing": {}}])
    _one_line_error(lambda: lowered(routed), site0 + "kmeans_routed_attention has no decode form: k-means")
    window = _optimized("mistral", RULES["none"][0])                  # Mistral's sliding-window mask
    _one_line_error(lambda: lowered(window), site0 + "its attention mask is 'arbitrary', not causal")
    bert = optimize(Z.family("bert"), {"calibration": CAL, "gate": OPEN_GATE, "steps": RULES["none"][0]},
                    calibration=[{"input_ids": torch.randint(3, 128, (2, 8)),
                                  "attention_mask": torch.ones(2, 8, dtype=torch.long)}],
                    progress=False, measure_latency=False)
    _one_line_error(lambda: bert.generate(torch.randint(3, 128, (1, 4))), "is an encoder model, not a causal LM")
    opt = _rewritten("llama", "none")
    ids = torch.randint(3, 128, (2, 5))
    right = torch.ones_like(ids)
    right[1, -2:] = 0
    _one_line_error(lambda: opt.generate(ids, right), "row 1 has padding after a real token")
    _one_line_error(lambda: opt.generate(ids, max_new_tokens=60), "exceed the model's 64 positions")
