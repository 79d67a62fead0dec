"""Token-level divergence of the export from the base model on held-out text.

Each model's child saves, per token of the held-out text, its top-k next-token
log-probabilities from its engine (the base's file is cached with the other
baselines); the parent compares the two files (metrics.topk_token_kl). Neither
model has to share memory with the other, which a 70B pair could not, and the
export's child need not wait for the base's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from quantize_pipeline.engines import settings as engine
from quantize_pipeline.errors import StageError
from quantize_pipeline.quantize import corpora
from quantize_pipeline.run.rundir import atomic_write_bytes
from quantize_pipeline.verdict import metrics

TOP_K = engine.MAX_LOGPROBS  # vLLM returns at most `max_logprobs` per position
# Per paragraph: enough context for real next-token predictions, cheap on CPU.
MAX_TOKENS_PER_TEXT = 256


def heldout_texts(text: str, limit: int | None) -> list[str]:
    texts = corpora.read_texts(corpora.resolve_text_source(text))
    return texts[:limit] if limit is not None else texts


def heldout_token_ids(tokenizer, texts: list[str], max_model_len: int) -> list[list[int]]:
    """Each held-out text's token ids (truncated; texts of under 2 tokens dropped: nothing to predict)."""
    max_tokens = min(MAX_TOKENS_PER_TEXT, max_model_len)
    return [ids for ids in (tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"] for text in texts)
            if len(ids) >= 2]


def write_top_logprobs(loaded, token_ids: list[list[int]], path: str) -> dict:
    """One model's side: save the token ids and this model's top-k next-token log-probs on them (atomically).
    The base's file is the cached reference; the export's is compared with it (`compare`)."""
    import numpy as np
    from safetensors.numpy import save

    started = time.perf_counter()
    top_ids, top_values = loaded.top_logprobs(token_ids, TOP_K)
    atomic_write_bytes(Path(path), save({
        "input_ids": np.concatenate([np.asarray(ids, dtype=np.int64) for ids in token_ids]),
        "lengths": np.asarray([len(ids) for ids in token_ids], dtype=np.int64),
        "top_ids": top_ids, "top_logprobs": top_values,
    }))
    return {"texts": len(token_ids), "tokens": int(top_ids.shape[0]), "seconds": round(time.perf_counter() - started, 2)}


def compare(reference_path: str, quantized_path: str) -> dict:
    """KL and top-1 agreement of the export's top-k (quantized_path) vs the base's (reference_path), both
    written by write_top_logprobs on the same token ids. Numpy only: runs where both files are."""
    import numpy as np
    from safetensors.numpy import load_file

    started = time.perf_counter()
    reference, quantized = load_file(reference_path), load_file(quantized_path)
    if not (np.array_equal(reference["input_ids"], quantized["input_ids"])
            and np.array_equal(reference["lengths"], quantized["lengths"])):
        raise StageError(f"{quantized_path}: token ids differ from the base reference {reference_path} "
                         "(different tokenizers?)", stage="evaluate")
    top_ids, top_values = quantized["top_ids"], quantized["top_logprobs"]
    # A broken export can give NaN log-probs: those tokens count as infinitely far from the base
    # (the gate then fails closed) instead of crashing the stage.
    broken = ~(np.isfinite(top_values) | np.isneginf(top_values)).all(axis=1)
    per_token_kl = np.full(len(top_ids), np.inf)
    if (~broken).any():
        per_token_kl[~broken] = metrics.topk_token_kl(
            reference["top_ids"][~broken], reference["top_logprobs"][~broken], top_ids[~broken], top_values[~broken],
        )
    agree = (reference["top_ids"][:, 0] == top_ids[:, 0]) & ~broken
    summary = metrics.divergence_summary(per_token_kl, agree)
    summary.update(top_k=TOP_K, texts=len(reference["lengths"]), seconds=round(time.perf_counter() - started, 2))
    # JSON has no infinity: a missing figure fails its gate rule closed.
    summary = {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in summary.items()}
    # Per token, per text (positions per text = its length - 1): what bench/gate_metrics.py resamples.
    summary["per_token"] = {
        "kl": [round(float(value), 6) if math.isfinite(value) else None for value in per_token_kl],
        "top1_agree": agree.astype(int).tolist(),
        "positions_per_text": [int(length) - 1 for length in reference["lengths"]],
    }
    return summary
