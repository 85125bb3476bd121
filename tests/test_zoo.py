"""The quality zoo's recipe names (benchmarks/zoo/one.py): what a row runs, refused in one line before any model
is read when the zoo cannot run it."""
import pytest

from benchmarks.zoo.one import RECIPES, parse_recipe


def test_recipe_names_and_their_fine_tune_suffix():
    assert parse_recipe("default") == ("default", "")
    assert parse_recipe("default+lora") == ("default", "lora")
    assert parse_recipe("paper+lora") == ("paper", "lora")
    assert parse_recipe("optipfair") == ("optipfair", "")
    assert all(parse_recipe(f"{r}+lora") == (r, "lora") for r in RECIPES)


@pytest.mark.parametrize("name", ["nope", "default+kd", "optipfair+lora", "dense+lora", "default+lora+lora", ""])
def test_unknown_recipes_are_refused_in_one_line(name):
    with pytest.raises(SystemExit) as err:
        parse_recipe(name)
    message = str(err.value)
    assert message.startswith("error: unknown recipe") and "\n" not in message
