"""Build compressed-tensors checkpoints of the tiny model with compressed-tensors' own API (for the tests).

No llm-compressor: the scheme is applied with `apply_quantization_config`, the weight
scales (and zero points) are computed per layer with `calculate_qparams` from the weight's
own min/max (round-to-nearest, what llm-compressor's default weight observer does), and
`ModelCompressor` compresses the modules and writes `quantization_config`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from filelock import FileLock

from quantize_pipeline.run.rundir import staged_folder

PRESETS = ("W8A8", "W4A16_G64")


def _weight_qparams(weight, args):
    """Scale and zero point of one weight from its min/max, shaped as the scheme stores them."""
    import torch
    from compressed_tensors.quantization import QuantizationStrategy
    from compressed_tensors.quantization.utils import calculate_qparams

    values = weight.detach().float()
    if args.strategy == QuantizationStrategy.CHANNEL:
        low, high = values.amin(dim=1, keepdim=True), values.amax(dim=1, keepdim=True)
    elif args.strategy == QuantizationStrategy.GROUP:
        grouped = values.unflatten(-1, (values.shape[-1] // args.group_size, args.group_size))
        low, high = grouped.amin(dim=-1), grouped.amax(dim=-1)
    elif args.strategy == QuantizationStrategy.TENSOR:
        low, high = torch.aminmax(values)
    else:
        raise ValueError(f"weight strategy {args.strategy} is not built here")
    return calculate_qparams(low, high, args)


def scheme_for(preset: str):
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationScheme,
        QuantizationStrategy,
        QuantizationType,
        preset_name_to_scheme,
    )

    if preset == "W8A8":  # int8 per-channel weights, int8 dynamic per-token activations
        return preset_name_to_scheme("W8A8", ["Linear"])
    if preset == "W4A16_G64":  # SmolLM2's hidden size 576 = 9 x 64, so groups of 64
        weights = QuantizationArgs(
            num_bits=4, type=QuantizationType.INT, strategy=QuantizationStrategy.GROUP, group_size=64, symmetric=True,
        )
        return QuantizationScheme(targets=["Linear"], weights=weights)
    raise ValueError(f"unknown preset {preset!r} (known: {', '.join(PRESETS)})")


def build(base_model_dir: Path, preset: str, output_dir: Path, ignore: tuple[str, ...] = ("lm_head",)) -> Path:
    """Quantize `base_model_dir` with `preset` and save it, compressed, at `output_dir` (atomically)."""
    import torch
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus, apply_quantization_config
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.bfloat16)
    config = QuantizationConfig(
        config_groups={"group_0": scheme_for(preset)}, ignore=list(ignore),
        quantization_status=QuantizationStatus.INITIALIZED,
    )
    apply_quantization_config(model, config)
    with torch.no_grad():
        for module in model.modules():
            scheme = getattr(module, "quantization_scheme", None)
            if scheme is None or scheme.weights is None:
                continue
            scale, zero_point = _weight_qparams(module.weight, scheme.weights)
            module.weight_scale.data.copy_(scale.reshape(module.weight_scale.shape))
            if hasattr(module, "weight_zero_point"):
                module.weight_zero_point.data.copy_(zero_point.reshape(module.weight_zero_point.shape))
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    with staged_folder(output_dir) as tmp:
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(tmp)
        compressor.update_config(str(tmp))
    return output_dir


def cached(base_model_dir: Path, cache_root: Path, preset: str, ignore: tuple[str, ...] = ("lm_head",)) -> Path:
    """The checkpoint for (base model, preset, ignore list, compressed-tensors version), built once."""
    import compressed_tensors

    key = json.dumps([str(base_model_dir), preset, list(ignore), compressed_tensors.__version__])
    folder = cache_root / "checkpoints" / f"ct-{preset}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not (folder / "config.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder.parent / f".{folder.name}.lock")):  # test workers that need it together build it once
            if not (folder / "config.json").is_file():
                build(base_model_dir, preset, folder, ignore)
    return folder
