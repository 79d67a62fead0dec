"""freeze: Quark's `freeze` turns observed fake-quantizers into fixed scales."""

from __future__ import annotations

import json
from pathlib import Path


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
