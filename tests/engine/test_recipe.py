"""Recipes: YAML → typed objects, and one clear message per mistake (file, key path, what is allowed)."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from rewriter.recipe import (BudgetSpec, CalibrationSpec, GateSpec, Recipe, RecipeError, Step,
                             default_gate, load_recipe, recipe_schema)
from rewriter.rule import RULES, Rule, StepOptions, register

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "recipes"


class _TestOptions(StepOptions):
    max_layers: int | None = Field(default=None, ge=1)
    order: Literal["importance", "graph"] = "importance"


@pytest.fixture(autouse=True)
def test_rule():
    """A throwaway rule, registered for this module's tests only."""
    rule = register(Rule("_test_rule", paper="none (test)", summary="does nothing", exact=True,
                         options=_TestOptions, check=lambda site, o: None,
                         build=lambda ctx, site, o: {}, apply=lambda gm, site, built, o: None))
    yield rule
    RULES.pop("_test_rule", None)


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def error_of(src) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        load_recipe(src)
    msg = str(info.value)
    for raw in ("validation error", "errors.pydantic.dev", "Input should be", "Traceback"):
        assert raw not in msg, f"raw pydantic text leaked into the message: {msg}"
    return info.value


STEP = {"steps": [{"_test_rule": {"max_layers": 2}}]}


# --- loading -------------------------------------------------------------------------------------

def test_minimal_dict_gets_defaults():
    r = load_recipe(STEP)
    assert isinstance(r, Recipe)
    assert r.model is None and r.gate is None and r.output is None and r.source is None
    assert r.calibration == CalibrationSpec(text="auto", samples=64, seq_len=128, lengths="auto", batch_size=8,
                                           heldout=16, validation="auto")
    assert r.budget == BudgetSpec(max_sites=None, max_seconds=None)
    assert r.steps == [Step("_test_rule", _TestOptions(max_layers=2))]
    assert type(r.steps[0].options) is _TestOptions


def test_full_yaml_file(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "corpus.jsonl").write_text('{"text": "hello"}\n')
    p = write(tmp_path, """
        model: minilm
        calibration: {text: texts/corpus.jsonl, samples: 8, seq_len: 32, batch_size: 4, heldout: 0}
        gate: {metric: embedding_cosine, min: 0.99, min_worst: 0.9}
        budget: {max_sites: 3, max_seconds: 12.5}
        steps:
          - _test_rule: {max_layers: 1, order: graph, layers: "0-2"}
          - _test_rule:
          - _test_rule
        output: out/x
        """)
    r = load_recipe(p)
    assert r.source == str(p) and r.model == "minilm" and r.output == "out/x"
    assert r.calibration.text == str((tmp_path / "texts" / "corpus.jsonl").resolve())
    assert (r.calibration.samples, r.calibration.seq_len, r.calibration.batch_size, r.calibration.heldout) == (8, 32, 4, 0)
    assert r.gate == GateSpec(metric="embedding_cosine", min=0.99, min_worst=0.9)
    assert r.budget == BudgetSpec(max_sites=3, max_seconds=12.5)
    assert [s.options for s in r.steps] == [_TestOptions(max_layers=1, order="graph", layers="0-2"),
                                            _TestOptions(), _TestOptions()]


def test_roundtrip_through_dict_and_yaml(tmp_path):
    r = load_recipe(write(tmp_path, """
        model: gpt2
        gate: {metric: kl, max: 0.02}
        budget: {max_sites: 2}
        steps: [{_test_rule: {layers: [0, 3]}}, {_test_rule: {max_layers: 4}}]
        output: somewhere
        """))
    assert load_recipe(r.to_dict()) == r
    again = load_recipe(write(tmp_path, r.to_yaml(), "again.yaml"))
    assert again == r and again.to_dict() == r.to_dict()
    json.dumps(r.to_dict())  # plain data, JSON-ready
    assert load_recipe(r) is r


def test_relative_model_folder_resolves_against_recipe(tmp_path, monkeypatch):
    (tmp_path / "ckpt").mkdir()
    p = write(tmp_path, "model: ./ckpt\nsteps: [_test_rule]\n")
    monkeypatch.chdir("/")
    assert load_recipe(p).model == str((tmp_path / "ckpt").resolve())


def test_calibration_text_resolves_against_recipe_folder_not_cwd(tmp_path, monkeypatch):
    (tmp_path / "cal.txt").write_text("one line\n")
    p = write(tmp_path, "calibration: {text: cal.txt}\nsteps: [_test_rule]\n")
    monkeypatch.chdir("/")
    assert load_recipe(p).calibration.text == str((tmp_path / "cal.txt").resolve())


@pytest.mark.parametrize("name", ["minilm-drop", "smollm2-drop"])
def test_example_recipes(name):
    r = load_recipe(EXAMPLES / f"{name}.yaml")
    assert [s.rule for s in r.steps] == ["drop_attention"]
    assert r.calibration.text == ("bundled" if name == "minilm-drop" else "auto")
    if name == "minilm-drop":
        assert r.model == "minilm" and r.output == "out/minilm-drop"
        assert (r.calibration.samples, r.calibration.seq_len) == (64, 128)
        assert r.gate == GateSpec(metric="embedding_cosine", min=0.97, min_worst=0.90)
        assert r.steps[0].options.max_layers == 2
    else:
        assert r.model == "smollm2" and r.output == "out/smollm2-drop"
        assert (r.calibration.samples, r.calibration.seq_len, r.calibration.lengths) == (32, 256, "auto")
        assert r.gate == GateSpec(metric="perplexity_ratio", max=1.05)
        assert r.steps[0].options.max_layers == 4


def test_drop_attention_options_are_validated_by_the_rule():
    r = load_recipe({"steps": [{"drop_attention": {"max_layers": 3, "order": "graph"}}]})
    from rewriter.rule import get_rule
    assert type(r.steps[0].options) is get_rule("drop_attention").options
    e = error_of({"steps": [{"drop_attention": {"max_layers": 0}}]})
    assert "<recipe>: steps[0].drop_attention.max_layers: must be >= 1, got 0" in str(e)
    e = error_of({"steps": [{"drop_atention": {}}]})
    assert "unknown rule 'drop_atention' (did you mean 'drop_attention'?)" in str(e)


# --- errors --------------------------------------------------------------------------------------

def test_file_not_found(tmp_path):
    missing = tmp_path / "nope.yaml"
    e = error_of(missing)
    assert str(e).startswith(f"{missing}: recipe file not found")


def test_yaml_syntax_error_names_the_line(tmp_path):
    p = write(tmp_path, "model: minilm\nsteps:\n  - _test_rule: {max_layers: 2\noutput: x\n")
    e = error_of(p)
    assert str(e) == (f"{p}: line 4, column 7: YAML syntax error: expected ',' or '}}', but got ':' "
                      "(while parsing a flow mapping that starts at line 3)")


def test_duplicate_key_is_an_error(tmp_path):
    p = write(tmp_path, "steps: [_test_rule]\ngate: {metric: kl, max: 0.1}\ngate: {metric: kl, max: 0.2}\n")
    e = error_of(p)
    assert str(e) == f"{p}: line 3, column 1: duplicate key 'gate' (first at line 2); allowed: each key once per mapping"


@pytest.mark.parametrize("text,got", [("- _test_rule\n", "a list"), ("just words\n", "a string"),
                                      ("", "an empty file")])
def test_top_level_not_a_mapping(tmp_path, text, got):
    p = write(tmp_path, text)
    e = error_of(p)
    assert str(e) == (f"{p}: the recipe must be a mapping of keys, got {got}; "
                      "allowed: model, calibration, gate, budget, steps, output")


def test_unknown_top_level_key(tmp_path):
    p = write(tmp_path, "stesp: [_test_rule]\n")
    e = error_of(p)
    assert str(e) == (f"{p}: stesp: unknown key (did you mean 'steps'?); "
                      "allowed: model, calibration, gate, budget, steps, output")
    assert (e.file, e.path) == (str(p), "stesp")


def test_wrong_type(tmp_path):
    p = write(tmp_path, "calibration: {samples: many}\nsteps: [_test_rule]\n")
    e = error_of(p)
    assert str(e) == f"{p}: calibration.samples: expected an integer, got 'many' (string); allowed: an integer > 0"


@pytest.mark.parametrize("section,message", [
    ({"calibration": {"samples": 0}}, "calibration.samples: must be > 0, got 0 (integer); allowed: an integer > 0"),
    ({"calibration": {"seq_len": -1}}, "calibration.seq_len: must be > 0, got -1 (integer)"),
    ({"calibration": {"batch_size": 0}}, "calibration.batch_size: must be > 0"),
    ({"calibration": {"heldout": -1}}, "calibration.heldout: must be >= 0"),
    ({"budget": {"max_sites": 0}}, "budget.max_sites: must be > 0, got 0 (integer); allowed: an integer > 0 or null"),
    ({"gate": {"metric": "embedding_cosine", "min": 1.2}},
     "gate.min: embedding_cosine min bound 1.2 is out of range; allowed: a number in [-1, 1]"),
    ({"gate": {"metric": "embedding_cosine", "min": 0.9, "min_worst": -3.0}},
     "gate.min_worst: embedding_cosine min_worst bound -3.0 is out of range"),
    ({"gate": {"metric": "top1_agreement", "min": 1.5}}, "allowed: a number in [0, 1]"),
    ({"gate": {"metric": "perplexity_ratio", "max": 0.9}}, "gate.max: perplexity_ratio max bound 0.9 is out of range"),
    ({"gate": {"metric": "kl", "max": -0.1}}, "gate.max: kl max bound -0.1 is out of range; allowed: a number >= 0"),
])
def test_out_of_range(section, message):
    e = error_of({**section, **STEP})
    assert str(e).startswith("<recipe>: ") and message in str(e)


def test_gate_bound_key_must_match_metric():
    e = error_of({"gate": {"metric": "kl", "min": 0.9}, **STEP})
    assert str(e) == "<recipe>: gate.min: metric kl takes no min bound (it is bounded by max); allowed: max"
    e = error_of({"gate": {"metric": "relative_rms", "max": 0.1, "min_worst": 0.5}, **STEP})
    assert "gate.min_worst: metric relative_rms takes no min_worst bound" in str(e)
    e = error_of({"gate": {"metric": "top1_agreement"}, **STEP})
    assert str(e) == "<recipe>: gate.min: metric top1_agreement needs a min bound; allowed: min: <number>"
    e = error_of({"gate": {"metric": "cosine", "min": 0.9}, **STEP})
    assert "gate.metric: 'cosine' (string) is not allowed" in str(e) and "'embedding_cosine'" in str(e)
    e = error_of({"gate": {"metric": "kl", "max": 0.1, "maximum": 1}, **STEP})
    assert str(e) == "<recipe>: gate.maximum: unknown key (did you mean 'max'?); allowed: metric, min, max, min_worst, decode"


def test_gatespec_validates_on_its_own():
    with pytest.raises(ValueError, match="takes no min bound"):
        GateSpec(metric="kl", min=0.5)


def test_unknown_rule_lists_known_and_suggests(tmp_path):
    p = write(tmp_path, "steps:\n  - _test_rule: {}\n  - _tset_rule: {max_layers: 2}\n")
    e = error_of(p)
    assert str(e).startswith(f"{p}: steps[1]._tset_rule: unknown rule '_tset_rule' (did you mean '_test_rule'?); allowed: ")
    known = str(e).split("allowed: ")[1].split(", ")
    assert "_test_rule" in known and "drop_attention" in known


def test_unknown_option_lists_the_rules_options(tmp_path):
    p = write(tmp_path, "steps:\n  - _test_rule: {max_layer: 2}\n")
    e = error_of(p)
    assert str(e) == (f"{p}: steps[0]._test_rule.max_layer: unknown option (did you mean 'max_layers'?); "
                      "allowed: layers, max_applied, max_layers, order, patience")


@pytest.mark.parametrize("opts,message", [
    ({"max_layers": "two"}, "steps[0]._test_rule.max_layers: expected an integer, got 'two' (string); "
                            "allowed: an integer >= 1 or null"),
    ({"order": "random"}, "steps[0]._test_rule.order: 'random' (string) is not allowed; "
                          "allowed: 'importance' or 'graph'"),
    ({"layers": "x-y"}, 'steps[0]._test_rule.layers: layers must be "all", "auto", "A-B", "A,B,C" or a list of ints'),
    ({"layers": 3.5}, "steps[0]._test_rule.layers: invalid value 3.5 (number); allowed: Which sites to target"),
    (7, "steps[0]._test_rule: options must be a mapping (or empty), got 7 (integer); allowed: layers, max_applied, max_layers, order, patience"),
])
def test_bad_option_values(opts, message):
    e = error_of({"steps": [{"_test_rule": opts}]})
    assert str(e).startswith("<recipe>: " + message)


@pytest.mark.parametrize("step,got", [
    ({"_test_rule": {}, "drop_attention": {}}, "a mapping with 2 keys (_test_rule, drop_attention)"),
    ({}, "a mapping with 0 keys ()"),
    (3, "3 (integer)"),
    (["_test_rule"], "a list ['_test_rule']"),
])
def test_step_not_a_single_key_mapping(step, got):
    e = error_of({"steps": [{"_test_rule": None}, step]})
    assert str(e) == ("<recipe>: steps[1]: each step must be a single-key mapping {rule: options}, got "
                      f"{got}; allowed: a list of single-key mappings, e.g. - drop_attention: {{max_layers: 2}}")


def test_calibration_text_missing(tmp_path):
    p = write(tmp_path, "calibration: {text: data/cal.txt}\nsteps: [_test_rule]\n")
    e = error_of(p)
    assert str(e) == (f"{p}: calibration.text: calibration text file not found: {tmp_path.resolve() / 'data' / 'cal.txt'} "
                      f"(relative paths resolve against {tmp_path.resolve()}); "
                      "allowed: auto, mix, bundled, pydoc, python, legal, a '+'-joined mix such as pydoc+python, "
                      "or a path to a .txt or .jsonl file")


def test_calibration_text_wrong_kind(tmp_path):
    e = error_of({"calibration": {"text": "notes.md"}, **STEP})
    assert "calibration.text: 'notes.md' is neither a known source nor a .txt/.jsonl file" in str(e)


@pytest.mark.parametrize("steps", ["steps: []\n", "steps:\n", "model: minilm\n"])
def test_empty_or_missing_steps(tmp_path, steps):
    p = write(tmp_path, steps)
    e = error_of(p)
    assert str(e) == (f"{p}: steps: the recipe has no steps; it needs at least one; "
                      "allowed: a list of single-key mappings, e.g. - drop_attention: {max_layers: 2}")


def test_steps_not_a_list():
    e = error_of({"steps": {"_test_rule": {}}})
    assert "<recipe>: steps: expected a list, got a mapping" in str(e)


def test_section_not_a_mapping_and_model_not_a_string():
    e = error_of({"calibration": 64, **STEP})
    assert str(e) == ("<recipe>: calibration: expected a mapping, got 64 (integer); "
                      "allowed: text, samples, seq_len, lengths, batch_size, heldout, validation")
    e = error_of({"model": ["minilm"], **STEP})
    assert str(e).startswith("<recipe>: model: expected a non-empty string, got a list ['minilm']")


def test_several_problems_one_line_each():
    e = error_of({"calibration": {"samples": 0, "seq_len": "long"}, **STEP})
    lines = str(e).splitlines()
    assert lines == ["<recipe>: calibration.samples: must be > 0, got 0 (integer); allowed: an integer > 0",
                     "<recipe>: calibration.seq_len: expected an integer, got 'long' (string); allowed: an integer > 0"]
    assert e.path == "calibration.samples" and len(e.issues) == 2


# --- gates and schema ------------------------------------------------------------------------------

def test_default_gates():
    assert default_gate("encoder") == GateSpec(metric="embedding_cosine", min=0.97, min_worst=0.90)
    assert default_gate("causal_lm") == GateSpec(metric="perplexity_ratio", max=1.05)
    assert default_gate("vision") == GateSpec(metric="top1_agreement", min=0.95)
    assert default_gate("generic") == GateSpec(metric="relative_rms", max=0.05)
    with pytest.raises(ValueError, match="unknown model kind 'audio'; allowed: encoder, causal_lm, vision, generic"):
        default_gate("audio")


def test_gatespec_check():
    g = GateSpec(metric="embedding_cosine", min=0.97, min_worst=0.9)
    assert g.bound == ("min", 0.97) and g.higher_is_better
    assert g.check(0.98, worst=0.95) is None
    assert g.check(0.96) == "embedding_cosine 0.96 < min 0.97"
    assert g.check(0.99, worst=0.5) == "embedding_cosine of the worst sample 0.5 < min_worst 0.9"
    assert g.check(float("nan")) == "embedding_cosine is nan"
    p = GateSpec(metric="perplexity_ratio", max=1.05)
    assert p.bound == ("max", 1.05) and not p.higher_is_better
    assert p.check(1.04) is None and p.check(1.06) == "perplexity_ratio 1.06 > max 1.05"


def test_schema_describes_every_rule_and_section():
    s = recipe_schema()
    json.dumps(s)
    assert s["additionalProperties"] is False and s["required"] == ["steps"]
    assert set(s["properties"]) == {"model", "calibration", "gate", "budget", "steps", "output"}
    variants = s["properties"]["steps"]["items"]["oneOf"]
    by_rule = {v["title"]: v for v in variants if v.get("type") == "object"}
    assert {"_test_rule", "drop_attention"} <= set(by_rule)
    ref = by_rule["_test_rule"]["properties"]["_test_rule"]["anyOf"][0]["$ref"]
    opts = s["$defs"][ref.rsplit("/", 1)[1]]
    assert set(opts["properties"]) == {"layers", "max_applied", "max_layers", "order", "patience"}
    assert opts["additionalProperties"] is False
    cal_ref = s["properties"]["calibration"]["anyOf"][0]["$ref"].rsplit("/", 1)[1]
    assert s["$defs"][cal_ref]["properties"]["samples"]["exclusiveMinimum"] == 0
    gate_ref = s["properties"]["gate"]["anyOf"][0]["$ref"].rsplit("/", 1)[1]
    kl = next(c for c in s["$defs"][gate_ref]["allOf"] if c["if"]["properties"]["metric"]["const"] == "kl")
    assert kl["then"]["required"] == ["max"]
