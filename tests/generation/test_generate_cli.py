"""`rewriter generate SAVED_DIR --prompt ...`: streams the continuation a saved causal LM generates
(the same tokens as OptimizedModel.generate), and says in one line why it cannot."""
import pytest
import torch

from rewriter import cli, optimize
from rewriter.models import load_model

OPEN_GATE = {"metric": "relative_rms", "max": 100.0}
CAL = {"samples": 4, "seq_len": 16, "batch_size": 4, "heldout": 0}
DROP0, DROP1 = [{"drop_attention": {"layers": [0]}}], [{"drop_attention": {"layers": [1]}}]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    llama = load_model("llama")
    opt = optimize(llama, {"calibration": CAL, "gate": OPEN_GATE, "steps": DROP1},
                   progress=False, measure_latency=False)
    assert [r.status for r in opt.records] == ["applied"]
    path = tmp_path_factory.mktemp("gen") / "llama-drop"
    opt.save(path)
    return path, opt, llama.tokenizer


def test_generate_streams_the_models_tokens(saved, capsys):
    path, opt, tok = saved
    prompt = "The river runs"
    assert cli.main(["generate", str(path), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    ids = tok(prompt, return_tensors="pt").input_ids
    want = opt.generate(ids, max_new_tokens=6)
    assert out == prompt + tok.decode(want[0, ids.shape[1]:].tolist(), skip_special_tokens=True) + "\n"


def test_generate_from_an_encoder_fails_in_one_line(capsys, tmp_path):
    bert = load_model("bert")
    opt = optimize(bert, {"calibration": CAL, "gate": OPEN_GATE, "steps": DROP0},
                   progress=False, measure_latency=False)
    opt.save(tmp_path / "bert")
    assert cli.main(["generate", str(tmp_path / "bert"), "--prompt", "hello"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is an encoder model, not a causal LM" in err[0]


def test_generate_needs_a_saved_folder(capsys, tmp_path):
    assert cli.main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert "not a saved model" in capsys.readouterr().err


def test_sampling_flags_reach_generate(saved, capsys):
    path, _, _ = saved
    torch.manual_seed(0)
    args = ["generate", str(path), "--prompt", "a", "--max-new-tokens", "3"]
    assert cli.main(args + ["--sample", "--top-k", "1"]) == 0
    greedy = capsys.readouterr().out
    assert cli.main(args) == 0
    assert capsys.readouterr().out == greedy          # top-k 1 sampling is greedy
