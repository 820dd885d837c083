"""`rewriter eval SAVED_DIR [--text FILE]` and `rewriter export SAVED_DIR --onnx FILE` on a saved tiny
BERT: the gate metric against the base model on the user's text, and an ONNX file with dynamic batch
and length that onnxruntime runs like the saved model."""
import json

import pytest
import torch

from rewriter import load, optimize
from rewriter.cli import main

TEXT = ["The weather was cold and grey all week.", "She opened the window to let the air in.",
        "Trains were late because of the snow.", "He read the letter twice before answering it.",
        "The river froze near the old bridge.", "Children built a snowman in the park."]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("byom-cli")
    recipe = {"model": "bert", "calibration": {"samples": 8, "seq_len": 16, "batch_size": 4, "heldout": 4},
              "gate": {"metric": "embedding_cosine", "min": 0.5},
              "steps": [{"drop_attention": {"layers": [0]}}]}
    opt = optimize("bert", recipe, progress=False, measure_latency=False)
    opt.save(root / "saved")
    (root / "mine.txt").write_text("\n".join(TEXT))
    return root


def test_eval_on_the_users_text(saved, capsys):
    assert main(["eval", str(saved / "saved"), "--text", str(saved / "mine.txt"), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["metric"] == "embedding_cosine" and got["samples"] == len(TEXT) and got["ok"] is True
    assert 0.5 < got["value"] < 1 and got["worst"] <= got["value"] and got["bound"] == {"min": 0.5}
    # the same number by hand: the saved model against its base, mean-pooled cosine over the real tokens
    opt = load(saved / "saved")
    from rewriter.models import load_model
    base = load_model("bert")
    enc = base.tokenizer(TEXT, padding="longest", truncation=True, max_length=16, return_tensors="pt")
    enc = base.accepted(dict(enc))
    with torch.no_grad():
        y0, y1 = base.model(**enc).last_hidden_state, opt(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    cos = torch.nn.functional.cosine_similarity(((y0 * m).sum(1) / m.sum(1)).double(),
                                                ((y1 * m).sum(1) / m.sum(1)).double(), dim=-1)
    assert got["value"] == pytest.approx(cos.mean().item(), abs=1e-6)
    assert main(["eval", str(saved / "saved"), "--text", str(saved / "mine.txt")]) == 0
    out = capsys.readouterr().out
    assert "embedding_cosine" in out and "min 0.5" in out and "yes" in out


def test_eval_without_text_uses_the_recipes_heldout_and_fails_outside_the_bound(saved, capsys, tmp_path):
    assert main(["eval", str(saved / "saved"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "bundled (held out)"
    strict = tmp_path / "strict"
    import shutil
    import yaml
    shutil.copytree(saved / "saved", strict)
    rec = yaml.safe_load((strict / "recipe.yaml").read_text())
    rec["gate"] = {"metric": "embedding_cosine", "min": 0.99999}
    (strict / "recipe.yaml").write_text(yaml.safe_dump(rec))
    assert main(["eval", str(strict)]) == 1
    assert "no" in capsys.readouterr().out


def test_eval_errors_are_one_line(saved, capsys):
    assert main(["eval", str(saved)]) == 2
    err = capsys.readouterr().err
    assert "not a saved model (no records.json)" in err and err.count("\n") == 1
    assert main(["eval", str(saved / "saved"), "--text", str(saved / "missing.txt")]) == 2
    assert "calibration text file not found" in capsys.readouterr().err


def test_export_onnx_dynamic_batch_and_length(saved, capsys):
    ort = pytest.importorskip("onnxruntime")
    path = saved / "m.onnx"
    assert main(["export", str(saved / "saved"), "--onnx", str(path)]) == 0
    assert "batch and length dynamic" in capsys.readouterr().err
    opt = load(saved / "saved")
    from rewriter.models import load_model
    x = load_model("bert").example_inputs(batch=3, seq_len=11)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x[i.name].numpy() for i in sess.get_inputs()}
    got = torch.from_numpy(sess.run(None, feed)[0])
    with torch.no_grad():
        want = opt(**x).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
