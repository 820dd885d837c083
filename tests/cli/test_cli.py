"""The `rewriter` command line: commands, JSON output, and exit status 2 / 1 with one message, no traceback."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from rewriter import cli
from rewriter.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")   # rich tables unfolded, so names can be asserted


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def write(tmp_path: Path, text: str, name: str = "recipe.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# --- rules, schema, models -------------------------------------------------------------------------

def test_rules_table_and_json(capsys):
    code, out, _ = run(capsys, "rules")
    assert code == 0
    assert "drop_attention" in out and "arXiv:2406.15786" in out and "max_layers" in out
    code, out, _ = run(capsys, "rules", "--json")
    assert code == 0
    rules = {r["name"]: r for r in json.loads(out)}
    from rewriter.rule import all_rules
    assert set(rules) == set(all_rules())
    drop = rules["drop_attention"]
    assert drop["exact"] is False and "2406.15786" in drop["paper"] and drop["summary"]
    assert {"layers", "max_layers", "order"} <= set(drop["options"]["properties"])


def test_schema_is_json_and_names_the_rules(capsys):
    code, out, _ = run(capsys, "schema")
    assert code == 0
    schema = json.loads(out)
    assert schema["title"] == "rewriter recipe"
    titles = {v.get("title") for v in schema["properties"]["steps"]["items"]["oneOf"]}
    assert "drop_attention" in titles


def test_models(capsys):
    from rewriter.models import registered
    names = registered()
    assert {"minilm", "smollm2", "bert"} <= set(names)
    code, out, _ = run(capsys, "models")
    assert code == 0 and all(n in out for n in names)
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0 and json.loads(out) == names


def test_usage_errors_exit_2(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "required: COMMAND" in err
    code, _, err = run(capsys, "inspect", "bert", "--seq-len", "0")
    assert code == 2 and "--seq-len: expected a positive integer, got 0" in err
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "inspect" in out


# --- recipe errors: exit 2, the message, no traceback ----------------------------------------------

RECIPE_ERRORS = {
    "missing_file": (None, "recipe file not found"),
    "syntax": ("steps:\n  - drop_attention: {max_layers: 2\nmodel: bert\n", "line 3, column 6: YAML syntax error"),
    "not_mapping": ("- drop_attention\n", "the recipe must be a mapping of keys, got a list"),
    "unknown_key": ("modle: bert\nsteps: [drop_attention]\n", "modle: unknown key (did you mean 'model'?)"),
    "wrong_type": ("calibration: {samples: many}\nsteps: [drop_attention]\n",
                   "calibration.samples: expected an integer, got 'many' (string); allowed: an integer > 0"),
    "range": ("gate: {metric: embedding_cosine, min: 1.5}\nsteps: [drop_attention]\n",
              "gate.min: embedding_cosine min bound 1.5 is out of range; allowed: a number in [-1, 1]"),
    "bound_key": ("gate: {metric: kl, min: 0.5}\nsteps: [drop_attention]\n",
                  "gate.min: metric kl takes no min bound (it is bounded by max); allowed: max"),
    "unknown_rule": ("steps:\n  - drop_attn: {max_layers: 2}\n",
                     "steps[0].drop_attn: unknown rule 'drop_attn' (did you mean 'drop_attention'?); allowed: "),
    "unknown_option": ("steps:\n  - drop_attention: {max_layer: 2}\n",
                       "steps[0].drop_attention.max_layer: unknown option (did you mean 'max_layers'?); allowed: "),
    "not_single_key": ("steps:\n  - {drop_attention: {}, drop_block: {}}\n",
                       "steps[0]: each step must be a single-key mapping {rule: options}"),
    "calibration_missing": ("calibration: {text: texts/none.txt}\nsteps: [drop_attention]\n",
                            "calibration.text: calibration text file not found: "),
    "empty_steps": ("model: bert\nsteps: []\n", "steps: the recipe has no steps; it needs at least one"),
}


@pytest.mark.parametrize("case", list(RECIPE_ERRORS))
def test_recipe_errors_exit_2(capsys, tmp_path, case):
    text, expected = RECIPE_ERRORS[case]
    path = tmp_path / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    code, out, err = run(capsys, "run", str(path))
    assert code == 2
    assert err.startswith(f"rewriter: error: {path}: ") and expected in err, err
    assert out == ""


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(RecipeError):
        cli.main(["run", str(tmp_path / "none.yaml"), "--debug"])


def test_console_script_exit_code(tmp_path):
    script = Path(sys.executable).with_name("rewriter")
    assert script.exists(), f"console script not installed next to {sys.executable}"
    bad = write(tmp_path, "steps:\n  - drop_attention: {max_layers: 0}\n")
    proc = subprocess.run([str(script), "run", str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"rewriter: error: {bad}: steps[0].drop_attention.max_layers: "
                                   "must be >= 1, got 0 (integer); allowed: an integer >= 1 or null")
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_run_without_a_model_exits_2(capsys, tmp_path):
    p = write(tmp_path, "steps: [drop_attention]\n")
    code, _, err = run(capsys, "run", str(p))
    assert code == 2 and "the recipe names no `model:`; pass one with --model" in err


def test_unknown_model_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "inspect", "no_such_model_xyz")
    assert code == 2 and err.startswith("rewriter: error: cannot load model 'no_such_model_xyz': ")
    assert "minilm" in err   # the loader lists the registered names
    p = write(tmp_path, "model: no_such_model_xyz\nsteps: [drop_attention]\n")
    code, _, err = run(capsys, "run", str(p))
    assert code == 2 and "cannot load model 'no_such_model_xyz'" in err


# --- inspect and run on a tiny model ---------------------------------------------------------------

def test_inspect_bert_json(capsys):
    code, out, _ = run(capsys, "inspect", "bert", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["model"] == "bert" and d["kind"] == "encoder" and isinstance(d["notes"], list)
    assert len(d["sites"]) >= 2
    s0 = d["sites"][0]
    assert {"index", "module", "heads", "kv_heads", "head_dim", "mask", "norm", "positional"} <= set(s0)
    assert [s["index"] for s in d["sites"]] == list(range(len(d["sites"])))
    assert s0["norm"] == "post" and s0["mask"] in ("padding", "none")


def test_inspect_bert_table_eager(capsys):
    code, out, _ = run(capsys, "inspect", "bert", "--eager", "--seq-len", "12")
    assert code == 0
    assert "attention sites" in out and "encoder.layer.0" in out and "post" in out


class _Branchy(torch.nn.Module):
    """A forward with data-dependent Python control flow: torch.export cannot trace it."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


def test_trace_error_exits_1(capsys, monkeypatch):
    from rewriter.models import Loaded

    def load(spec, **kw):
        return Loaded(name=spec, model=_Branchy(), kind="generic", tokenizer=None, max_length=16,
                      inputs_fn=lambda batch, seq_len, seed=0: {"x": torch.randn(batch, seq_len)})

    monkeypatch.setattr(cli, "_load", load)
    code, out, err = run(capsys, "inspect", "branchy")
    assert code == 1
    assert "rewriter: error: could not trace branchy with torch.export" in err and out == ""


def test_run_tiny_bert_json_and_save(capsys, tmp_path):
    recipe = write(tmp_path, """
        calibration: {samples: 8, seq_len: 16, batch_size: 4, heldout: 4}
        gate: {metric: embedding_cosine, min: 0.5}
        steps:
          - drop_attention: {max_layers: 1}
        output: never-used
        """)
    out_dir = tmp_path / "saved"
    code, out, err = run(capsys, "run", str(recipe), "--model", "bert", "--output", str(out_dir), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["model"] == "bert" and report["output"] == str(out_dir)
    assert len(report["sites"]) >= 2
    statuses = [r["status"] for r in report["records"] if r["rule"] == "drop_attention"]
    assert statuses and sum(s == "applied" for s in statuses) <= 1
    assert report["gate"]["metric"] == "embedding_cosine"
    saved = load_recipe(out_dir / "recipe.yaml")
    assert saved.model == "bert" and saved.steps[0].options.max_layers == 1
    assert not (tmp_path / "never-used").exists() and not (ROOT / "never-used").exists()


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))

    def forward(self, x):
        return x + self.net(x)


def _load_mlp(spec, **kw):
    from rewriter.models import Loaded
    return Loaded(name=spec, model=_MLP().eval(), kind="generic", tokenizer=None, max_length=32,
                  inputs_fn=lambda batch, seq_len, seed=0: {"x": torch.randn(batch, seq_len, 8)})


def test_inspect_without_attention_says_what_it_saw(capsys, monkeypatch):
    monkeypatch.setattr(cli, "_load", _load_mlp)
    code, out, _ = run(capsys, "inspect", "mlp")
    assert code == 0
    assert "mlp (generic): no attention sites found" in out and "linear" in out
    code, out, _ = run(capsys, "inspect", "mlp", "--json")
    d = json.loads(out)
    assert code == 0 and d["sites"] == [] and d["notes"] and "linear" in " ".join(d["notes"])


def test_run_without_attention_exits_1(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli, "_load", _load_mlp)
    p = write(tmp_path, "model: mlp\ngate: {metric: relative_rms, max: 0.1}\nsteps: [drop_attention]\n")
    code, out, err = run(capsys, "run", str(p))
    assert code == 1 and "rewriter: error: mlp: " in err and "no attention sites" in err
