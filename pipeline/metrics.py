"""Fidelity statistics for the quantization gate: is the quantized model still the same model?

A bare accuracy ratio cannot tell a real regression from question-sampling
noise, and cannot see a model that scores fine on multiple choice yet
generates garbage. So this module gives the gate:

- paired accuracy comparison (bootstrap interval for the drop, McNemar's exact test),
- token-level divergence of next-token distributions (KL, top-1 agreement),
- cheap garbage detectors for free-form completions (repetition loops,
  non-printable characters, perplexity under the base model).

Pure Python + numpy only (no torch, scipy or lm_eval) so it stays fast to
import and to test.
"""

from __future__ import annotations

import math
import unicodedata
from collections.abc import Sequence

import numpy as np

Outcome = bool | int | float  # one question's result: correct (1/True) or not (0/False)

# Rows of a log-probability matrix must sum (as probabilities) to 1 within this:
# loose enough for float16/bfloat16-derived log-probs, tight enough to reject
# raw logits or top-k truncated distributions, which would give a wrong KL.
NORMALIZATION_TOLERANCE = 1e-2

# Rows per block in token_divergence: bounds the float64 temporaries to about
# this many rows x vocab (e.g. 256 x 152k x 8 bytes ~ 300 MB at most per array).
_KL_BLOCK_ROWS = 256


# --- paired accuracy -------------------------------------------------------


def _outcomes(values: Sequence[Outcome], name: str) -> np.ndarray:
    """Validate per-question outcomes as a 1-D float array of 0s and 1s."""
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of per-question outcomes, got shape {array.shape}")
    # McNemar and the discordant-pair counts are only defined for right/wrong outcomes.
    if not np.all((array == 0.0) | (array == 1.0)):
        raise ValueError(f"{name} must contain only 0/1 (or False/True) outcomes")
    return array


def mcnemar_exact_p_value(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts b and c.

    Under "no difference" each discordant question is equally likely to go either
    way, so min(b, c) ~ Binomial(b + c, 0.5). Exact (math.comb, integer
    arithmetic) because gate runs often have few discordant pairs, where the
    chi-squared approximation is poor.
    """
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    # Python int / int true division is exact-then-rounded, even for huge 2**n.
    return min(1.0, 2 * tail / 2**n)


def paired_accuracy_comparison(
    base_correct: Sequence[Outcome],
    quantized_correct: Sequence[Outcome],
    *,
    confidence: float = 0.95,
    bootstrap_samples: int = 2000,
    seed: int = 0,
) -> dict:
    """Compare base and quantized accuracy on the same questions, with paired statistics.

    Pairing matters: both models see the same questions, so the noise of which
    questions were drawn cancels out, and the interval on the drop is much
    tighter than one built from two independent accuracies.

    Returns base_accuracy, quantized_accuracy, recovery (quantized / base, None
    when base is 0), accuracy_drop (base - quantized), drop_ci_low/drop_ci_high
    (percentile bootstrap interval of the drop at `confidence`), b (base right,
    quantized wrong), c (base wrong, quantized right), n (b + c),
    mcnemar_p_value, questions, confidence, bootstrap_samples.
    """
    base = _outcomes(base_correct, "base_correct")
    quantized = _outcomes(quantized_correct, "quantized_correct")
    if len(base) != len(quantized):
        raise ValueError(
            f"base and quantized results cover different question counts ({len(base)} vs {len(quantized)})"
        )
    if len(base) == 0:
        raise ValueError("no questions to compare")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if bootstrap_samples < 1:
        raise ValueError(f"bootstrap_samples must be >= 1, got {bootstrap_samples}")

    questions = len(base)
    b = int(np.sum((base == 1.0) & (quantized == 0.0)))
    c = int(np.sum((base == 0.0) & (quantized == 1.0)))
    base_accuracy = float(base.mean())
    quantized_accuracy = float(quantized.mean())
    drop_ci_low, drop_ci_high = _bootstrap_drop_interval(questions, b, c, confidence, bootstrap_samples, seed)
    return {
        "questions": questions,
        "base_accuracy": base_accuracy,
        "quantized_accuracy": quantized_accuracy,
        "recovery": quantized_accuracy / base_accuracy if base_accuracy > 0 else None,
        "accuracy_drop": base_accuracy - quantized_accuracy,
        "drop_ci_low": drop_ci_low,
        "drop_ci_high": drop_ci_high,
        "confidence": confidence,
        "bootstrap_samples": bootstrap_samples,
        "b": b,
        "c": c,
        "n": b + c,
        "mcnemar_p_value": mcnemar_exact_p_value(b, c),
    }


def _bootstrap_drop_interval(
    questions: int, b: int, c: int, confidence: float, samples: int, seed: int
) -> tuple[float, float]:
    """Percentile bootstrap interval of the accuracy drop, resampling question indices.

    Each question contributes +1 (base right, quantized wrong), -1 (the reverse)
    or 0 to the drop, so resampling `questions` indices with replacement is
    exactly a multinomial draw of how many of each kind land in the resample.
    Drawing those counts gives the same distribution as materialising the
    samples x questions index matrix, in O(samples) memory instead.
    """
    rng = np.random.default_rng(seed)
    shares = np.array([b, c, questions - b - c], dtype=float) / questions
    counts = rng.multinomial(questions, shares, size=samples)
    drops = (counts[:, 0] - counts[:, 1]) / questions
    alpha = 1.0 - confidence
    low, high = np.quantile(drops, [alpha / 2, 1.0 - alpha / 2])
    return float(low), float(high)


# --- next-token distributions ----------------------------------------------


def _logprob_matrix(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty [tokens, vocab] array, got shape {array.shape}")
    return array


def _check_normalized(block: np.ndarray, name: str, first_row: int) -> None:
    """Reject NaN/+inf and rows that are not full distributions (logits, top-k cuts)."""
    if np.isnan(block).any() or np.isposinf(block).any():
        raise ValueError(f"{name} contains NaN or +inf")
    peak = block.max(axis=1, keepdims=True)
    if np.isneginf(peak).any():
        row = first_row + int(np.flatnonzero(np.isneginf(peak[:, 0]))[0])
        raise ValueError(f"{name} row {row} has no probability mass (all -inf)")
    # Stable log-sum-exp: shift by the row max before exponentiating.
    log_total = peak[:, 0] + np.log(np.exp(block - peak).sum(axis=1))
    bad = np.abs(np.expm1(log_total)) > NORMALIZATION_TOLERANCE
    if bad.any():
        row = first_row + int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{name} row {row} sums to probability {math.exp(log_total[row - first_row]):.6g}, not 1: "
            "pass natural-log probabilities of the full vocabulary (not logits, not top-k)"
        )


def _percentile(values: np.ndarray, q: float) -> float:
    # Interpolating between two infinite KLs gives inf - inf = NaN; inputs hold no NaN.
    with np.errstate(invalid="ignore"):
        result = float(np.percentile(values, q))
    return math.inf if math.isnan(result) else result


def token_divergence(base_logprobs, quantized_logprobs) -> dict:
    """KL(base || quantized) and top-1 agreement of next-token distributions, per position.

    Inputs are [tokens, vocab] arrays of natural-log probabilities over the FULL
    vocabulary at the same positions (same prompt, same prefix). Top-k truncated
    or unnormalized inputs (logits) are rejected rather than silently mis-scored.
    KL is the direct measure of how much quantization moved the model; it catches
    damage that a multiple-choice accuracy averages away.

    Numerics: computed in float64 from the log-probs (no log of exp). A token
    with base probability 0 (-inf) contributes 0; a token the base model gives
    mass but the quantized model gives none yields an infinite KL, as it should.
    Argmax ties resolve to the lowest token id for both models.

    Returns tokens, mean_kl, p90_kl, p99_kl, max_kl, top1_agreement.
    """
    base = _logprob_matrix(base_logprobs, "base_logprobs")
    quantized = _logprob_matrix(quantized_logprobs, "quantized_logprobs")
    if base.shape != quantized.shape:
        raise ValueError(f"shape mismatch: base {base.shape} vs quantized {quantized.shape}")

    tokens = base.shape[0]
    per_token_kl = np.empty(tokens)
    agree = np.empty(tokens, dtype=bool)
    # Blocks of rows bound the float64 temporaries for large vocabularies.
    for start in range(0, tokens, _KL_BLOCK_ROWS):
        stop = min(start + _KL_BLOCK_ROWS, tokens)
        log_p = np.asarray(base[start:stop], dtype=np.float64)
        log_q = np.asarray(quantized[start:stop], dtype=np.float64)
        _check_normalized(log_p, "base_logprobs", start)
        _check_normalized(log_q, "quantized_logprobs", start)
        p = np.exp(log_p)
        with np.errstate(invalid="ignore"):  # -inf - -inf = NaN where p == 0; masked out below
            terms = np.where(p > 0.0, p * (log_p - log_q), 0.0)
        per_token_kl[start:stop] = terms.sum(axis=1)
        agree[start:stop] = log_p.argmax(axis=1) == log_q.argmax(axis=1)

    # Tiny negative values are rounding noise: KL is non-negative by definition.
    per_token_kl = np.maximum(per_token_kl, 0.0)
    return {
        "tokens": tokens,
        "mean_kl": float(per_token_kl.mean()),
        "p90_kl": _percentile(per_token_kl, 90),
        "p99_kl": _percentile(per_token_kl, 99),
        "max_kl": float(per_token_kl.max()),
        "top1_agreement": float(agree.mean()),
    }


# --- garbage detectors for free-form completions ---------------------------


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of the word n-grams in `text` that repeat an earlier n-gram of the same text.

    A quantized model that has lost its way often falls into a loop ("the the
    the ...", a phrase over and over); this is near 0 for ordinary prose and
    approaches 1 for a loop. 0.0 for texts with fewer than n words.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    words = text.split()
    if len(words) < n:
        return 0.0
    seen: set[tuple[str, ...]] = set()
    repeats = 0
    total = len(words) - n + 1
    for i in range(total):
        gram = tuple(words[i : i + n])
        if gram in seen:
            repeats += 1
        else:
            seen.add(gram)
    return repeats / total


# Control characters that ordinary text does contain.
_ALLOWED_CONTROLS = frozenset("\n\t\r")
# Control, surrogate, private-use, unassigned: none belong in model output.
_NON_PRINTABLE_CATEGORIES = frozenset({"Cc", "Cs", "Co", "Cn"})


def _is_non_printable(char: str) -> bool:
    if char == "\ufffd":  # replacement char: the tokenizer decoded invalid UTF-8 (broken byte tokens)
        return True
    return char not in _ALLOWED_CONTROLS and unicodedata.category(char) in _NON_PRINTABLE_CATEGORIES


def non_printable_share(text: str) -> float:
    """Share of characters that are U+FFFD or control/surrogate/private-use/unassigned (\\n \\t \\r allowed).

    A damaged model emitting byte-level tokens in an invalid order decodes to
    replacement characters and control bytes; ordinary text has none. 0.0 for
    empty text.
    """
    if not text:
        return 0.0
    return sum(1 for char in text if _is_non_printable(char)) / len(text)


def garbage_verdict(
    completions: list[str],
    *,
    base_perplexity_of_completions: list[float] | None = None,
    max_repetition_rate: float = 0.5,
    max_non_printable_share: float = 0.01,
    max_completion_perplexity: float | None = None,
    repetition_ngram: int = 3,
) -> dict:
    """Is any completion garbage? Checks each sample; one bad sample makes the verdict garbage.

    Checks: empty (or whitespace-only) output, word n-gram repetition rate,
    non-printable share, and, when both `base_perplexity_of_completions` (the
    base model's perplexity of each quantized completion) and
    `max_completion_perplexity` are given, that perplexity. The perplexity check
    catches word salad that neither loops nor contains odd characters. Fails
    closed: no completions, or a non-finite perplexity, counts as garbage.

    Returns {"garbage": bool, "reasons": [str, ...], "worst_sample": {index, text,
    repetition_rate, non_printable_share, perplexity} or None when there are no
    completions}. The worst sample is the one failing the most checks (then the
    most repetitive, then the most non-printable), reported even when all pass.
    """
    perplexities = base_perplexity_of_completions
    if perplexities is not None and len(perplexities) != len(completions):
        raise ValueError(
            f"{len(perplexities)} perplexities for {len(completions)} completions: they must pair up"
        )
    if max_completion_perplexity is not None and perplexities is None:
        raise ValueError("max_completion_perplexity needs base_perplexity_of_completions")
    if not completions:
        return {"garbage": True, "reasons": ["no completions to judge"], "worst_sample": None}

    reasons: list[str] = []
    samples: list[tuple[tuple, dict]] = []
    for index, text in enumerate(completions):
        sample = {
            "index": index,
            "text": text,
            "repetition_rate": repetition_rate(text, repetition_ngram),
            "non_printable_share": non_printable_share(text),
            "perplexity": None if perplexities is None else float(perplexities[index]),
        }
        failures = _sample_failures(sample, max_repetition_rate, max_non_printable_share, max_completion_perplexity)
        reasons.extend(f"sample {index}: {failure}" for failure in failures)
        severity = (len(failures), sample["repetition_rate"], sample["non_printable_share"], -index)
        samples.append((severity, sample))
    worst = max(samples, key=lambda item: item[0])[1]
    return {"garbage": bool(reasons), "reasons": reasons, "worst_sample": worst}


def _sample_failures(
    sample: dict, max_repetition_rate: float, max_non_printable_share: float, max_perplexity: float | None
) -> list[str]:
    failures = []
    if not sample["text"].strip():
        failures.append("empty output")
    if sample["repetition_rate"] > max_repetition_rate:
        failures.append(f"repetition rate {sample['repetition_rate']:.3f} > {max_repetition_rate}")
    if sample["non_printable_share"] > max_non_printable_share:
        failures.append(f"non-printable share {sample['non_printable_share']:.3f} > {max_non_printable_share}")
    perplexity = sample["perplexity"]
    if max_perplexity is not None and perplexity is not None:
        if not math.isfinite(perplexity):
            failures.append(f"perplexity {perplexity} is not finite")
        elif perplexity > max_perplexity:
            failures.append(f"perplexity {perplexity:.3f} > {max_perplexity}")
    return failures


# --- perplexity ------------------------------------------------------------


def perplexity_from_loglikelihoods(loglikelihoods: Sequence[float], token_counts: Sequence[int]) -> float:
    """exp(-sum(loglikelihoods) / sum(token_counts)): perplexity per counted unit.

    Pools documents by total units rather than averaging per-document
    perplexities, so long documents weigh in proportion to their length. The
    unit is whatever `token_counts` counts (tokens, words, bytes). A -inf
    log-likelihood gives inf.
    """
    if len(loglikelihoods) != len(token_counts):
        raise ValueError(
            f"{len(loglikelihoods)} log-likelihoods for {len(token_counts)} token counts: they must pair up"
        )
    if len(loglikelihoods) == 0:
        raise ValueError("no log-likelihoods")
    if any(math.isnan(value) for value in loglikelihoods):
        raise ValueError("log-likelihoods contain NaN")
    if any(count < 0 for count in token_counts):
        raise ValueError("token counts must be non-negative")
    total_count = sum(token_counts)
    if total_count <= 0:
        raise ValueError("token counts sum to 0: perplexity is undefined")
    try:
        return math.exp(-math.fsum(loglikelihoods) / total_count)
    except OverflowError:
        return math.inf
