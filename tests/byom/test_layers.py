"""What a site's `layer` is (rewriter/analyze.py, "layers"): the position of its transformer block
among all the model's blocks, a block being an item of a list of modules of one class repeated along
the model. So Swin's blocks within a stage get a layer each, an encoder-decoder's decoder blocks are
numbered after its encoder's (a decoder block's self- and cross-attention share one), T5's
self/cross sublayer lists are not blocks, and a block without attention keeps its number. This is
what `layers:` in a recipe selects."""
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers as T

from rewriter import inspect, optimize

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import zoo_factory as Z  # noqa: E402

OPEN_GATE = {"metric": "relative_rms", "max": 100.0}


def _swin(depths=(2, 2)):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=list(depths),
                                        num_heads=[2, 4], window_size=4)).eval()


def test_swin_blocks_of_a_stage_are_layers_of_their_own():
    sites = inspect(_swin())
    assert [(s.module, s.layer) for s in sites] == [
        ("encoder.layers.0.blocks.0.attention", 0), ("encoder.layers.0.blocks.1.attention", 1),
        ("encoder.layers.1.blocks.0.attention", 2), ("encoder.layers.1.blocks.1.attention", 3)]
    # one block per stage: the stage is the list that repeats
    assert [s.layer for s in inspect(_swin((1, 1)))] == [0, 1]


def test_layers_option_selects_one_swin_block():
    """`layers: [1]` drops the second block of the first stage, and only it."""
    opt = optimize(_swin(), {"calibration": {"samples": 2, "batch_size": 2, "heldout": 0}, "gate": OPEN_GATE,
                             "steps": [{"drop_attention": {"layers": [1]}}]},
                   progress=False, measure_latency=False)
    assert [(r.status, list(r.sites)) for r in opt.records] == [("applied", [1])]
    assert opt.sites[1].module == "encoder.layers.0.blocks.1.attention"


@pytest.mark.parametrize("name", ["bart", "t5", "whisper"])
def test_encoder_decoder_blocks_are_numbered_after_the_encoder(name):
    """Encoder blocks 0, 1; decoder blocks 2, 3, each holding its self- and cross-attention (T5: the
    T5Block, not its heterogeneous `layer.0` / `layer.1` sublayers)."""
    sites = inspect(Z.family(name))
    assert [s.layer for s in sites] == [0, 1, 2, 2, 3, 3]
    assert [s.module.split(".")[0] for s in sites] == ["encoder"] * 2 + ["decoder"] * 4
    blocks: dict = {}             # layer -> the blocks ("decoder.layers.0", "decoder.block.0") it names
    for s in sites:
        blocks.setdefault(s.layer, set()).add(".".join(s.module.split(".")[:3]))
    assert all(len(b) == 1 for b in blocks.values()), blocks


class _Block(torch.nn.Module):
    def __init__(self, d: int, attention: bool):
        super().__init__()
        self.attention = attention
        self.qkv, self.o = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.mlp = torch.nn.Linear(d, d)

    def forward(self, x):
        if self.attention:
            B, L, D = x.shape
            q, k, v = self.qkv(x).view(B, L, 3, 2, D // 2).permute(2, 0, 3, 1, 4)
            x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(x)


class _Hybrid(torch.nn.Module):
    """Blocks of one class, the middle one without attention (as in hybrid attention / SSM stacks)."""

    def __init__(self, pattern=(True, False, True), d=16):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(d, a) for a in pattern)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_a_block_without_attention_keeps_its_number():
    x = torch.randn(2, 6, 16)
    sites = inspect(_Hybrid().eval(), example_inputs=(x,))
    assert [(s.module, s.layer) for s in sites] == [("blocks.0", 0), ("blocks.2", 2)]
    assert [s.layer for s in inspect(_Hybrid((True,)).eval(), example_inputs=(x,))] == [0]
