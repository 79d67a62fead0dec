"""freeze: Quark's `freeze` turns observed fake-quantizers into fixed scales."""

from __future__ import annotations

import json
from pathlib import Path


def freeze(quantizer, model, out_dir: Path):
    import torch

    with torch.no_grad():
        model = quantizer.freeze(model)
    frozen = sum(1 for module in model.modules() if type(module).__name__ == "FrozenFakeQuantize")
    summary = {"frozen_quantizers": frozen}
    (out_dir / "freeze.json").write_text(json.dumps(summary, indent=2) + "\n")
    return model, summary
