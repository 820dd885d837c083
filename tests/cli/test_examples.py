"""Every recipe under examples/recipes is one a user can run as it is: it validates, names a
registered model, and has at least one step."""
from __future__ import annotations

from pathlib import Path

import pytest

from rewriter.models import registered
from rewriter.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "examples" / "recipes").glob("*.yaml"))


def test_there_are_example_recipes():
    assert len(RECIPES) >= 5


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_example_recipe_validates_and_names_a_registered_model(path):
    recipe = load_recipe(path)
    assert recipe.model in registered()
    assert recipe.steps, f"{path.name}: no steps"
    assert recipe.output and recipe.output.startswith("out/")
