from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO / "recipes" / "smollm2-135m-int8.yaml"


@pytest.fixture(autouse=True)
def _isolated_hf_home(tmp_path_factory, monkeypatch):
    """Each test gets its own HF_HOME; nothing may reach the network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def write_recipe(tmp_path):
    """Write a recipe YAML (text) into tmp_path and return its path."""

    def write(text: str, name: str = "recipe.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


MINIMAL_RECIPE = """\
name: tiny
model:
  source: builtin:smollm2-135m-instruct
quantization:
  scheme: int8_per_channel
"""


@pytest.fixture
def minimal_recipe_text() -> str:
    return MINIMAL_RECIPE


def pytest_report_header(config):
    return f"QP_CACHE_DIR={os.environ.get('QP_CACHE_DIR', '~/.cache/quantize-pipeline')}"
