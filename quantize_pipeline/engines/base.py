"""What every engine offers, as lm-eval's `LM` is for its backends: stages call these and never ask
which engine they hold."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from quantize_pipeline.engines.support import Serves


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: int  # generated token ids (the stop token included when one ended the completion)


class Engine(Protocol):
    name: str  # registry name: "vllm" or "transformers"
    serves: Serves | None  # what it declares it serves, per build (None: baseline columns only)
    import_s: float  # importing the engine's libraries (not part of load_s)
    load_s: float  # building the loaded model: weights, compilation, KV cache (no imports)
    tokenizer: Any  # the model's HF tokenizer

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[Generation]:
        """Greedy completions, one per prompt, in one batch."""

    def lm_eval_model(self) -> Any:
        """An lm-eval `LM` over this loaded model, for simple_evaluate."""

    def top_logprobs(self, token_ids: list[list[int]], k: int) -> tuple[np.ndarray, np.ndarray]:
        """[positions, k] ids and log-probs of each next token's k most likely values, positions 1..n-1 of each text."""

    def completion_perplexities(self, pairs: list[list[str]]) -> list[float]:
        """Perplexity of each [prompt, completion]'s completion given its prompt."""

    def device_memory_used_mb(self) -> float | None:
        """Accelerator memory in use now (None on CPU)."""
