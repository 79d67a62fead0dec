"""quantize_pipeline/quantize/quark_import.py narrows Quark's import-time scan of transformers' modeling files to the files naming
the fused-experts decorator: Quark must still register every decorated class (its MoE unfusing depends on it)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from quantize_pipeline.quantize import quark_import
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # imports Quark (~15 s)

REGISTERED = """
import json, quantize_pipeline, quark.torch
from quark.torch.utils.llm.module_replacement import quark_experts
from quark.torch.utils.llm.module_replacement.preprocess_registry import PREPROCESS_REGISTRY
print(json.dumps({"loader": type(quark_experts.__spec__.loader).__name__,
                  "registered": sorted(f"{cls.__module__}.{cls.__name__}" for cls in PREPROCESS_REGISTRY)}))
"""


def _decorated_classes_by_a_full_search() -> set[str]:
    """What Quark's unnarrowed scan finds: every top-level class of every modeling file decorated with the name."""
    import transformers

    root = Path(transformers.__file__).parent
    found = set()
    for file in (root / "models").rglob("modeling_*.py"):
        for node in ast.parse(file.read_text(encoding="utf-8")).body:
            decorators = [dec.func if isinstance(dec, ast.Call) else dec for dec in getattr(node, "decorator_list", [])]
            if isinstance(node, ast.ClassDef) and any(isinstance(dec, ast.Name) and dec.id == quark_import.DECORATOR
                                                      for dec in decorators):
                module = "transformers." + ".".join(file.relative_to(root).with_suffix("").parts)
                found.add(f"{module}.{node.name}")
    return found


def test_quark_registers_every_fused_experts_class_through_the_narrowed_scan():
    completed = subprocess.run([sys.executable, "-c", REGISTERED], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    registered = json.loads(completed.stdout.strip().splitlines()[-1])
    assert registered["loader"] == "_NarrowedLoader"  # the scan ran narrowed
    expected = _decorated_classes_by_a_full_search()
    assert len(expected) > 10 and "transformers.models.mixtral.modeling_mixtral.MixtralExperts" in expected
    # Every one of them is registered (a few, gpt-oss's among them, to a replacement of their own).
    assert expected <= set(registered["registered"]), expected - set(registered["registered"])


def test_the_narrowed_scan_leaves_every_other_rglob_alone(tmp_path):
    models = tmp_path / "transformers" / "models"
    (models / "a").mkdir(parents=True)
    (models / "a" / "modeling_a.py").write_text("class A: pass\n")
    (models / "a" / "modeling_b.py").write_text(f"@{quark_import.DECORATOR}\nclass B: pass\n")
    (models / "a" / "other.py").write_text("")
    with quark_import.narrowed_expert_scan():
        assert [path.name for path in models.rglob("modeling_*.py")] == ["modeling_b.py"]
        assert len(list(models.rglob("*.py"))) == 3 and len(list(tmp_path.rglob("modeling_*.py"))) == 2
    assert len(list(models.rglob("modeling_*.py"))) == 2  # restored on exit
