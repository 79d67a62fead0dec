"""Token-level divergence of the export from the base model on held-out text.

Runs inside the evaluation children, on the engine that evaluates (vLLM's
prompt log-probabilities, or transformers' logits): the base child saves, per
token of the held-out text, its top-k next-token log-probabilities (cached with
the other baselines); the quantized child computes its own top-k on the same
token ids and compares (metrics.topk_token_kl). Neither model has to share
memory with the other, which a 70B pair could not.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from pipeline import corpora, engine, metrics
from pipeline.rundir import atomic_write_bytes

TOP_K = engine.MAX_LOGPROBS  # vLLM returns at most `max_logprobs` per position
# Per paragraph: enough context for real next-token predictions, cheap on CPU.
MAX_TOKENS_PER_TEXT = 256


def heldout_texts(text: str, limit: int | None) -> list[str]:
    texts = corpora.read_texts(corpora.resolve_text_source(text))
    return texts[:limit] if limit is not None else texts


def _top_logprobs_vllm(llm, token_ids: list[list[int]]):
    """[positions, k] ids and log-probs of each next token's k most likely values (prompt positions 1..n-1)."""
    import numpy as np
    from vllm import SamplingParams, TokensPrompt

    outputs = llm.generate(
        [TokensPrompt(prompt_token_ids=ids) for ids in token_ids],
        SamplingParams(max_tokens=1, prompt_logprobs=TOP_K, temperature=0.0), use_tqdm=False,
    )
    top_ids, top_logprobs = [], []
    for output in outputs:
        for entry in output.prompt_logprobs[1:]:  # position 0 has no prediction
            best = sorted(entry.items(), key=lambda item: -item[1].logprob)[:TOP_K]
            top_ids.append([token for token, _ in best])
            top_logprobs.append([value.logprob for _, value in best])
    return np.asarray(top_ids, dtype=np.int64), np.asarray(top_logprobs, dtype=np.float32)


def _top_logprobs_hf(model, token_ids: list[list[int]]):
    import numpy as np
    import torch

    top_ids, top_logprobs = [], []
    for ids in token_ids:
        with torch.no_grad():
            logits = model(torch.tensor([ids], device=model.device)).logits[0, :-1]
        top = torch.log_softmax(logits.float(), dim=-1).topk(TOP_K, dim=-1)
        top_ids.append(top.indices.cpu().numpy())
        top_logprobs.append(top.values.cpu().numpy())
    return np.concatenate(top_ids).astype(np.int64), np.concatenate(top_logprobs).astype(np.float32)


def top_logprobs(lm, token_ids: list[list[int]], engine_name: str):
    """Top-k next-token log-probs of an lm-eval model object (its vLLM LLM or its HF model)."""
    if engine_name == "transformers":
        return _top_logprobs_hf(lm.model, token_ids)
    return _top_logprobs_vllm(lm.model, token_ids)


def write_reference(lm, tokenizer, texts: list[str], max_model_len: int, engine_name: str, path: str) -> dict:
    """Base side: tokenize the held-out texts, save their token ids and the base's top-k (atomically)."""
    import numpy as np
    from safetensors.numpy import save

    started = time.perf_counter()
    max_tokens = min(MAX_TOKENS_PER_TEXT, max_model_len)
    token_ids = [ids for ids in (tokenizer(text, truncation=True, max_length=max_tokens)["input_ids"] for text in texts)
                 if len(ids) >= 2]
    top_ids, top_values = top_logprobs(lm, token_ids, engine_name)
    atomic_write_bytes(Path(path), save({
        "input_ids": np.concatenate([np.asarray(ids, dtype=np.int64) for ids in token_ids]),
        "lengths": np.asarray([len(ids) for ids in token_ids], dtype=np.int64),
        "top_ids": top_ids, "top_logprobs": top_values,
    }))
    return {"texts": len(token_ids), "tokens": int(top_ids.shape[0]), "seconds": round(time.perf_counter() - started, 2)}


def compare_with_reference(lm, path: str, engine_name: str) -> dict:
    """Quantized side: top-k on the reference's token ids; KL and top-1 agreement vs the base."""
    import numpy as np
    from safetensors.numpy import load_file

    started = time.perf_counter()
    reference = load_file(path)
    ends = reference["lengths"].cumsum()
    token_ids = [reference["input_ids"][end - length:end].tolist() for end, length in zip(ends, reference["lengths"])]
    top_ids, top_values = top_logprobs(lm, token_ids, engine_name)
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
    summary.update(top_k=TOP_K, texts=len(token_ids), seconds=round(time.perf_counter() - started, 2))
    # JSON has no infinity: a missing figure fails its gate rule closed.
    summary = {key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in summary.items()}
    # Per token, per text (positions per text = its length - 1): what bench/gate_metrics.py resamples.
    summary["per_token"] = {
        "kl": [round(float(value), 6) if math.isfinite(value) else None for value in per_token_kl],
        "top1_agree": agree.astype(int).tolist(),
        "positions_per_text": [int(length) - 1 for length in reference["lengths"]],
    }
    return summary
