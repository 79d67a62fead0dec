"""What ships in the package: the recipes listed by `recipes`, starter recipes written by `init`, and the
`--until` stages the CLI offers (fast: no model is loaded)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from quantize_pipeline import cli
from quantize_pipeline.recipe.schema import load_recipe
from quantize_pipeline.recipe.shipped import SHIPPED_RECIPES_DIR, shipped_recipes, starter_name
from quantize_pipeline.run.resume import UNTIL_STAGES
from tests.conftest import REPO


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_the_checkout_s_recipes_folder_is_the_package_s():
    assert (REPO / "recipes").resolve() == SHIPPED_RECIPES_DIR
    assert (SHIPPED_RECIPES_DIR / "model-configs" / "index.json").is_file()


def test_recipes_lists_every_shipped_recipe_with_its_scheme(tmp_path):
    done = _cli("recipes", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(list(SHIPPED_RECIPES_DIR.glob("*.yaml"))) == len(shipped_recipes()) > 10
    assert "smollm2-135m-int8: int8_per_channel on builtin:smollm2-135m-instruct (" in done.stdout


def test_init_writes_a_valid_starter_recipe_for_a_model_and_scheme(tmp_path):
    done = _cli("init", "meta-llama/Llama-3.1-8B-Instruct", "--scheme", "ptpc_fp8", "-o", "r.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    recipe = load_recipe(tmp_path / "r.yaml")
    assert recipe.name == "llama-3.1-8b-instruct-ptpc_fp8" and recipe.scheme.name == "ptpc_fp8"
    assert recipe.model.source == "meta-llama/Llama-3.1-8B-Instruct" and recipe.quantization.exclude == ("lm_head",)
    # Every field is spelled out, so the file shows what can be changed.
    assert set(yaml.safe_load((tmp_path / "r.yaml").read_text())) >= {"calibration", "evaluation", "gates", "publish"}
    again = _cli("init", "x/y", "--scheme", "fp8", "-o", "r.yaml", cwd=tmp_path)
    assert again.returncode == 2 and again.stderr.strip() == "error: r.yaml: exists (--force overwrites it)"
    assert load_recipe(tmp_path / "r.yaml").name == recipe.name  # untouched


def test_init_refuses_an_unknown_scheme_naming_the_field_and_writes_nothing(tmp_path):
    done = _cli("init", "x/y", "--scheme", "fp9", "-o", "r.yaml", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith("error: init: quantization.scheme: Value error, unknown scheme 'fp9' (did you mean 'fp8'?")
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "r.yaml").exists()


def test_init_from_a_shipped_recipe_copies_it(tmp_path):
    done = _cli("init", "--from", "llama70b-fp8", "-o", "mine.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "mine.yaml").read_text() == (SHIPPED_RECIPES_DIR / "llama70b-fp8.yaml").read_text()
    unknown = _cli("init", "--from", "llama71b", "-o", "other.yaml", cwd=tmp_path)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: llama71b: no such shipped recipe (shipped: ")
    both = _cli("init", "x/y", "--scheme", "fp8", "--from", "llama70b-fp8", "-o", "other.yaml", cwd=tmp_path)
    assert both.returncode == 2 and "give MODEL with --scheme, or --from NAME" in both.stderr


def test_starter_names_follow_the_model_id():
    assert starter_name("meta-llama/Llama-3.1-70B-Instruct", "fp8") == "llama-3.1-70b-instruct-fp8"
    assert starter_name("builtin:smollm2-135m-instruct", "int8_per_channel") == "smollm2-135m-instruct-int8_per_channel"
    assert starter_name("/models/My Model/", "fp8") == "my-model-fp8"


def test_the_cli_offers_the_stages_a_run_can_stop_after():
    until = next(option for option in cli.run.params if option.name == "until")
    assert tuple(until.type.choices) == UNTIL_STAGES


def test_run_without_recipe_or_resume_is_refused_in_one_line(tmp_path):
    done = _cli("run", cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip() == "error: run: give RECIPE, or --resume RUN_DIR"
