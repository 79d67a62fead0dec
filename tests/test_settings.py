"""`--set FIELD=VALUE` (issue #29): a CI matrix varies a recipe field without a file per cell."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from quantize_pipeline.errors import RecipeError
from quantize_pipeline.recipe.schema import load_recipe
from tests.conftest import DEFAULT_RECIPE, REPO


def test_settings_apply_in_order_as_yaml_values_and_change_the_content_hash(tmp_path):
    plain = load_recipe(DEFAULT_RECIPE)
    recipe = load_recipe(DEFAULT_RECIPE, ("evaluation.limit=20", "evaluation.max_limit=40", "publish.target=hf://org/x",
                                          "evaluation.tasks=[arc_easy, piqa]", "gates.max_mean_kl=null",
                                          "evaluation.limit=30"))
    assert recipe.evaluation.limit == 30 and recipe.evaluation.tasks == ("arc_easy", "piqa")
    assert recipe.publish.target == "hf://org/x" and recipe.gates.max_mean_kl is None
    assert recipe.content_hash() != plain.content_hash()
    # The same as the file written with those values: what a run records and resumes by.
    data = yaml.safe_load(DEFAULT_RECIPE.read_text())
    data["evaluation"].update(limit=30, max_limit=40, tasks=["arc_easy", "piqa"])
    data["publish"]["target"] = "hf://org/x"
    data["gates"]["max_mean_kl"] = None
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data))
    assert load_recipe(edited).content_hash() == recipe.content_hash()


def test_a_setting_may_open_a_section_the_file_leaves_out(tmp_path):
    path = tmp_path / "minimal.yaml"
    path.write_text("name: tiny\nmodel:\n  source: builtin:smollm2-135m-instruct\nquantization:\n  scheme: int8_per_channel\n")
    assert load_recipe(path, ("resources.host_memory_gb=8",)).resources.host_memory_gb == 8


@pytest.mark.parametrize(("setting", "field", "words"), [
    ("evaluation.limit=many", "evaluation.limit", "valid integer"),
    ("evaluation.limitt=3", "evaluation.limitt", "unknown key"),
    ("quantization.scheme=int9", "quantization.scheme", "int9"),
    ("limit", "--set", "expected FIELD=VALUE"),
    ("evaluation..limit=3", "--set", "expected FIELD=VALUE"),
    ("name.first=x", "name", "not a section"),
    ("evaluation.tasks=[arc_easy", "evaluation.tasks", "not YAML"),
])
def test_a_bad_setting_is_one_line_naming_the_file_and_field(setting, field, words):
    with pytest.raises(RecipeError) as raised:
        load_recipe(DEFAULT_RECIPE, (setting,))
    assert raised.value.field == field and words in str(raised.value), str(raised.value)
    assert str(DEFAULT_RECIPE) in raised.value.one_line() and "\n" not in raised.value.one_line()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120)


def test_validate_and_plan_take_settings():
    refused = _cli("validate", str(DEFAULT_RECIPE), "--set", "evaluation.limit=0")
    assert refused.returncode == 2 and "evaluation.limit" in refused.stderr and refused.stderr.count("\n") == 1
    planned = _cli("plan", str(DEFAULT_RECIPE), "--set", "quantization.scheme=int4_wo_64",
                   "--model-config", str(REPO / "recipes" / "model-configs" / "llama-3.1-70b-instruct" / "config.json"))
    assert planned.returncode == 0, planned.stderr
    assert "int4_wo_64" in planned.stdout and "int8_per_channel" not in planned.stdout


def test_every_sweep_variant_carries_the_settings(tmp_path):
    from quantize_pipeline.commands import sweep

    plan = sweep.plan_sweep(DEFAULT_RECIPE, tmp_path, schemes="int8_per_channel,int4_wo_64",
                            settings=("evaluation.limit=25", "evaluation.max_limit=25"))
    paths = sweep.write_variant_recipes(plan)
    assert {load_recipe(path).evaluation.limit for path in paths.values()} == {25}
