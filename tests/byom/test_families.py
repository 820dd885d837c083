"""Hugging Face families handed over as bare modules (tiny configs, random weights,
tests/models/zoo_factory.py): the kind comes from the forward signature and config, inspect() works
with no inputs, the traced graph (written-out attention canonicalized) is exact at another batch and
length with padding, and one attention drop applies. The residual forms and the biases that helper
work on analyze/canonicalize raises are tested per family in test_graph_families.py."""
import sys
from pathlib import Path

import pytest
import torch

from rewriter import inspect, optimize
from rewriter.api import _prepare, _resolve
from rewriter.models import infer_kind, main_output

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import zoo_factory as Z  # noqa: E402

# sites a 2-layer model has: one per layer, three per layer pair in an encoder-decoder (self, self, cross),
# and SigLIP's pooling head (an nn.MultiheadAttention whose query is a learned probe) one more
SITES = {name: 6 if name in ("bart", "t5", "whisper") else 3 if name == "siglip_vision" else 2
         for name in Z.FAMILIES}
# the families whose residual / bias forms the graph half of the issue owns: their drop and canonical
# forms are tested in test_graph_families.py; here only their kind and that inspect() runs
GRAPH_HALF = ("gemma2", "gemma3", "olmo2", "falcon", "swin", "mpnet", "bloom", "deberta_v2")
MINE = [n for n in Z.FAMILIES if n not in GRAPH_HALF]
OPEN_GATE = {"metric": "relative_rms", "max": 100.0}


def _other_inputs(loaded):
    """Inputs at another batch (3) and length (11) than the trace's (2, 16), with padding where the
    model takes a mask: right padding for bidirectional models, left padding for causal LMs."""
    if loaded.kind == "vision":
        return loaded.example_inputs(batch=3)
    x = loaded.inputs_fn(3, 11, 5)
    if "attention_mask" in x:
        x["attention_mask"][-1] = 1
        if loaded.kind == "causal_lm":
            x["attention_mask"][-1, :3] = 0
        else:
            x["attention_mask"][-1, 6:] = 0
    return x


@pytest.mark.parametrize("name", Z.FAMILIES)
def test_kind_from_signature_and_config_and_inspect_without_inputs(name):
    model = Z.family(name)
    assert infer_kind(model) == Z.family_kind(name)
    sites = inspect(model)
    assert len(sites) == SITES[name] or (name in GRAPH_HALF and not sites and sites.notes), \
        (len(sites), sites.notes)


@pytest.mark.parametrize("name", MINE)
def test_traced_graph_is_exact_at_another_batch_and_length(name):
    """Eager (written-out) attention, canonicalized to SDPA: the graph equals the model on the real
    tokens of a padded batch of another size and length (fp32, 1e-5)."""
    model = Z.family(name, attn_implementation="eager")
    loaded = _resolve(model, None)
    gm, sites, _, _ = _prepare(loaded, None)
    assert len(sites) == SITES[name]
    x = _other_inputs(loaded)
    with torch.no_grad():
        want, got = main_output(model(**x)), main_output(gm(**x))
    assert got.shape == want.shape
    valid = loaded.valid_tokens(x, want)
    if "attention_mask" in x and want.dim() >= 3 and want.shape[:2] == x["attention_mask"].shape:
        assert not valid.all(), "the check must cover a padded row"
    if want.dim() >= 3:
        got, want = got[valid], want[valid]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


DROPPABLE = MINE


@pytest.mark.parametrize("name", DROPPABLE)
def test_one_attention_drop_applies(name):
    """drop_attention on the first block (of each stack: an encoder-decoder's decoder blocks are
    numbered after its encoder's, so its first decoder block is layer 2), with the model's own inputs
    as calibration batches (text models have no tokenizer here): applied, and the output changes
    while keeping its shape."""
    model = Z.family(name)
    loaded = _resolve(model, None)
    cal = [loaded.inputs_fn(2, 8, s) for s in range(3)] if loaded.inputs_fn else None
    seq2seq = SITES[name] == 6
    layers = [0, 2] if seq2seq else [0]
    opt = optimize(model, {"calibration": {"samples": 2, "seq_len": 8, "batch_size": 2, "heldout": 0},
                           "gate": OPEN_GATE, "steps": [{"drop_attention": {"layers": layers}}]},
                   calibration=cal, progress=False, measure_latency=False)
    chosen = [s for s in opt.sites if s.layer in layers]
    # encoder-decoders: the encoder's first self-attention, the decoder's first self- and cross-attention
    assert [s.module.split(".")[0] for s in chosen] == (["encoder", "decoder", "decoder"] if seq2seq
                                                        else [chosen[0].module.split(".")[0]])
    assert [r.status for r in opt.records] == ["applied"] * len(chosen), \
        [(r.status, r.reason) for r in opt.records]
    x = _other_inputs(loaded)
    with torch.no_grad():
        want, got = main_output(model(**x)), main_output(opt(**x))
    assert got.shape == want.shape and torch.isfinite(got[loaded.valid_tokens(x, want)]).all()
    assert not torch.allclose(got, want, atol=1e-4), "the drop changed nothing"


def test_siglip_pooling_head_is_raised_to_a_site():
    """SigLIP's pooling head is an nn.MultiheadAttention (a learned probe attends to the patches),
    written out with need_weights (its head-averaged weights, unused, are dropped at trace): raised
    to an SDPA site with its heads and output projection; q/k/v use rows of the packed in_proj_weight,
    so no weight name is given, and with no residual around it drop_attention says why it refuses."""
    model = Z.family("siglip_vision")
    sites = inspect(model)
    head = sites[-1]
    assert head.module == "head.attention" and head.layer is None
    assert any(c["module"] == "head.attention" and "3d" in c["form"] for c in sites.canonicalized)
    assert (head.heads, head.kv_heads, head.head_dim) == (4, 4, 8) and head.mask == "none"
    assert head.o_weight == "head.attention.out_proj.weight" and head.q_proj and head.k_proj == head.v_proj
    assert head.q_weight is None and any("in_proj_weight" in n for n in head.extra["notes"])
    opt = optimize(model, {"calibration": {"samples": 2, "batch_size": 2, "heldout": 0}, "gate": OPEN_GATE,
                           "steps": [{"drop_attention": {}}]}, progress=False, measure_latency=False)
    by_site = {r.sites[0]: r for r in opt.records}
    assert by_site[0].status == by_site[1].status == "applied"
    assert by_site[head.index].status == "rejected" and "no residual add" in by_site[head.index].reason


def test_masa_shares_within_one_role_of_an_encoder_decoder():
    """MASA's groups never mix roles: on BART (2 + 2 blocks) `groups: all` gives one dictionary for
    the encoder's self-attention, one for the decoder's and one for its cross-attention, each over
    the two blocks of its stack, and each is applied."""
    from rewriter.graph import module_pattern
    model = Z.family("bart")
    loaded = _resolve(model, None)
    cal = [loaded.inputs_fn(2, 8, s) for s in range(3)]
    opt = optimize(model, {"calibration": {"samples": 2, "seq_len": 8, "batch_size": 2, "heldout": 0},
                           "gate": OPEN_GATE, "steps": [{"masa": {"groups": "all", "atoms": 1}}]},
                   calibration=cal, progress=False, measure_latency=False)
    by_index = {s.index: s for s in opt.sites}
    roles = [sorted({module_pattern(by_index[i].module) for i in r.sites}) for r in opt.records]
    assert sorted(len(r.sites) for r in opt.records) == [2, 2, 2] and all(len(x) == 1 for x in roles), roles
    assert [r.status for r in opt.records] == ["applied"] * 3, [(r.status, r.reason) for r in opt.records]
