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
    (percentile bootstrap interval of the drop at `confidence`), recovery_ci_low/
    recovery_ci_high (the same for the recovery, from the same resamples), both_right, b (base right,
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
    questions = len(base)
    b = int(np.sum((base == 1.0) & (quantized == 0.0)))
    c = int(np.sum((base == 0.0) & (quantized == 1.0)))
    both_right = int(np.sum((base == 1.0) & (quantized == 1.0)))
    return paired_comparison_from_counts(
        both_right, b, c, questions - both_right - b - c,
        confidence=confidence, bootstrap_samples=bootstrap_samples, seed=seed,
    )


def paired_comparison_from_counts(
    both_right: int, b: int, c: int, both_wrong: int, *,
    confidence: float = 0.95, bootstrap_samples: int = 2000, seed: int = 0,
) -> dict:
    """paired_accuracy_comparison from the four paired counts alone.

    The counts are sufficient statistics of paired right/wrong outcomes, so the gate can
    redo the intervals at its own (per-look) confidence from a report's counts without
    the per-question files. Adds recovery_ci_low/recovery_ci_high (None when the base
    got nothing right).
    """
    if min(both_right, b, c, both_wrong) < 0:
        raise ValueError(f"paired counts must be non-negative, got {(both_right, b, c, both_wrong)}")
    questions = both_right + b + c + both_wrong
    if questions == 0:
        raise ValueError("no questions to compare")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if bootstrap_samples < 1:
        raise ValueError(f"bootstrap_samples must be >= 1, got {bootstrap_samples}")
    base_accuracy = (both_right + b) / questions
    quantized_accuracy = (both_right + c) / questions
    intervals = _bootstrap_paired_intervals((both_right, b, c, both_wrong), confidence, bootstrap_samples, seed)
    return {
        "questions": questions,
        "base_accuracy": base_accuracy,
        "quantized_accuracy": quantized_accuracy,
        "recovery": quantized_accuracy / base_accuracy if base_accuracy > 0 else None,
        "accuracy_drop": base_accuracy - quantized_accuracy,
        **intervals,
        "confidence": confidence,
        "bootstrap_samples": bootstrap_samples,
        "both_right": both_right,
        "b": b,
        "c": c,
        "n": b + c,
        "mcnemar_p_value": mcnemar_exact_p_value(b, c),
    }


def _bootstrap_paired_intervals(counts: tuple[int, int, int, int], confidence: float, samples: int, seed: int) -> dict:
    """Percentile bootstrap intervals of the accuracy drop and of the recovery, resampling questions.

    A question is one of four kinds (both right, base only, quantized only, both wrong),
    so resampling `questions` indices with replacement is exactly a multinomial draw of
    how many of each kind land in the resample: the same distribution as materialising
    the samples x questions index matrix, in O(samples) memory instead.
    """
    questions = sum(counts)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(questions, np.array(counts, dtype=float) / questions, size=samples)
    both_right, base_only, quantized_only = draws[:, 0], draws[:, 1], draws[:, 2]
    drops = (base_only - quantized_only) / questions
    alpha = 1.0 - confidence
    quantiles = [alpha / 2, 1.0 - alpha / 2]
    drop_low, drop_high = np.quantile(drops, quantiles)
    recovery_low = recovery_high = None
    if counts[0] + counts[1] > 0:
        base_right = both_right + base_only
        # A resample in which the base got nothing right has no recovery: it counts as the worst case (0).
        with np.errstate(invalid="ignore", divide="ignore"):
            recoveries = np.where(base_right > 0, (both_right + quantized_only) / np.maximum(base_right, 1), 0.0)
        recovery_low, recovery_high = (float(value) for value in np.quantile(recoveries, quantiles))
    return {
        "drop_ci_low": float(drop_low), "drop_ci_high": float(drop_high),
        "recovery_ci_low": recovery_low, "recovery_ci_high": recovery_high,
    }


def cluster_ratio_interval(
    numerators, denominators, *, confidence: float = 0.95, resamples: int = 2000, seed: int = 0,
) -> tuple[float, float, float]:
    """(sum(numerators) / sum(denominators), percentile bootstrap interval) resampling whole clusters.

    One cluster per document or paragraph: the tokens of one paragraph are correlated
    (one hard passage moves all its tokens), so resampling tokens would claim far too
    narrow an interval. Used for mean KL (per-paragraph KL sums / tokens), top-1
    agreement (agreeing tokens / tokens) and the log word-perplexity ratio
    ((base loglik - quantized loglik) / words per document).
    """
    sums = np.asarray(numerators, dtype=np.float64)
    counts = np.asarray(denominators, dtype=np.float64)
    if sums.ndim != 1 or sums.shape != counts.shape or sums.size == 0:
        raise ValueError(f"need one numerator per denominator, got shapes {sums.shape} and {counts.shape}")
    if (counts < 0).any() or counts.sum() <= 0:
        raise ValueError("denominators must be non-negative with a positive total")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    clusters = sums.size
    rng = np.random.default_rng(seed)
    # How often each cluster lands in each resample: the same as drawing indices, in O(resamples x clusters).
    weights = rng.multinomial(clusters, np.full(clusters, 1.0 / clusters), size=resamples).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = (weights @ sums) / (weights @ counts)
    draws = draws[~np.isnan(draws)]  # a resample of only empty clusters has no ratio
    alpha = 1.0 - confidence
    low, high = np.quantile(draws, [alpha / 2, 1.0 - alpha / 2])
    return float(sums.sum() / counts.sum()), float(low), float(high)


def cluster_sums(per_item_values, items_per_cluster) -> tuple[np.ndarray, np.ndarray]:
    """(sum of the values, item count) per cluster, from a flat per-token array and the cluster lengths."""
    values = np.asarray(per_item_values, dtype=np.float64)
    lengths = np.asarray(items_per_cluster, dtype=np.int64)
    if lengths.sum() != values.size or (lengths < 0).any():
        raise ValueError(f"cluster lengths sum to {int(lengths.sum())}, not to the {values.size} values")
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    return np.array([values[start:stop].sum() for start, stop in zip(bounds, bounds[1:])]), lengths.astype(np.float64)


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

    return divergence_summary(per_token_kl, agree)


def rounded(value: float | None, digits: int = 4) -> float | None:
    """For report text, to `digits` significant digits (138.5, 0.03246): report.json keeps the full figures.
    None stays None."""
    return None if value is None else float(f"{float(value):.{digits}g}")


def divergence_summary(per_token_kl, top1_agree) -> dict:
    """The llama.cpp-style statistics of per-token KL values and top-1 agreement flags."""
    # Tiny negative values are rounding noise: KL is non-negative by definition.
    per_token_kl = np.maximum(np.asarray(per_token_kl, dtype=np.float64), 0.0)
    agree = np.asarray(top1_agree, dtype=bool)
    if per_token_kl.size == 0 or per_token_kl.shape != agree.shape:
        raise ValueError(f"need one agreement flag per token KL, got {per_token_kl.shape} and {agree.shape}")
    return {
        "tokens": int(per_token_kl.size),
        "mean_kl": float(per_token_kl.mean()),
        "median_kl": _percentile(per_token_kl, 50),
        "p90_kl": _percentile(per_token_kl, 90),
        "p99_kl": _percentile(per_token_kl, 99),
        "max_kl": float(per_token_kl.max()),
        "top1_agreement": float(agree.mean()),
    }


# Below this, a "rest of the vocabulary" mass is rounding noise of the top-k sum.
_REST_FLOOR = 1e-12


def topk_token_kl(base_top_ids, base_top_logprobs, quantized_top_ids, quantized_top_logprobs) -> np.ndarray:
    """Per-token lower bound of KL(base || quantized) from each model's top-k next tokens.

    Inputs: [tokens, k] token ids and natural-log probabilities of each model's k
    most likely next tokens at the same positions (what vLLM's prompt log-probs give).
    Two lower bounds, the larger is returned (KL is exact when k covers the vocabulary):
    - split the vocabulary into the tokens both lists hold (known in both models) and
      one bucket for the rest: KL of that coarser split (log-sum inequality);
    - term by term over the base's top k: a token missing from the quantized list has
      q <= the quantized k-th probability, so p log(p/q) >= p log(p/q_k); the remaining
      vocabulary by the log-sum inequality with the largest mass q can leave it.
    The second catches a model whose mass moved off the base's tokens altogether (word
    salad: no shared tokens, where the first bound says 0). Caching k values per token
    of the base instead of a full vocabulary is the point (llama.cpp stores full logits).
    """
    p_ids, q_ids = np.asarray(base_top_ids), np.asarray(quantized_top_ids)
    log_p = np.asarray(base_top_logprobs, dtype=np.float64)
    log_q = np.asarray(quantized_top_logprobs, dtype=np.float64)
    if log_p.ndim != 2 or log_p.size == 0 or not (p_ids.shape == log_p.shape and q_ids.shape == log_q.shape) \
            or log_p.shape[0] != log_q.shape[0]:
        raise ValueError(
            f"need non-empty [tokens, k] ids and log-probs with the same number of tokens, got "
            f"{p_ids.shape}, {log_p.shape}, {q_ids.shape}, {log_q.shape}"
        )
    for name, values in (("base", log_p), ("quantized", log_q)):
        if np.isnan(values).any() or np.isposinf(values).any() or (values > 1e-6).any():
            raise ValueError(f"{name} top-k values must be log-probabilities (<= 0, no NaN)")
        if (np.exp(values).sum(axis=1) > 1 + NORMALIZATION_TOLERANCE).any():
            raise ValueError(f"{name} top-k probabilities sum to more than 1: pass log-probabilities, not logits")
    per_token = np.empty(log_p.shape[0])
    for start in range(0, log_p.shape[0], _KL_BLOCK_ROWS):
        rows = slice(start, start + _KL_BLOCK_ROWS)
        # shared[i, a, b]: base's a-th token is quantized's b-th token (ids are unique per row)
        shared = p_ids[rows, :, None] == q_ids[rows, None, :]
        in_both = shared.any(axis=2)
        p_all = np.exp(log_p[rows])
        p = np.where(in_both, p_all, 0.0)
        log_q_matched = np.where(in_both, (shared * np.where(shared, log_q[rows, None, :], 0.0)).sum(axis=2), 0.0)
        q = np.where(in_both, np.exp(log_q_matched), 0.0)
        with np.errstate(invalid="ignore", divide="ignore"):
            shared_terms = np.where(p > 0.0, p * (np.where(in_both, log_p[rows], 0.0) - log_q_matched), 0.0)
            # Bound 1: shared tokens + one bucket for everything else.
            p_rest = np.clip(1.0 - p.sum(axis=1), _REST_FLOOR, 1.0)
            q_rest = np.clip(1.0 - q.sum(axis=1), _REST_FLOOR, 1.0)
            bucket = shared_terms.sum(axis=1) + p_rest * (np.log(p_rest) - np.log(q_rest))
            # Bound 2: every base top-k token; q of a missing one is at most the quantized k-th value.
            log_q_kth = log_q[rows].min(axis=1, keepdims=True)
            missing_terms = np.where(~in_both & (p_all > 0.0), p_all * (log_p[rows] - log_q_kth), 0.0)
            p_outside = np.clip(1.0 - p_all.sum(axis=1), _REST_FLOOR, 1.0)
            termwise = shared_terms.sum(axis=1) + missing_terms.sum(axis=1) + p_outside * (np.log(p_outside) - np.log(q_rest))
        per_token[rows] = np.maximum(bucket, termwise)
    return np.maximum(per_token, 0.0)


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
