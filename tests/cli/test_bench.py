"""`rewriter bench SAVED_DIR`: a saved model against its base across lengths, measured beside the cost
model's prediction, the PNG, and one-line errors (bad --seq, a length beyond the position limit)."""
from __future__ import annotations

import json

import pytest

from rewriter import cli, optimize

OPEN_GATE = {"metric": "relative_rms", "max": 100.0}


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, bert):
    """The seeded tiny BERT with both attentions dropped, saved without timings (measure_latency=False:
    no whole-model count in its report either, as in reports saved before it existed)."""
    opt = optimize(bert, {"model": "bert", "steps": [{"drop_attention": {"layers": [0, 1]}}],
                          "gate": OPEN_GATE,
                          "calibration": {"samples": 2, "seq_len": 16, "batch_size": 2, "heldout": 0}},
                   progress=False, measure_latency=False)
    return str(opt.save(tmp_path_factory.mktemp("bench") / "bert-drop"))


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_bench_prints_the_table_and_writes_the_png(saved, capsys, tmp_path):
    png = tmp_path / "latency.png"
    code, out, err = run(capsys, "bench", saved, "--seq", "32,16", "--batch", "2", "--repeats", "1",
                         "--png", str(png), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert [r["seq_len"] for r in result["rows"]] == [16, 32] and all(r["batch"] == 2 for r in result["rows"])
    for r in result["rows"]:
        assert r["before_ms"] > 0 and r["after_ms"] > 0
        assert r["speedup"] == pytest.approx(r["before_ms"] / r["after_ms"])
        assert r["predicted_speedup"] > 1.2          # both attentions and their projections gone
    assert result["rows"][1]["predicted_speedup"] > result["rows"][0]["predicted_speedup"]
    assert result["position_limit"] == 512 and result["crossover"]["why"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    code, out, _ = run(capsys, "bench", saved, "--seq", "16", "--repeats", "1")
    assert code == 0
    for col in ("length", "before ms", "after ms", "measured ×", "predicted ×"):
        assert col in out
    assert "the rewrite" in out


@pytest.mark.parametrize("seq, message", [
    ("16,abc", "--seq 16,abc: expected comma-separated positive integers such as 128,512,2048; 'abc' is not"),
    ("0", "--seq 0: lengths must be positive, got 0"),
    ("16,4096", "--seq 4096: longer than the model's position limit of 512 tokens "
                "(input_ids takes at most 512)"),
])
def test_bench_errors_are_one_line(saved, capsys, seq, message):
    code, out, err = run(capsys, "bench", saved, "--seq", seq)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err


def test_bench_on_a_folder_that_is_not_a_saved_model(capsys, tmp_path):
    code, _, err = run(capsys, "bench", str(tmp_path))
    assert code == 2 and "not a saved model" in err and err.count("\n") == 1
