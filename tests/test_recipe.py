"""The recipe language: strict, with one-line errors naming file and field."""

from __future__ import annotations

import subprocess
import sys

import pytest

from quantize_pipeline.errors import RecipeError
from quantize_pipeline.recipe.schema import load_recipe
from tests.conftest import DEFAULT_RECIPE, MINIMAL_RECIPE, REPO


def test_default_recipe_loads_with_the_scheme_it_names():
    recipe = load_recipe(DEFAULT_RECIPE)
    assert recipe.quantization.scheme == "int8_per_channel"
    assert recipe.scheme.weight_granularity == "per_channel"
    assert recipe.scheme.activation_granularity == "per_token"
    assert "lm_head" in recipe.quantization.exclude


def test_defaults_fill_in_from_the_schema(write_recipe):
    recipe = load_recipe(write_recipe(MINIMAL_RECIPE))
    assert recipe.calibration.source == "wikipedia"
    assert recipe.evaluation.limit == 200
    assert recipe.gates.min_recovery == 0.90
    assert recipe.publish is None


@pytest.mark.parametrize(
    ("text", "field", "words"),
    [
        (MINIMAL_RECIPE + "quantisation: {}\n", "quantisation", "unknown key"),
        (MINIMAL_RECIPE.replace("int8_per_channel", "fp9"), "quantization.scheme", "unknown scheme 'fp9'"),
        (MINIMAL_RECIPE.replace("int8_per_channel", "int8_per_chanel"), "quantization.scheme", "did you mean 'int8_per_channel'"),
        (MINIMAL_RECIPE + "calibration: {samples: 0}\n", "calibration.samples", "greater than or equal to 1"),
        (MINIMAL_RECIPE + "calibration: {samples: many}\n", "calibration.samples", "valid integer"),
        (MINIMAL_RECIPE + "calibration: {source: /nonexistent/x.jsonl}\n", "calibration.source", "file not found"),
        (MINIMAL_RECIPE.replace("builtin:smollm2-135m-instruct", "/no/such/model"), "model.source", "neither a local model folder"),
        (MINIMAL_RECIPE + "evaluation: {tasks: [mmlu_pro]}\n", "evaluation.tasks", "unknown task"),
        (MINIMAL_RECIPE + "quantization: {scheme: fp8, exclude: ['re:(']}\n", "quantization.exclude", "bad regex"),
        ("name: tiny\nquantization: {scheme: fp8}\n", "model", "required field is missing"),
    ],
)
def test_bad_recipes_name_the_field(write_recipe, text, field, words):
    path = write_recipe(text)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    line = caught.value.one_line()
    assert line.startswith(f"{path}: {field}")
    assert words in line
    assert "\n" not in line


@pytest.mark.parametrize(
    ("content", "words"),
    [(b"", "empty recipe"), (b"\x00\x01\x02", "binary file"), (b"name: [unclosed\n", "YAML syntax error at line"),
     (b"- a\n- b\n", "expected a mapping"), (b"\xff\xfe", "not UTF-8")],
)
def test_unreadable_recipes(tmp_path, content, words):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(RecipeError, match=words):
        load_recipe(path)


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_recipe_hash_changes_with_content(write_recipe):
    one = load_recipe(write_recipe(MINIMAL_RECIPE, "a.yaml"))
    two = load_recipe(write_recipe(MINIMAL_RECIPE + "gates: {min_recovery: 0.5}\n", "b.yaml"))
    assert one.content_hash() != two.content_hash()
    assert one.content_hash() == load_recipe(write_recipe(MINIMAL_RECIPE, "c.yaml")).content_hash()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", *args], capture_output=True, text=True, cwd=REPO, timeout=60
    )


def test_validate_command_ok_and_bad(write_recipe):
    ok = _cli("validate", str(DEFAULT_RECIPE))
    assert ok.returncode == 0, ok.stderr
    bad = _cli("validate", str(write_recipe(MINIMAL_RECIPE + "typo_key: 1\n")))
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "typo_key: unknown key" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_validate_does_not_import_torch_and_is_fast():
    probe = (
        "import sys, time; t = time.perf_counter();"
        "from click.testing import CliRunner; from quantize_pipeline.cli import main;"
        f"r = CliRunner().invoke(main, ['validate', {str(DEFAULT_RECIPE)!r}]);"
        "assert r.exit_code == 0, r.output;"
        "heavy = [m for m in ('torch', 'vllm', 'quark', 'lm_eval', 'transformers') if m in sys.modules];"
        "print(heavy, time.perf_counter() - t)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    heavy, seconds = done.stdout.rsplit(" ", 1)
    assert heavy == "[]"
    assert float(seconds) < 2.0
