"""The vLLM engine: one vllm.LLM, built by lm-eval's VLLM model so that lm-eval evaluates on the same load."""

from __future__ import annotations

import math
import time

import numpy as np

from quantize_pipeline.engines import settings
from quantize_pipeline.engines.base import Generation
from quantize_pipeline.engines.lm_eval_vllm import vllm_lm_class
from quantize_pipeline.engines.memory import device_used_mb
from quantize_pipeline.engines.settings import EngineOptions
from quantize_pipeline.engines.vllm_serves import VLLM_SERVES


def let_quark_compute_in_float32() -> None:
    """vLLM 0.32 accepts Quark checkpoints in float16/bfloat16 only (QuarkConfig.get_supported_act_dtypes:
    the dtypes of its GPU kernels), and refuses float32 before loading. On CPUs without native bf16 the
    pipeline computes in float32 (quantize_pipeline.recipe.compute_dtype: bf16 is emulated there, 6x slower in vLLM).
    vLLM's CPU kernels for Quark's int8/int4 layers are the ones it runs compressed-tensors checkpoints
    with, and those it accepts in float32: so float32 is added to Quark's list, in this process only
    (the config check runs here, before the engine core starts). tests/test_schemes_end_to_end.py serves
    each scheme this way and checks its generations and accuracy."""
    import torch
    from vllm.model_executor.layers.quantization.quark.quark import QuarkConfig

    listed = QuarkConfig.get_supported_act_dtypes  # an instance method in vLLM 0.32
    if getattr(listed, "with_float32", False):
        return

    def with_float32(config) -> list:
        return [*listed(config), torch.float32]

    with_float32.with_float32 = True
    QuarkConfig.get_supported_act_dtypes = with_float32


def sleep_mode_available() -> bool:
    """Whether vLLM has its sleep mode on this platform (CUDA, ROCm, XPU in vLLM 0.32; not its CPU build)."""
    from vllm.platforms import current_platform

    return current_platform.is_sleep_mode_available()


class VllmEngine:
    name = "vllm"
    serves = VLLM_SERVES  # what each vLLM build serves (engines/vllm_serves.py)
    has_sleep_mode = True  # vLLM's, where the platform has it (engines.load)

    def __init__(self, model_dir: str, options: EngineOptions, sleep_mode: bool = False):
        started = time.perf_counter()

        lm_class = vllm_lm_class()  # imports vllm and lm-eval's backend
        if options.dtype == "float32" and options.device == "cpu":
            let_quark_compute_in_float32()
        self.sleep_mode = sleep_mode and sleep_mode_available()
        self.asleep = False
        self.import_s = time.perf_counter() - started
        started = time.perf_counter()
        # lm-eval's VLLM builds the vllm.LLM (as `.model`) from these arguments: one load serves both.
        self._lm = lm_class(**settings.lm_eval_vllm_args(model_dir, options, sleep_mode=self.sleep_mode))
        self.llm = self._lm.model
        self.load_s = time.perf_counter() - started
        self.tokenizer = self.llm.get_tokenizer()

    def sleep(self) -> None:
        """Level 1: the weights to host memory, the KV cache dropped; the accelerator's memory is free for another
        model's engine (evaluate.EngineChildren). wake_up() before the next request."""
        self.llm.sleep(level=1)
        self.asleep = True

    def wake_up(self) -> None:
        self.llm.wake_up()
        self.asleep = False

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[Generation]:
        from vllm import SamplingParams

        outputs = self.llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
        return [Generation(output.outputs[0].text, len(output.outputs[0].token_ids)) for output in outputs]

    def lm_eval_model(self):
        return self._lm

    def top_logprobs(self, token_ids: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
        from vllm import SamplingParams, TokensPrompt

        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=ids) for ids in token_ids],
            SamplingParams(max_tokens=1, prompt_logprobs=k, temperature=0.0), use_tqdm=False,
        )
        top_ids, top_logprobs = [], []
        for output in outputs:
            for entry in output.prompt_logprobs[1:]:  # position 0 has no prediction
                best = sorted(entry.items(), key=lambda item: -item[1].logprob)[:k]
                top_ids.append([token for token, _ in best])
                top_logprobs.append([value.logprob for _, value in best])
        return np.asarray(top_ids, dtype=np.int64), np.asarray(top_logprobs, dtype=np.float32)

    def completion_perplexities(self, pairs: list[list[str]]) -> list[float]:
        from vllm import SamplingParams

        outputs = self.llm.generate(
            [prompt + completion for prompt, completion in pairs],
            SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0), use_tqdm=False,
        )
        perplexities = []
        for (prompt, _), output in zip(pairs, outputs):
            start = len(self.tokenizer(prompt)["input_ids"])
            token_ids = output.prompt_token_ids
            logprobs = [
                entry[token_ids[position]].logprob
                for position, entry in enumerate(output.prompt_logprobs) if position >= start and entry
            ]
            perplexities.append(math.exp(-sum(logprobs) / len(logprobs)) if logprobs else float("inf"))
        return perplexities

    def device_memory_used_mb(self) -> float | None:
        # vLLM's engine core runs in another process: this process's torch counters see none of it,
        # so the device-wide figure (every process on the device) is what is measured.

        return device_used_mb()
