"""Layer sensitivity: how much each linear layer's output changes under the recipe's scheme.

One child, one Quark quantization of the whole model (the recipe's scheme, round to nearest: an
algorithm such as GPTQ changes the weights it is measured against), then one pass of calibration
tokens through Quark's fake-quantized model with a hook on every quantized linear layer: the layer's
quantized output against the same input through its float weights,

    relative output error = sum ||y_quantized - y_float||^2 / sum ||y_float||^2

over every token. Inputs are those the quantized model feeds the layer (upstream errors included), as
at inference. One forward pass: ~the cost of a calibration, against one whole quantize + evaluate per
layer for "quantize one layer at a time" (210 runs on the tiny model). Whether the ranking predicts
what excluding a layer does to the gate is what `--auto-exclude` then measures with real runs.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.recipe import Recipe
from pipeline.rundir import atomic_write_json

SENSITIVITY_FILE = "sensitivity.json"
# Calibration batches run through the quantized model for the measurement (after Quark's own calibration).
MEASURE_BATCHES = 8


def measure(recipe: dict, model_dir: str, calibrate_dir: str, out_dir: str) -> dict:
    """Child-process job: the ranking, written to OUT_DIR/sensitivity.json and returned."""
    import torch
    import torch.nn.functional as F
    from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
    from transformers import AutoModelForCausalLM

    from pipeline.stages.calibrate import load_token_batches
    from pipeline.stages.quantize import quantize

    parsed = Recipe.model_validate(recipe)
    plain = Recipe.model_validate({**parsed.model_dump(mode="json"),
                                   "quantization": {**parsed.model_dump(mode="json")["quantization"], "algorithm": None}})
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, parsed.model.dtype),
                                                 trust_remote_code=parsed.model.trust_remote_code)
    model.eval()
    token_batches = load_token_batches(Path(calibrate_dir))
    scratch = Path(out_dir) / "quantize"
    scratch.mkdir(parents=True, exist_ok=True)
    model, _, summary = quantize(plain, model, token_batches, scratch)
    quantize_s = time.perf_counter() - started

    errors: dict[str, list[float]] = {}

    def hook(name: str):
        def record(module, args, output):
            reference = F.linear(args[0], module.weight, module.bias).float()
            difference = (output.float() - reference).pow(2).sum().item()
            totals = errors.setdefault(name, [0.0, 0.0])
            totals[0] += difference
            totals[1] += reference.pow(2).sum().item()
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()
               if isinstance(module, QuantLinear)]
    started = time.perf_counter()
    with torch.no_grad():
        for ids in token_batches[:MEASURE_BATCHES]:
            model(torch.tensor([ids], dtype=torch.long))
    for handle in handles:
        handle.remove()
    measure_s = time.perf_counter() - started
    ranking = sorted(({"layer": name, "relative_output_error": error / reference if reference else 0.0}
                      for name, (error, reference) in errors.items()),
                     key=lambda row: (-row["relative_output_error"], row["layer"]))
    result = {
        "scheme": parsed.scheme.name, "measured_with": "round to nearest (the recipe's scheme, no algorithm)",
        "method": "per linear layer: sum ||y_quantized - y_float||^2 / sum ||y_float||^2 over the calibration tokens, "
                  "one forward pass of Quark's fake-quantized model",
        "batches": min(MEASURE_BATCHES, len(token_batches)), "excluded_by_recipe": summary["excluded_layers"],
        "ranking": ranking, "quantize_s": round(quantize_s, 2), "measure_s": round(measure_s, 2),
    }
    atomic_write_json(Path(out_dir) / SENSITIVITY_FILE, result)
    return result


def read(out_dir: Path) -> dict:
    return json.loads((out_dir / SENSITIVITY_FILE).read_text())
