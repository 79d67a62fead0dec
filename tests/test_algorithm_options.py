"""quantization.algorithm: a name (template defaults) or {name, options} checked against the fields of
Quark's config class for that algorithm (mirrored in the schema; test_quark_config.py checks the mirror)."""

from __future__ import annotations

import pytest
import yaml

from quantize_pipeline.errors import RecipeError
from quantize_pipeline.recipe.schema import load_recipe
from tests.conftest import MINIMAL_RECIPE


def _with_algorithm(write_recipe, algorithm):
    data = yaml.safe_load(MINIMAL_RECIPE)
    data["quantization"]["algorithm"] = algorithm
    return write_recipe(yaml.safe_dump(data))


def test_a_bare_name_keeps_the_template_defaults(write_recipe):
    recipe = load_recipe(_with_algorithm(write_recipe, "gptq"))
    assert recipe.quantization.algorithm_name == "gptq"
    assert recipe.quantization.algorithm_options == {}
    assert load_recipe(write_recipe(MINIMAL_RECIPE, "none.yaml")).quantization.algorithm_name is None


def test_options_are_typed_and_only_the_chosen_ones_are_passed_on(write_recipe):
    recipe = load_recipe(_with_algorithm(write_recipe, {"name": "smoothquant", "options": {"alpha": 0.5}}))
    assert recipe.quantization.algorithm_options == {"alpha": 0.5}
    recipe = load_recipe(_with_algorithm(write_recipe, {"name": "rotation", "options": {"r3": False, "rotation_size": 64}}))
    assert recipe.quantization.algorithm_options == {"r3": False, "rotation_size": 64}


@pytest.mark.parametrize(
    ("algorithm", "field", "words"),
    [
        ({"name": "gptq", "options": {"dampen": 0.1}}, "quantization.algorithm.options.dampen", "unknown key"),
        ({"name": "gptq", "options": {"damp_percent": "lots"}}, "quantization.algorithm.options.damp_percent",
         "valid number"),
        ({"name": "gptq", "options": {"static_groups": False}}, "quantization.algorithm.options",
         "static_groups: true with desc_act"),
        ({"name": "awq", "options": {"alpha": 0.5}}, "quantization.algorithm.options.alpha", "unknown key"),
        ({"name": "smoothquant", "options": {"alpha": 2}}, "quantization.algorithm.options.alpha", "less than or equal to 1"),
        ({"name": "gptqq"}, "quantization.algorithm", "unknown algorithm 'gptqq' (did you mean 'gptq'?"),
        ("smoothqant", "quantization.algorithm", "did you mean 'smoothquant'"),
        ({"options": {"alpha": 0.5}}, "quantization.algorithm", "required field is missing: name (one of: gptq"),
        ({"name": "gptq", "option": {}}, "quantization.algorithm.option", "unknown key"),
    ],
)
def test_bad_algorithm_settings_are_refused_in_one_line(write_recipe, algorithm, field, words):
    path = _with_algorithm(write_recipe, algorithm)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    line = caught.value.one_line()
    assert line.startswith(f"{path}: {field}"), line
    assert words in line and "\n" not in line


def test_algorithm_calibration_batches_are_packed_to_one_length():
    """Quark's layer-wise algorithms need batches of one length (see equal_length_batches)."""
    from quantize_pipeline.quantize.quantize import equal_length_batches

    batches = equal_length_batches([[1, 2, 3, 4, 5, 6, 7], [8], [9, 10, 11, 12]])
    assert batches == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]]
    assert equal_length_batches([[1, 2], [3, 4]]) == [[1, 2], [3, 4]]
