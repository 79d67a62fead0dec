"""What an engine declares it serves (its class's `serves`), and where each answer comes from.

An engine class names the builds it is (vLLM: CUDA, ROCm, CPU; transformers: one) and answers, per build,
for a named scheme, an explicit layout, a KV cache dtype and other tools' checkpoint formats. The one
question the rest of the pipeline asks, "can this engine serve this recipe", is `compat.can_serve`.
Data only: no torch, no vLLM import.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from quantize_pipeline.engines.names import Build
from quantize_pipeline.recipe.schemes import SchemeSpec

MEASURED = "measured here"
PER_VLLM_DOCS = "per vLLM docs"
PER_VLLM_SOURCE = "per vLLM source"
PER_QUARK_DOCS = "per Quark docs"
PER_CT_DOCS = "per compressed-tensors docs"


@dataclass(frozen=True)
class Support:
    supported: bool
    reason: str
    source: str  # MEASURED, or the docs or source the answer follows


def not_in_table(what: str, build: str) -> Support:
    """The answer for a pair nobody declared: refused, never guessed."""
    return Support(False, f"{what} on {build} is not in the compatibility table", PER_VLLM_DOCS)


class Serves(Protocol):
    """What an engine class declares it serves. None from a method: that engine says nothing of it."""

    builds: tuple[Build, ...]  # the compatibility table's columns this engine is
    expert_schemes: tuple[str, ...]  # named schemes whose MoE expert layers have an answer of their own
    listed_explicit: tuple[str, ...]  # explicit forms measured on some build: `schemes` lists them as rows
    kv_caches: tuple[str, ...]  # KV cache dtypes it answers for
    checkpoint_formats: tuple[tuple[str, str], ...]  # (quant_method, scheme) of other tools' checkpoints

    def named(self, scheme: str, build: Build, on_experts: bool) -> Support | None:
        """A named scheme on dense layers, or on MoE expert layers (on_experts)."""

    def explicit(self, spec: SchemeSpec, build: Build) -> Support:
        """An explicit layout (not a named scheme)."""

    def kv_cache(self, kv_cache: str, build: Build) -> Support | None:
        """A quantized KV cache."""

    def checkpoint_format(self, quant_method: str, scheme: str, build: Build) -> Support | None:
        """Another tool's checkpoint (`check` on it): served through that format's own loader."""
