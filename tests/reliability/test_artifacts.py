"""Saved artifacts are untrusted input. `load` runs no code an artifact names unless told to trust it
(`trust_code=True`, CLI `--trust-code`), and a corrupted or tampered folder — a missing file, a tensor
of the wrong shape or content, an unknown rule, options that fail validation, a newer format, records
of another model, code hidden in report.json — fails with one line naming the file and the fault
(`rewriter.artifact.ArtifactError`), never a raw KeyError or a half-built model."""
import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from rewriter import load, optimize
from rewriter.artifact import FILES, FORMAT, ArtifactError, digest, parse_flops
from rewriter.cli import main
from rewriter.models import load_model

RECIPE = {"calibration": {"samples": 4, "seq_len": 16, "batch_size": 2, "heldout": 0},
          "gate": {"metric": "relative_rms", "max": 100.0},
          "steps": [{"drop_attention": {"max_layers": 1, "compensate": "mean", "layers": [3]}},
                    {"agent_attention": {"agents": 4, "calibrate": True, "steps": 2, "layers": [0]}}]}


@pytest.fixture(scope="module")
def bert():
    return load_model("bert")


@pytest.fixture(scope="module")
def saved(bert, tmp_path_factory):
    """A tiny BERT with one mean-compensated drop (built tensor `mean`) and one calibrated agent
    attention (four built tensors), saved; each test tampers with its own copy."""
    opt = optimize(bert, RECIPE, progress=False, measure_latency=False)
    assert [r.status for r in opt.records if r.status == "applied"] == ["applied", "applied"]
    return opt, opt.save(tmp_path_factory.mktemp("saved") / "bert")


@pytest.fixture
def art(saved, tmp_path):
    return Path(shutil.copytree(saved[1], tmp_path / "art"))


def _meta(art):
    return json.loads((art / "records.json").read_text())


def _write_meta(art, meta):
    (art / "records.json").write_text(json.dumps(meta, indent=2))


def _applied(meta, rule):
    return next(i for i, r in enumerate(meta["records"]) if r["rule"] == rule and r["status"] == "applied")


def _refused(art, file, *words, **kw) -> ArtifactError:
    """load(art) raises ArtifactError: one line, starting with the file at fault, saying `words`."""
    with pytest.raises(ArtifactError) as info:
        load(art, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert msg.startswith(str(art / file)), msg
    for w in words:
        assert w in msg, msg
    return info.value


def test_save_writes_the_format_and_a_manifest_and_load_replays_exactly(saved, bert):
    opt, path = saved
    meta = _meta(path)
    tensors = load_file(str(path / "tensors.safetensors"))
    assert meta["format"] == FORMAT and meta["base"] == "bert"
    assert meta["tensors"].keys() == tensors.keys() and any(k.startswith("built.") for k in tensors)
    assert all(meta["tensors"][k] == {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape),
                                      "sha256": digest(v)} for k, v in tensors.items())
    again = load(path)
    x = bert.example_inputs(batch=3, seq_len=9)
    with torch.no_grad():
        assert torch.equal(again(**x).last_hidden_state, opt(**x).last_hidden_state)


@pytest.mark.parametrize("name", FILES)
def test_a_missing_file_is_named(art, name):
    (art / name).unlink()
    _refused(art, name, "missing")


def test_not_a_folder(tmp_path):
    with pytest.raises(ArtifactError, match="no such folder"):
        load(tmp_path / "nowhere")


def test_a_newer_format_is_refused_and_an_old_one_without_manifest_loads(art, saved, bert):
    meta = _meta(art)
    _write_meta(art, {**meta, "format": FORMAT + 1})
    _refused(art, "records.json", f"format {FORMAT + 1} is newer", "upgrade rewriter")
    _write_meta(art, {**meta, "format": "2"})
    _refused(art, "records.json", "format: expected a positive integer")
    legacy = {k: v for k, v in meta.items() if k not in ("format", "tensors")}       # format 1
    _write_meta(art, legacy)
    x = bert.example_inputs(batch=2, seq_len=7)
    with torch.no_grad():
        assert torch.equal(load(art)(**x).last_hidden_state, saved[0](**x).last_hidden_state)


def test_records_json_that_is_not_json(art):
    (art / "records.json").write_text('{"format": 2, "records": [')
    _refused(art, "records.json", "not valid JSON", "line 1")


def test_an_unknown_rule_is_named(art):
    meta = _meta(art)
    i = _applied(meta, "agent_attention")
    meta["records"][i]["rule"] = "agent_attentoin"
    _write_meta(art, meta)
    _refused(art, "records.json", f"records[{i}].rule", "unknown rule 'agent_attentoin'", "registered:")


def test_options_that_fail_validation_are_named(art):
    meta = _meta(art)
    i = _applied(meta, "agent_attention")
    meta["records"][i]["options"]["agents"] = 0
    _write_meta(art, meta)
    _refused(art, "records.json", f"records[{i}].options.agents", "greater than or equal to 1")
    meta["records"][i]["options"] = {"agents": 4, "agnets": 2}
    _write_meta(art, meta)
    _refused(art, "records.json", f"records[{i}].options.agnets")


def test_a_malformed_record_is_named(art):
    meta = _meta(art)
    meta["records"][0]["sites"] = "3"
    _write_meta(art, meta)
    _refused(art, "records.json", "records[0].sites", "expected a list of site indices")
    meta["records"][0]["sites"], meta["records"][0]["status"] = [3], "done"
    _write_meta(art, meta)
    _refused(art, "records.json", "records[0].status", "'done' is not one of")


def _retensor(art, name, value, *, manifest: bool):
    """Replace one tensor; with manifest=True also rewrite records.json's manifest to match (a
    deliberate edit that keeps the files consistent)."""
    tensors = load_file(str(art / "tensors.safetensors"))
    tensors[name] = value
    save_file(tensors, str(art / "tensors.safetensors"))
    if manifest:
        meta = _meta(art)
        meta["tensors"][name] = {"dtype": str(value.dtype).removeprefix("torch."), "shape": list(value.shape),
                                 "sha256": digest(value)}
        _write_meta(art, meta)


def test_a_tensor_of_the_wrong_shape_is_named(art):
    i = _applied(_meta(art), "drop_attention")
    _retensor(art, f"built.{i}.mean", torch.zeros(65), manifest=False)
    _refused(art, "tensors.safetensors", f"built.{i}.mean: shape [65]", "manifest says [64]")


def test_a_wrong_shape_that_matches_an_edited_manifest_fails_before_a_model_is_returned(art):
    i = _applied(_meta(art), "drop_attention")
    _retensor(art, f"built.{i}.mean", torch.zeros(65), manifest=True)
    _refused(art, "tensors.safetensors", "the replayed model fails on the saved example inputs",
             "input_ids [2,")


def test_a_wrong_shape_in_a_format_1_artifact_fails_too(art):
    meta = _meta(art)
    _write_meta(art, {k: v for k, v in meta.items() if k not in ("format", "tensors")})
    i = _applied(meta, "drop_attention")
    _retensor(art, f"built.{i}.mean", torch.zeros(65), manifest=False)
    _refused(art, "tensors.safetensors", "the replayed model fails on the saved example inputs")


def test_changed_tensor_content_is_found(art):
    i = _applied(_meta(art), "agent_attention")
    tensors = load_file(str(art / "tensors.safetensors"))
    _retensor(art, f"built.{i}.scale1", tensors[f"built.{i}.scale1"] * 2, manifest=False)
    _refused(art, "tensors.safetensors", f"built.{i}.scale1", "SHA-256 mismatch")


def test_a_built_tensor_the_records_name_must_exist(art):
    meta = _meta(art)
    i = _applied(meta, "agent_attention")
    tensors = load_file(str(art / "tensors.safetensors"))
    del tensors[f"built.{i}.scale2"]
    save_file(tensors, str(art / "tensors.safetensors"))
    _write_meta(art, {k: v for k, v in meta.items() if k not in ("format", "tensors")})   # no manifest
    _refused(art, "tensors.safetensors", f"built.{i}.scale2 missing", f"records[{i}] (agent_attention)")


def test_a_truncated_tensor_file_is_named(art):
    data = (art / "tensors.safetensors").read_bytes()
    (art / "tensors.safetensors").write_bytes(data[: len(data) // 2])
    _refused(art, "tensors.safetensors", "not a readable safetensors file")


def test_a_recipe_that_does_not_validate_is_named(art):
    recipe = yaml.safe_load((art / "recipe.yaml").read_text())
    recipe["steps"][0]["drop_attention"]["max_layer"] = 1
    (art / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    _refused(art, "recipe.yaml", "steps[0].drop_attention.max_layer", "did you mean 'max_layers'")


def test_a_folder_copied_without_its_calibration_text_still_loads(art, tmp_path):
    """The calibration text is not needed to replay: a folder copied to another machine, where the
    .txt its recipe names does not exist, loads, and its recipe keeps the path it names."""
    gone = str(tmp_path / "elsewhere" / "corpus.txt")
    recipe = yaml.safe_load((art / "recipe.yaml").read_text())
    recipe["calibration"]["text"] = gone
    (art / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    opt = load(art)
    assert opt.recipe.calibration.text == gone and [r.status for r in opt.records].count("applied") == 2


def test_records_of_another_model_are_refused(art):
    small = load_model("bert", num_hidden_layers=2)
    with pytest.raises(ArtifactError, match=r"records\[0\]\.sites: site 3 does not exist: the model has 2"):
        load(art, model=small)


def test_report_json_cannot_run_code(art, tmp_path):
    marker = tmp_path / "ran"
    report = json.loads((art / "report.json").read_text())
    report["attention_flops_per_token"]["after"] = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    (art / "report.json").write_text(json.dumps(report))
    _refused(art, "report.json", "attention_flops_per_token.after", "is not a FLOP expression in N")
    assert not marker.exists()


def test_flop_expressions_round_trip_through_the_safe_parser():
    import sympy

    from rewriter.report import N
    for expr in (1024 * N + 131072, 2048 * sympy.Min(4, N) + 131584, 896 * sympy.sqrt(N) + 256 * N,
                 960 * N + 512 * sympy.Min(N, N / 4 + 8), sympy.Integer(197120),
                 N**2 / 3 + sympy.ceiling(N / 64)):
        assert parse_flops(str(expr), "r.json", "k") == expr
    for bad in ("N.__class__", "9**9**9**9", "open('x')", "lambda: 1", "[N]"):
        with pytest.raises(ArtifactError, match="is not a FLOP expression"):
            parse_flops(bad, "r.json", "k")


EVIL = '''
from pathlib import Path
Path({imported!r}).touch()                       # runs when the module is imported


def make():
    Path({called!r}).touch()
    from rewriter.models import load_model
    return load_model("bert")
'''


@pytest.fixture
def evil(art, tmp_path, monkeypatch):
    """The artifact's recipe names `c_evil_factory:make`, a module that leaves a file behind when it is
    imported and another when its function is called."""
    imported, called = tmp_path / "imported", tmp_path / "called"
    code = tmp_path / "code"
    code.mkdir()
    (code / "c_evil_factory.py").write_text(textwrap.dedent(EVIL.format(imported=str(imported),
                                                                      called=str(called))))
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.delitem(sys.modules, "c_evil_factory", raising=False)   # imported afresh by each test
    recipe = yaml.safe_load((art / "recipe.yaml").read_text())
    recipe["model"] = "c_evil_factory:make"
    (art / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return art, imported, called


def test_load_refuses_code_named_by_the_artifact_unless_trusted(evil, bert):
    art, imported, called = evil
    _refused(art, "recipe.yaml", "model: 'c_evil_factory:make' names code to import and run",
             "trust_code=True")
    assert not imported.exists() and not called.exists()
    opt = load(art, model=bert)                     # the caller's own model: nothing of the artifact runs
    assert not imported.exists() and [r.status for r in opt.records].count("applied") == 2
    opt = load(art, trust_code=True)
    assert imported.exists() and called.exists() and [r.status for r in opt.records].count("applied") == 2


def test_registered_names_and_model_folders_load_without_trust(tmp_path, bert):
    folder = tmp_path / "hf-bert"
    bert.model.save_pretrained(folder)
    recipe = {**RECIPE, "model": str(folder), "steps": RECIPE["steps"][:1]}
    opt = optimize(None, recipe, progress=False, measure_latency=False)
    path = opt.save(tmp_path / "from-folder")
    again = load(path)
    x = bert.example_inputs(batch=2, seq_len=9)
    with torch.no_grad():
        assert torch.equal(again(**x).last_hidden_state, opt(**x).last_hidden_state)


def test_cli_reports_a_tampered_artifact_in_one_line_with_exit_2(art, tmp_path, capsys):
    meta = _meta(art)
    _write_meta(art, {**meta, "format": FORMAT + 1})
    assert main(["export", str(art), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"rewriter: error: {art / 'records.json'}: format {FORMAT + 1} is newer")


def test_cli_refuses_code_without_trust_code(evil, tmp_path, capsys):
    art, imported, called = evil
    onnx = tmp_path / "m.onnx"
    assert main(["export", str(art), "--onnx", str(onnx)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--trust-code" in err and "c_evil_factory:make" in err
    assert not imported.exists() and not onnx.exists()
    assert main(["export", str(art), "--onnx", str(onnx), "--trust-code"]) == 0
    assert imported.exists() and called.exists() and onnx.is_file()
