"""`import quark.torch` without its scan of every transformers modeling file: half of the import's time.

Quark's `quark_experts` module, while it is imported, ast-parses all of transformers' `models/**/modeling_*.py`
(507 files in transformers 5.19; 15 s of the 30 s `import quark.torch` took on an AVX2-only EPYC) to register the
classes decorated with `@use_experts_implementation` (fused MoE experts) for unfusing. A file whose text lacks that
name cannot hold such a class, so while that one module runs, its scan is handed only the files that have it: the
same registry (tests/test_quark_import.py checks it against a text search of every file). Every process that
imports `quantize_pipeline` and then Quark (each stage runs in a child process) is spared the 15 s.
"""

from __future__ import annotations

import importlib.abc
import pathlib
import sys
from contextlib import contextmanager

SCANNING_MODULE = "quark.torch.utils.llm.module_replacement.quark_experts"
DECORATOR = "use_experts_implementation"


def _is_transformers_models_scan(folder: pathlib.Path, pattern: str) -> bool:
    return pattern == "modeling_*.py" and folder.name == "models" and folder.parent.name == "transformers"


@contextmanager
def narrowed_expert_scan():
    """While it is open, `Path.rglob("modeling_*.py")` on transformers/models yields only the files naming DECORATOR."""
    original = pathlib.Path.rglob

    def rglob(self, pattern, *args, **kwargs):
        found = original(self, pattern, *args, **kwargs)
        if not _is_transformers_models_scan(self, pattern):
            return found
        return (path for path in found if DECORATOR in path.read_text(encoding="utf-8"))

    pathlib.Path.rglob = rglob
    try:
        yield
    finally:
        pathlib.Path.rglob = original


class _NarrowedLoader(importlib.abc.Loader):
    """The module's own loader, its body run inside narrowed_expert_scan."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        with narrowed_expert_scan():
            self.loader.exec_module(module)

    def __getattr__(self, name):  # get_source, get_code, ...: the real loader's
        return getattr(self.loader, name)


class _ScanFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != SCANNING_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                spec.loader = _NarrowedLoader(spec.loader)
                return spec
        return None


def install() -> None:
    """Put the finder first on sys.meta_path (once); it acts on SCANNING_MODULE alone."""
    if not any(isinstance(finder, _ScanFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ScanFinder())
