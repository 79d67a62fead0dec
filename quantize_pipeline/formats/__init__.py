"""Checkpoint formats, one adapter per `quantization_config.quant_method`.

Each adapter reads its format's config into the scheme the recipe language uses
(`schemes.SchemeSpec`, plus the KV-cache setting and the ignore list), and says which
tensors a quantized linear layer stores in that format (`LayerTensors`). `verify` checks
every export through the adapter its config names; `check` infers the recipe from it.
An explicit registry: an unknown quant_method is a one-line error naming it.
"""

from __future__ import annotations

import difflib

from quantize_pipeline.formats import awq, compressed_tensors, fp8, gptq, quark
from quantize_pipeline.formats.base import Claim, FormatAdapter, FormatError, LayerTensors

__all__ = ["Claim", "FormatAdapter", "FormatError", "LayerTensors", "ADAPTERS", "adapter_for", "claim"]


def _registry() -> dict[str, FormatAdapter]:
    adapters: dict[str, FormatAdapter] = {}
    for adapter in (quark.ADAPTER, compressed_tensors.ADAPTER, gptq.ADAPTER, awq.ADAPTER, *fp8.ADAPTERS):
        if adapter.quant_method in adapters:
            raise RuntimeError(f"two format adapters for quant_method {adapter.quant_method!r}")
        adapters[adapter.quant_method] = adapter
    return adapters


ADAPTERS: dict[str, FormatAdapter] = _registry()


def adapter_for(quantization_config: dict) -> FormatAdapter:
    """The adapter of the format a quantization_config names; FormatError when none."""
    method = quantization_config.get("quant_method")
    if method in ADAPTERS:
        return ADAPTERS[method]
    close = difflib.get_close_matches(str(method), ADAPTERS, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise FormatError("quant_method", f"unknown format {method!r} ({hint}known: {', '.join(ADAPTERS)})")


def claim(quantization_config: dict) -> Claim:
    """What a checkpoint's quantization_config says it is."""
    return adapter_for(quantization_config).claim(quantization_config)
