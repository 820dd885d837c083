"""The recipe surface under fuzzing (issue 14): any YAML document gives either a valid Recipe or one
RecipeError whose text is one line per problem, each naming the file; the CLI turns it into exit
status 2 with no traceback. Documents are drawn both from arbitrary YAML values and from mutations of
the real example recipes (a key renamed, a value replaced), where the interesting mistakes live."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rewriter.recipe import Recipe, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "recipes").glob("*.yaml"))
KEYS = ["model", "calibration", "gate", "budget", "steps", "output", "text", "samples", "seq_len",
        "batch_size", "heldout", "validation", "metric", "min", "max", "min_worst", "layers", "max_layers",
        "max_applied", "order", "keep", "topk", "drop_attention", "masa", "linear_attention", "window"]

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(KEYS))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)),
                                                 inner, max_size=4)), max_leaves=12)


def _mutate(doc, path: list, new):
    """`doc` with the value at `path` (a list of keys / indices, chosen modulo the sizes) replaced."""
    if not path or not isinstance(doc, (dict, list)) or not doc:
        return new
    if isinstance(doc, dict):
        key = sorted(doc, key=str)[path[0] % len(doc)]
        return {**doc, key: _mutate(doc[key], path[1:], new)}
    i = path[0] % len(doc)
    return doc[:i] + [_mutate(doc[i], path[1:], new)] + doc[i + 1:]


def _judge(text: str, tmp_path: Path) -> None:
    f = tmp_path / "fuzzed.yaml"
    f.write_text(text)
    try:
        r = load_recipe(f)
    except RecipeError as e:
        lines = str(e).splitlines()
        assert lines and all(line.startswith(str(f)) for line in lines), str(e)
        assert e.file == str(f)
    else:
        assert isinstance(r, Recipe)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=values)
def test_any_yaml_value_is_a_recipe_or_one_line_per_problem(doc, tmp_path):
    _judge(yaml.safe_dump(doc), tmp_path)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.integers(0, 100), path=st.lists(st.integers(0, 50), min_size=1, max_size=4), new=values)
def test_mutated_example_recipes_are_recipes_or_one_line_per_problem(which, path, new, tmp_path):
    doc = yaml.safe_load(EXAMPLES[which % len(EXAMPLES)].read_text())
    _judge(yaml.safe_dump(_mutate(doc, path, new)), tmp_path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(list("{}[]:-,'\"\n #&*!|>%@`\t\r") + ["ab", "1", "steps", "\xff"]),
                     max_size=40))
def test_text_that_is_not_yaml_names_the_file(parts, tmp_path):
    _judge("".join(parts), tmp_path)


@pytest.mark.parametrize("text", ["steps: [{drop_attention: {max_layers: 0}}]\n", "gate: {metric: 3}\n",
                                  "{{{{\n", "steps:\n  - nonsense_rule: {}\n"])
def test_cli_gives_exit_2_and_no_traceback(text, tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("model: minilm\n" + text if not text.startswith("{") else text)
    out = subprocess.run([sys.executable, "-m", "rewriter", "run", str(f)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr + out.stdout
    assert str(f) in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
