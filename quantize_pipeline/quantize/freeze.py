"""freeze: Quark's `freeze` turns observed fake-quantizers into fixed scales."""

from __future__ import annotations

import json
from pathlib import Path

from quantize_pipeline.formats.quark_config import quark_layer_configs


def count_frozen(model) -> int:
    """Quark's frozen quantizers in `model` (FrozenScaledFakeQuantize in Quark 0.13; FrozenFakeQuantize before:
    counting by the old name alone reported 0 for every run since the upgrade)."""
    return sum(1 for module in model.modules()
               if type(module).__name__.startswith("Frozen") and type(module).__name__.endswith("FakeQuantize"))


def freeze(quantizer, model, out_dir: Path):
    import torch

    with torch.no_grad():
        model = quantizer.freeze(model)
    frozen = count_frozen(model)
    summary = {"frozen_quantizers": frozen}
    (out_dir / "freeze.json").write_text(json.dumps(summary, indent=2) + "\n")
    return model, summary


def weights_fake_quantized_on_freeze(quark_config) -> bool:
    """Whether `ModelQuantizer.freeze` must replace the weights by their fake-quantized values (its default) for the
    export to hold Quark's in-memory bytes. The exporter quantizes whatever weights freeze leaves; for symmetric
    weights, quantizing the originals gives the same bytes (compared for every named scheme, in bfloat16 and float32,
    on the tiny model), so the copy (0.6 s a 14B layer, issue #26) is skipped. Asymmetric weights differ (UINT4 per
    group with zero points: compared), so they keep it."""
    for _, layer in quark_layer_configs(quark_config):
        specs = layer.weight if isinstance(layer.weight, list) else [layer.weight]
        if any(spec is not None and spec.symmetric is False for spec in specs):
            return True
    return False
