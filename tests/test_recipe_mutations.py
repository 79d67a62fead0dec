"""A generated corpus of mutated recipes: every one is accepted or refused with one line naming
the file (and the field where there is one) -- never a traceback, never a silently ignored key."""

from __future__ import annotations

import copy
import random
import subprocess
import sys

import pytest
import yaml

from quantize_pipeline.errors import RecipeError
from quantize_pipeline.recipe.schema import load_recipe
from tests.conftest import DEFAULT_RECIPE, REPO

BASE = yaml.safe_load(DEFAULT_RECIPE.read_text())
# The explicit scheme form and algorithm options: nested mappings behind tagged unions.
EXPLICIT_RECIPE = REPO / "recipes" / "smollm2-135m-uint4-wo-64-asym.yaml"
EXPLICIT_BASE = yaml.safe_load(EXPLICIT_RECIPE.read_text())
EXPLICIT_BASE["quantization"] = {
    **EXPLICIT_BASE["quantization"],
    "algorithm": {"name": "gptq", "options": {"damp_percent": 0.05}},
}
ODD_VALUES = [None, "", "??", -1, 0, 10**12, 3.5, True, [], {}, ["x"], {"a": 1}, "re:(", "int8_per_chanel"]


def _paths(node, prefix=()):
    if isinstance(node, dict):
        for key, value in node.items():
            yield prefix + (key,)
            yield from _paths(value, prefix + (key,))


def _mutate(rng: random.Random, base: dict = BASE, text_source=DEFAULT_RECIPE) -> tuple[str, dict | str]:
    recipe = copy.deepcopy(base)
    path = rng.choice(list(_paths(recipe)))
    parent = recipe
    for key in path[:-1]:
        parent = parent[key]
    kind = rng.choice(["delete", "typo", "value", "extra", "text"])
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "typo":
        parent[path[-1] + rng.choice(["s", "_", "x"])] = parent.pop(path[-1])
    elif kind == "value":
        parent[path[-1]] = rng.choice(ODD_VALUES)
    elif kind == "extra":
        parent["unexpected_" + str(rng.randint(0, 99))] = 1
    else:
        text = text_source.read_text()
        cut = rng.randint(0, len(text))
        return kind, text[:cut] + rng.choice(["", ":", "\t- [", "\x00", "  bad: [1,"]) + text[cut:]
    return kind, recipe


CORPORA = {"default": (BASE, DEFAULT_RECIPE), "explicit": (EXPLICIT_BASE, EXPLICIT_RECIPE)}


@pytest.mark.parametrize(("corpus", "seed"), [("default", seed) for seed in range(300)] +
                         [("explicit", seed) for seed in range(150)])
def test_mutated_recipe_is_accepted_or_refused_in_one_line(tmp_path, corpus, seed):
    kind, mutated = _mutate(random.Random(seed), *CORPORA[corpus])
    path = tmp_path / "mutated.yaml"
    path.write_text(mutated if isinstance(mutated, str) else yaml.safe_dump(mutated))
    try:
        recipe = load_recipe(path)
    except RecipeError as exc:
        line = exc.one_line()
        assert line.startswith(f"{path}: ") and "\n" not in line and len(line) < 600
        assert "explicit-scheme" not in line and "named-scheme" not in line  # union tags never leak
        if kind in ("typo", "extra"):
            assert "unknown key" in line or "required field is missing" in line, line
        return
    # Accepted: a typo'd or extra key can never be, and nothing the mutation set may be dropped silently.
    assert kind in ("delete", "value", "text"), (kind, mutated)
    assert recipe.scheme.name


def test_cli_refuses_a_mutated_corpus_with_exit_2_and_no_traceback(tmp_path):
    paths = []
    for seed in range(12):
        kind, mutated = _mutate(random.Random(1000 + seed))
        path = tmp_path / f"m{seed}.yaml"
        path.write_text((mutated if isinstance(mutated, str) else yaml.safe_dump(mutated)) + "\nnot_a_field: 1\n")
        paths.append(path)
    for path in paths:
        done = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "validate", str(path)],
                              capture_output=True, text=True, cwd=REPO, timeout=60)
        assert done.returncode == 2, (path.read_text(), done.stdout)
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
        assert done.stderr.startswith(f"error: {path}: ")
