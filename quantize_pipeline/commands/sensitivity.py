"""Layer sensitivity: how much each linear layer's output changes under the recipe's scheme, and how
far keeping the most sensitive layers in the model's dtype brings the model back to the base.

One child, one Quark quantization of the whole model (the recipe's scheme, round to nearest: an
algorithm such as GPTQ changes the weights it is measured against), then one pass of calibration
tokens through Quark's fake-quantized model with a hook on every quantized linear layer: the layer's
quantized output against the same input through its float weights, per token t,

    relative output error = mean over tokens of ||y_quantized(t) - y_float(t)||^2 / ||y_float(t)||^2

Inputs are those the quantized model feeds the layer (upstream errors included), as at inference.
Per token, not pooled over tokens (sum ||dy||^2 / sum ||y||^2, kept in the rows as
`pooled_relative_output_error`): a few tokens (the first, an attention sink) carry activations
hundreds of times the others'; a per-tensor static scale represents them well and crushes every
other token to a few levels, and the pooled ratio, dominated by those few tokens, hides it. The
token KL the gate reads weighs every token alike. Measured on per-tensor INT8 (tiny model): keeping
the 32 top units of the pooled ranking left a mean KL of 0.231 (the fake-quantized model against the
base), of the per-token ranking 0.098.

Keep curve: the same fake-quantized model with the K most sensitive units (a layer and the shards
vLLM fuses with it) computing with their float weights instead, for K = 0, 1, 2, 4, ... until the
mean token KL and top-1 agreement against the base (every layer float) on calibration rows meet the
gate's thresholds, then bisecting to the smallest such K: `keep_estimate`, where auto-exclude starts
its real runs. A forward pass per K, against a whole quantize + serve + evaluate per trial.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from quantize_pipeline.quantize.calibrate import load_token_batches
from quantize_pipeline.quantize.quantize import quantize
from quantize_pipeline.recipe.layers import keep_units
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.run.rundir import atomic_write_json

SENSITIVITY_FILE = "sensitivity.json"
# Calibration batches run through the quantized model for the ranking (after Quark's own calibration).
MEASURE_BATCHES = 8
# Calibration batches the keep curve's KL is measured on: the base's log-probs are held for them
# (4 x 512 tokens x a 49k vocabulary in bf16: 200 MB on the tiny model).
CURVE_BATCHES = 4
METHOD = ("per linear layer: mean over tokens of ||y_quantized - y_float||^2 / ||y_float||^2 on the calibration "
          "tokens, one forward pass of Quark's fake-quantized model")


def measure(recipe: dict, model_dir: str, calibrate_dir: str, out_dir: str) -> dict:
    """Child-process job: the ranking and the keep curve, written to OUT_DIR/sensitivity.json and returned."""
    import torch
    import torch.nn.functional as F
    from quark.torch.quantization.nn.modules.quantize_linear import QuantLinear
    from transformers import AutoModelForCausalLM

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

    # name -> [sum ||dy||^2, sum ||y||^2, sum over tokens of ||dy||^2 / ||y||^2, tokens]
    errors: dict[str, list[float]] = {}
    float_layers: set[str] = set()  # layers computing with their float weights: kept in the model's dtype
    recording = True

    def hook(name: str):
        def record(module, args, output):
            reference = F.linear(args[0], module.weight, module.bias)
            if recording:
                token_error = (output.float() - reference.float()).pow(2).sum(-1).flatten()
                token_norm = reference.float().pow(2).sum(-1).flatten()
                totals = errors.setdefault(name, [0.0, 0.0, 0.0, 0])
                totals[0] += token_error.sum().item()
                totals[1] += token_norm.sum().item()
                totals[2] += torch.where(token_norm > 0, token_error / token_norm.clamp_min(1e-30), 0.0).sum().item()
                totals[3] += token_error.numel()
            return reference.to(output.dtype) if name in float_layers else None
        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in model.named_modules()
               if isinstance(module, QuantLinear)]
    started = time.perf_counter()
    with torch.no_grad():
        for ids in token_batches[:MEASURE_BATCHES]:
            model(torch.tensor([ids], dtype=torch.long))
    measure_s = time.perf_counter() - started
    ranking = sorted(({"layer": name, "relative_output_error": per_token / tokens if tokens else 0.0,
                       "pooled_relative_output_error": error / norm if norm else 0.0}
                      for name, (error, norm, per_token, tokens) in errors.items()),
                     key=lambda row: (-row["relative_output_error"], row["layer"]))

    recording = False
    started = time.perf_counter()
    curve, estimate = keep_curve(model, token_batches[:CURVE_BATCHES], keep_units([row["layer"] for row in ranking]),
                                 float_layers, parsed.gates.max_mean_kl, parsed.gates.min_top1_agreement)
    curve_s = time.perf_counter() - started
    for handle in handles:
        handle.remove()
    result = {
        "scheme": parsed.scheme.name, "measured_with": "round to nearest (the recipe's scheme, no algorithm)",
        "method": METHOD, "batches": min(MEASURE_BATCHES, len(token_batches)),
        "excluded_by_recipe": summary["excluded_layers"], "ranking": ranking,
        "keep_curve": curve, "keep_estimate": estimate,
        "keep_curve_batches": min(CURVE_BATCHES, len(token_batches)),
        "quantize_s": round(quantize_s, 2), "measure_s": round(measure_s, 2), "keep_curve_s": round(curve_s, 2),
    }
    atomic_write_json(Path(out_dir) / SENSITIVITY_FILE, result)
    return result


def keep_curve(model, token_batches: list[list[int]], units: list[list[str]], float_layers: set[str],
               max_mean_kl: float | None, min_top1_agreement: float | None) -> tuple[list[dict], int | None]:
    """([{keep, layers, mean_kl, top1_agreement, meets}], the fewest units whose keeping meets the thresholds
    or None). `float_layers` is the set the model's hooks read: its members compute with float weights."""
    import torch
    import torch.nn.functional as F

    if max_mean_kl is None and min_top1_agreement is None:
        return [], None  # nothing to meet: no estimate to make

    def log_probs(ids: list[int]):
        with torch.no_grad():
            return F.log_softmax(model(torch.tensor([ids], dtype=torch.long)).logits[0].float(), dim=-1)

    float_layers.clear()
    float_layers.update(name for unit in units for name in unit)  # every layer float: the base
    base = [log_probs(ids).to(torch.bfloat16) for ids in token_batches]
    points: dict[int, dict] = {}

    def point(k: int) -> dict:
        float_layers.clear()
        float_layers.update(name for unit in units[:k] for name in unit)
        kl_sum, agree, tokens = 0.0, 0, 0
        for ids, reference in zip(token_batches, base):
            quantized, reference = log_probs(ids), reference.float()
            kl_sum += (reference.exp() * (reference - quantized)).sum().item()
            agree += (reference.argmax(-1) == quantized.argmax(-1)).sum().item()
            tokens += len(ids)
        mean_kl, top1 = kl_sum / tokens, agree / tokens
        meets = ((max_mean_kl is None or mean_kl <= max_mean_kl)
                 and (min_top1_agreement is None or top1 >= min_top1_agreement))
        points[k] = {"keep": k, "layers": len(float_layers), "mean_kl": round(mean_kl, 5),
                     "top1_agreement": round(top1, 4), "meets": meets}
        return points[k]

    tried: dict[int, bool] = {}
    while (k := next_keep_count(tried, len(units))) is not None:
        tried[k] = point(k)["meets"]
    float_layers.clear()
    estimate = min((k for k, meets in tried.items() if meets), default=None)
    return sorted(points.values(), key=lambda row: row["keep"]), estimate


def next_keep_count(tried: dict[int, bool], layers: int, first_guess: int | None = None) -> int | None:
    """The next number of units to keep, given those tried (K -> passed): 0, then `first_guess` or 1,
    doubling until one passes, then bisecting down to the fewest; None when that is found or every
    unit was kept. The keep curve's search and auto-exclude's real trials (from the curve's estimate)."""
    passing = sorted(k for k, passed in tried.items() if passed)
    failing = sorted(k for k, passed in tried.items() if not passed)
    if not passing:
        last = max(tried) if tried else -1
        if last >= layers:
            return None
        if last < 0:
            return 0
        if first_guess is not None and first_guess > last:
            return min(layers, first_guess)
        return min(layers, max(1, last * 2))
    best = passing[0]
    below = max((k for k in failing if k < best), default=-1)
    if best - below <= 1:
        return None
    return (best + below + 1) // 2


def read(out_dir: Path) -> dict:
    return json.loads((out_dir / SENSITIVITY_FILE).read_text())
