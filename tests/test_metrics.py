"""Fidelity statistics on hand-computed cases: paired accuracy, KL, garbage detectors, perplexity."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from quantize_pipeline.verdict.metrics import (
    garbage_verdict,
    mcnemar_exact_p_value,
    non_printable_share,
    paired_accuracy_comparison,
    perplexity_from_loglikelihoods,
    repetition_rate,
    token_divergence,
)

GARBAGE = "isrytyusa Tracebackussippi Tracebackussippi Tracebackussippi"


def _paired(b: int, c: int, both_right: int, both_wrong: int) -> tuple[list[int], list[int]]:
    """Per-question outcomes with the given discordant (b, c) and concordant counts."""
    base = [1] * b + [0] * c + [1] * both_right + [0] * both_wrong
    quantized = [0] * b + [1] * c + [1] * both_right + [0] * both_wrong
    return base, quantized


# --- paired accuracy -------------------------------------------------------


def test_paired_figures_by_hand():
    base, quantized = _paired(b=3, c=1, both_right=4, both_wrong=2)  # 10 questions
    result = paired_accuracy_comparison(base, quantized)
    assert result["questions"] == 10
    assert result["base_accuracy"] == pytest.approx(0.7)
    assert result["quantized_accuracy"] == pytest.approx(0.5)
    assert result["recovery"] == pytest.approx(0.5 / 0.7)
    assert result["accuracy_drop"] == pytest.approx(0.2)
    assert (result["b"], result["c"], result["n"]) == (3, 1, 4)
    # n=4, min(b,c)=1: 2 * (C(4,0) + C(4,1)) / 16 = 10/16.
    assert result["mcnemar_p_value"] == pytest.approx(0.625)
    assert result["drop_ci_low"] <= 0.2 <= result["drop_ci_high"]


def test_bools_and_floats_are_accepted_as_outcomes():
    as_bools = paired_accuracy_comparison([True, True, False], [True, False, False])
    as_floats = paired_accuracy_comparison([1.0, 1.0, 0.0], [1.0, 0.0, 0.0])
    assert as_bools == as_floats
    assert (as_bools["b"], as_bools["c"]) == (1, 0)


def test_mcnemar_all_discordant_one_way():
    result = paired_accuracy_comparison([1] * 10, [0] * 10)
    assert result["mcnemar_p_value"] == pytest.approx(2 * 0.5**10) == 0.001953125
    assert result["accuracy_drop"] == 1.0
    assert result["recovery"] == 0.0
    # Every resample is all-discordant the same way: the interval collapses onto 1.
    assert (result["drop_ci_low"], result["drop_ci_high"]) == (1.0, 1.0)


def test_mcnemar_balanced_and_no_discordance_give_p_one():
    assert paired_accuracy_comparison(*_paired(b=5, c=5, both_right=3, both_wrong=0))["mcnemar_p_value"] == 1.0
    identical = paired_accuracy_comparison([1, 0, 1, 1], [1, 0, 1, 1])
    assert identical["n"] == 0 and identical["mcnemar_p_value"] == 1.0
    assert (identical["drop_ci_low"], identical["drop_ci_high"]) == (0.0, 0.0)
    assert identical["recovery"] == 1.0


def test_mcnemar_is_symmetric_and_handles_large_counts():
    assert mcnemar_exact_p_value(7, 2) == mcnemar_exact_p_value(2, 7)
    # 2 * (1 + 9 + 36) / 512
    assert mcnemar_exact_p_value(7, 2) == pytest.approx(92 / 512)
    # Huge n must not overflow a float (2**3000): the p-value is just tiny.
    assert 0.0 <= mcnemar_exact_p_value(2000, 1000) < 1e-50
    with pytest.raises(ValueError):
        mcnemar_exact_p_value(-1, 2)


def test_recovery_is_none_when_base_never_right():
    result = paired_accuracy_comparison([0, 0, 0], [0, 1, 0])
    assert result["recovery"] is None
    assert result["accuracy_drop"] == pytest.approx(-1 / 3)


def test_bootstrap_interval_matches_normal_approximation():
    # 400 questions, b=40, c=20: drop 0.05. Per-question drop d in {+1, -1, 0}:
    # var(d) = E[d^2] - E[d]^2 = 60/400 - 0.05^2 = 0.1475; se = sqrt(0.1475/400) = 0.019203.
    base, quantized = _paired(b=40, c=20, both_right=200, both_wrong=140)
    result = paired_accuracy_comparison(base, quantized, bootstrap_samples=4000)
    se = math.sqrt(0.1475 / 400)
    assert result["accuracy_drop"] == pytest.approx(0.05)
    assert result["drop_ci_low"] == pytest.approx(0.05 - 1.96 * se, abs=0.006)
    assert result["drop_ci_high"] == pytest.approx(0.05 + 1.96 * se, abs=0.006)


def test_bootstrap_matches_explicit_index_resampling():
    # The implementation draws multinomial counts; it must agree with literally
    # resampling question indices with replacement.
    base, quantized = _paired(b=30, c=10, both_right=100, both_wrong=60)
    per_question = np.array(base, dtype=float) - np.array(quantized, dtype=float)
    indices = np.random.default_rng(123).integers(0, len(per_question), size=(5000, len(per_question)))
    explicit_low, explicit_high = np.quantile(per_question[indices].mean(axis=1), [0.025, 0.975])
    result = paired_accuracy_comparison(base, quantized, bootstrap_samples=5000)
    assert result["drop_ci_low"] == pytest.approx(explicit_low, abs=0.01)
    assert result["drop_ci_high"] == pytest.approx(explicit_high, abs=0.01)


def test_bootstrap_interval_contains_true_drop_of_simulated_population():
    # Base right with p=0.7; quantized flips 10% of base-right answers to wrong and
    # 2% of base-wrong answers to right: true drop = 0.7*0.10 - 0.3*0.02 = 0.064.
    rng = np.random.default_rng(7)
    base = rng.random(2000) < 0.7
    flip = np.where(base, rng.random(2000) < 0.10, rng.random(2000) < 0.02)
    quantized = base ^ flip
    result = paired_accuracy_comparison(base.tolist(), quantized.tolist())
    assert result["drop_ci_low"] <= 0.064 <= result["drop_ci_high"]
    assert result["drop_ci_low"] > 0  # and the drop is clearly real
    assert result["mcnemar_p_value"] < 1e-6


def test_bootstrap_is_deterministic_per_seed():
    base, quantized = _paired(b=37, c=21, both_right=500, both_wrong=442)
    first = paired_accuracy_comparison(base, quantized, seed=3)
    again = paired_accuracy_comparison(base, quantized, seed=3)
    assert first == again
    intervals = {
        (r["drop_ci_low"], r["drop_ci_high"])
        for r in (paired_accuracy_comparison(base, quantized, seed=seed) for seed in range(5))
    }
    assert len(intervals) > 1  # the seed actually drives the resampling


def test_bootstrap_interval_narrows_with_more_questions():
    small = paired_accuracy_comparison(*_paired(b=10, c=5, both_right=50, both_wrong=35))
    large = paired_accuracy_comparison(*_paired(b=160, c=80, both_right=800, both_wrong=560))  # 16x
    small_width = small["drop_ci_high"] - small["drop_ci_low"]
    large_width = large["drop_ci_high"] - large["drop_ci_low"]
    assert small["accuracy_drop"] == pytest.approx(large["accuracy_drop"])
    # Width scales as 1/sqrt(questions): 16x the questions, about a quarter of the width.
    assert large_width == pytest.approx(small_width / 4, rel=0.25)


def test_higher_confidence_gives_wider_interval():
    data = _paired(b=20, c=10, both_right=120, both_wrong=50)
    narrow = paired_accuracy_comparison(*data, confidence=0.80)
    wide = paired_accuracy_comparison(*data, confidence=0.99)
    assert wide["drop_ci_low"] < narrow["drop_ci_low"] and wide["drop_ci_high"] > narrow["drop_ci_high"]


@pytest.mark.parametrize(
    ("base", "quantized", "kwargs", "message"),
    [
        ([1, 0, 1], [1, 0], {}, "different question counts"),
        ([], [], {}, "no questions"),
        ([1, 0.5], [1, 0], {}, "0/1"),
        ([1, 2], [1, 0], {}, "0/1"),
        ([[1, 0]], [[1, 0]], {}, "flat sequence"),
        ([1, 0], [1, 0], {"confidence": 1.0}, "confidence"),
        ([1, 0], [1, 0], {"confidence": 0.0}, "confidence"),
        ([1, 0], [1, 0], {"bootstrap_samples": 0}, "bootstrap_samples"),
    ],
)
def test_paired_input_validation(base, quantized, kwargs, message):
    with pytest.raises(ValueError, match=message):
        paired_accuracy_comparison(base, quantized, **kwargs)


# --- token divergence ------------------------------------------------------

KL_HALF_VS_NINE_TENTHS = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.510826


def test_kl_hand_computed_value():
    assert KL_HALF_VS_NINE_TENTHS == pytest.approx(0.5108, abs=1e-4)
    result = token_divergence(np.log([[0.5, 0.5]]), np.log([[0.9, 0.1]]))
    assert result["tokens"] == 1
    assert result["mean_kl"] == pytest.approx(KL_HALF_VS_NINE_TENTHS)
    assert result["max_kl"] == pytest.approx(KL_HALF_VS_NINE_TENTHS)
    assert result["top1_agreement"] == 1.0  # ties resolve to token 0 for both


def test_kl_is_base_relative_not_symmetric():
    # KL([0.9, 0.1] || [0.5, 0.5]) = 0.9 ln 1.8 + 0.1 ln 0.2 = 0.368064, not 0.510826.
    reverse = token_divergence(np.log([[0.9, 0.1]]), np.log([[0.5, 0.5]]))
    assert reverse["mean_kl"] == pytest.approx(0.9 * math.log(1.8) + 0.1 * math.log(0.2))
    assert reverse["mean_kl"] == pytest.approx(0.368064, abs=1e-6)


def test_identical_distributions_have_zero_kl_and_full_agreement():
    logits = np.random.default_rng(0).normal(size=(300, 50))  # > one row block
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    result = token_divergence(logprobs, logprobs.copy())
    assert result["tokens"] == 300
    assert result["mean_kl"] == 0.0 and result["max_kl"] == 0.0 and result["p99_kl"] == 0.0
    assert result["top1_agreement"] == 1.0


def test_per_token_statistics_and_top1_disagreement():
    # Token 0: identical -> KL 0, agree. Token 1: [0.5,0.5] vs [0.9,0.1] -> 0.510826, agree.
    # Token 2: [0.2,0.8] vs [0.6,0.4] -> 0.2 ln(1/3) + 0.8 ln 2 = 0.334795, argmax 1 vs 0: disagree.
    base = np.log([[0.3, 0.7], [0.5, 0.5], [0.2, 0.8]])
    quantized = np.log([[0.3, 0.7], [0.9, 0.1], [0.6, 0.4]])
    kls = sorted([0.0, KL_HALF_VS_NINE_TENTHS, 0.2 * math.log(1 / 3) + 0.8 * math.log(2)])
    result = token_divergence(base, quantized)
    assert result["tokens"] == 3
    assert result["mean_kl"] == pytest.approx(sum(kls) / 3)
    assert result["max_kl"] == pytest.approx(KL_HALF_VS_NINE_TENTHS)
    # Linear interpolation on 3 sorted values: rank q/100 * 2 lies between the 2nd and 3rd.
    assert result["p90_kl"] == pytest.approx(kls[1] + 0.8 * (kls[2] - kls[1]))
    assert result["p99_kl"] == pytest.approx(kls[1] + 0.98 * (kls[2] - kls[1]))
    assert result["top1_agreement"] == pytest.approx(2 / 3)


def test_zero_probability_tokens_are_handled():
    # Base gives token 1 no mass: that term is 0, KL([1,0] || [0.5,0.5]) = ln 2.
    assert token_divergence([[0.0, -np.inf]], np.log([[0.5, 0.5]]))["mean_kl"] == pytest.approx(math.log(2))
    # Both give a token no mass: no NaN from -inf - -inf.
    both = token_divergence([[0.0, -np.inf]], [[0.0, -np.inf]])
    assert both["mean_kl"] == 0.0 and both["top1_agreement"] == 1.0
    # Quantized gives no mass where base has some: KL is infinite, percentiles too (not NaN).
    infinite = token_divergence(np.log([[0.5, 0.5]] * 3), [[0.0, -np.inf]] * 3)
    assert infinite["mean_kl"] == math.inf and infinite["max_kl"] == math.inf
    assert infinite["p90_kl"] == math.inf and infinite["p99_kl"] == math.inf


def test_extreme_log_probs_are_stable():
    # Probabilities near the float64 underflow limit must not produce NaN or negative KL.
    tiny = -700.0
    base = [[math.log1p(-math.exp(tiny)), tiny]]
    result = token_divergence(base, base)
    assert result["mean_kl"] == 0.0
    float32 = token_divergence(np.log(np.array([[0.5, 0.5]], dtype=np.float32)), np.log([[0.9, 0.1]]))
    assert float32["mean_kl"] == pytest.approx(KL_HALF_VS_NINE_TENTHS, rel=1e-6)


@pytest.mark.parametrize(
    ("base", "quantized", "message"),
    [
        ([[1.0, 2.0]], [[1.0, 2.0]], "not 1"),  # logits, not log-probs
        (np.log([[0.5, 0.3]]), np.log([[0.5, 0.5]]), "not 1"),  # top-k truncated
        (np.log([[0.5, 0.5]]), np.log([[0.5, 0.5], [0.5, 0.5]]), "shape mismatch"),
        ([0.0, -np.inf], [0.0, -np.inf], r"\[tokens, vocab\]"),  # 1-D
        (np.empty((0, 4)), np.empty((0, 4)), r"\[tokens, vocab\]"),
        ([[np.nan, 0.0]], [[0.0, -np.inf]], "NaN"),
        ([[-np.inf, -np.inf]], [[0.0, -np.inf]], "no probability mass"),
    ],
)
def test_token_divergence_input_validation(base, quantized, message):
    with pytest.raises(ValueError, match=message):
        token_divergence(base, quantized)


# --- repetition and non-printable characters ------------------------------


def test_repetition_rate_hand_computed():
    # Trigrams: abc bca cab abc bca cab abc -> 7, the last 4 repeat earlier ones.
    assert repetition_rate("a b c a b c a b c") == pytest.approx(4 / 7)
    assert repetition_rate("the the the the", n=1) == pytest.approx(3 / 4)
    assert repetition_rate("The cat sat on the mat.") == 0.0
    assert repetition_rate("too short") == 0.0
    assert repetition_rate("") == 0.0


def test_repetition_rate_of_real_world_garbage():
    # 4 words; the looping word shows at n=1 and n=2 but a 3-word loop is too short for trigrams.
    assert repetition_rate(GARBAGE, n=1) == pytest.approx(2 / 4)
    assert repetition_rate(GARBAGE, n=2) == pytest.approx(1 / 3)
    assert repetition_rate(GARBAGE, n=3) == 0.0
    # A longer run of the same loop is caught at the default n=3: 2 of 4 trigrams repeat.
    assert repetition_rate(GARBAGE + " Tracebackussippi Tracebackussippi") == pytest.approx(2 / 4)


def test_repetition_rate_rejects_bad_n():
    with pytest.raises(ValueError):
        repetition_rate("a b c", n=0)


@pytest.mark.parametrize(
    ("text", "share"),
    [
        ("", 0.0),
        ("Plain text.\nWith\ttabs\r\n", 0.0),
        ("é 中文 😀 \u200b", 0.0),  # non-ASCII and format chars are fine
        ("\ufffd\ufffdab", 0.5),  # replacement characters
        ("\x00abc", 0.25),  # NUL
        ("\x1b[31m", 0.2),  # ESC of an ANSI colour code
        ("\ue000a", 0.5),  # private use
        ("\u0378a", 0.5),  # unassigned
        ("\ud800a", 0.5),  # lone surrogate
        (GARBAGE, 0.0),  # garbage, but printable garbage
    ],
)
def test_non_printable_share(text, share):
    assert non_printable_share(text) == pytest.approx(share)


# --- garbage verdict -------------------------------------------------------


def test_clean_sentence_is_not_garbage():
    text = "The capital of France is Paris, which lies on the Seine."
    verdict = garbage_verdict([text])
    assert verdict["garbage"] is False and verdict["reasons"] == []
    assert verdict["worst_sample"] == {
        "index": 0, "text": text, "repetition_rate": 0.0, "non_printable_share": 0.0, "perplexity": None,
    }


def test_repetition_loop_is_garbage():
    loop = "the cat sat on the mat " * 5  # 28 trigrams, 6 distinct: 22/28 repeat
    verdict = garbage_verdict(["Paris is the capital of France.", loop])
    assert verdict["garbage"] is True
    assert verdict["reasons"] == ["sample 1: repetition rate 0.786 > 0.5"]
    assert verdict["worst_sample"]["index"] == 1
    assert verdict["worst_sample"]["repetition_rate"] == pytest.approx(22 / 28)


def test_empty_and_whitespace_outputs_are_garbage():
    verdict = garbage_verdict(["fine answer here", "", "  \n"])
    assert verdict["garbage"] is True
    assert verdict["reasons"] == ["sample 1: empty output", "sample 2: empty output"]
    assert verdict["worst_sample"]["index"] == 1  # ties go to the first


def test_replacement_characters_are_garbage():
    verdict = garbage_verdict(["ok text", "ab\ufffd\ufffd"])
    assert verdict["garbage"] is True
    assert verdict["reasons"] == ["sample 1: non-printable share 0.500 > 0.01"]
    assert verdict["worst_sample"]["non_printable_share"] == 0.5


def test_perplexity_check_catches_printable_word_salad():
    clean = "Paris is the capital of France."
    # Neither repetitive at n=3 nor non-printable: only the base model's perplexity flags it.
    assert garbage_verdict([clean, GARBAGE])["garbage"] is False
    verdict = garbage_verdict(
        [clean, GARBAGE], base_perplexity_of_completions=[8.0, 5400.0], max_completion_perplexity=100.0,
    )
    assert verdict["garbage"] is True
    assert verdict["reasons"] == ["sample 1: perplexity 5400.000 > 100.0"]
    assert verdict["worst_sample"]["index"] == 1 and verdict["worst_sample"]["perplexity"] == 5400.0


def test_perplexity_reported_without_threshold_and_non_finite_fails_closed():
    reported = garbage_verdict(["a fine answer"], base_perplexity_of_completions=[9.5])
    assert reported["garbage"] is False and reported["worst_sample"]["perplexity"] == 9.5
    nan = garbage_verdict(["a fine answer"], base_perplexity_of_completions=[math.nan], max_completion_perplexity=50)
    assert nan["garbage"] is True and nan["reasons"] == ["sample 0: perplexity nan is not finite"]


def test_worst_sample_is_the_one_failing_most_checks():
    loop = "go go go go go go"
    both = " ".join(["\ufffd\ufffd"] * 5)  # loops (2 of 3 trigrams repeat) and is non-printable
    verdict = garbage_verdict(["fine", loop, both])
    assert verdict["worst_sample"]["index"] == 2
    assert len(verdict["reasons"]) == 3


def test_no_completions_fails_closed():
    assert garbage_verdict([]) == {"garbage": True, "reasons": ["no completions to judge"], "worst_sample": None}


def test_garbage_verdict_input_validation():
    with pytest.raises(ValueError, match="pair up"):
        garbage_verdict(["a", "b"], base_perplexity_of_completions=[1.0])
    with pytest.raises(ValueError, match="needs base_perplexity"):
        garbage_verdict(["a"], max_completion_perplexity=10.0)


# --- perplexity ------------------------------------------------------------


def test_perplexity_hand_computed():
    # Pooled: exp(-(-2 - 4) / (2 + 4)) = e.
    assert perplexity_from_loglikelihoods([-2.0, -4.0], [2, 4]) == pytest.approx(math.e)
    # Uniform over 10 choices for each of 3 tokens: perplexity 10.
    assert perplexity_from_loglikelihoods([3 * math.log(0.1)], [3]) == pytest.approx(10.0)
    # Pooling is not the mean of per-document perplexities (e^1 and e^2 here).
    assert perplexity_from_loglikelihoods([-1.0, -6.0], [1, 3]) == pytest.approx(math.exp(7 / 4))


def test_perplexity_infinite_cases():
    assert perplexity_from_loglikelihoods([-math.inf, -1.0], [1, 1]) == math.inf
    assert perplexity_from_loglikelihoods([-1e6], [1]) == math.inf  # overflow, not an exception


@pytest.mark.parametrize(
    ("loglikelihoods", "counts", "message"),
    [
        ([-1.0], [1, 2], "pair up"),
        ([], [], "no log-likelihoods"),
        ([-1.0, -2.0], [0, 0], "sum to 0"),
        ([-1.0], [-1], "non-negative"),
        ([math.nan], [1], "NaN"),
    ],
)
def test_perplexity_input_validation(loglikelihoods, counts, message):
    with pytest.raises(ValueError, match=message):
        perplexity_from_loglikelihoods(loglikelihoods, counts)


def test_module_does_not_import_heavy_stack():
    code = (
        "import sys, quantize_pipeline.verdict.metrics; "
        "heavy = [m for m in ('torch', 'scipy', 'lm_eval') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- intervals the gate judges on ----------------------------------------------


def test_counts_alone_give_the_same_comparison_as_the_outcomes():
    from quantize_pipeline.verdict.metrics import paired_comparison_from_counts

    base, quantized = _paired(b=12, c=5, both_right=80, both_wrong=103)
    assert paired_comparison_from_counts(80, 12, 5, 103) == paired_accuracy_comparison(base, quantized)


def test_recovery_interval_holds_the_recovery_and_narrows_with_questions():
    small = paired_accuracy_comparison(*_paired(b=10, c=5, both_right=90, both_wrong=95))
    large = paired_accuracy_comparison(*_paired(b=100, c=50, both_right=900, both_wrong=950))
    for result in (small, large):
        assert result["recovery_ci_low"] < result["recovery"] < result["recovery_ci_high"]
    assert large["recovery"] == pytest.approx(small["recovery"])
    narrow = large["recovery_ci_high"] - large["recovery_ci_low"]
    wide = small["recovery_ci_high"] - small["recovery_ci_low"]
    assert narrow == pytest.approx(wide / math.sqrt(10), rel=0.2)  # 10x the questions: 1/sqrt(10) the width


def test_cluster_ratio_interval_resamples_clusters_not_items():
    from quantize_pipeline.verdict.metrics import cluster_ratio_interval, cluster_sums

    rng = np.random.default_rng(1)
    # 32 paragraphs of 100 tokens; each paragraph has its own level: tokens within one are correlated.
    levels = rng.exponential(0.03, 32)
    per_token = np.concatenate([rng.exponential(level, 100) for level in levels])
    sums, counts = cluster_sums(per_token, [100] * 32)
    figure, low, high = cluster_ratio_interval(sums, counts)
    assert figure == pytest.approx(per_token.mean())
    assert low < figure < high
    # Treating every token as independent would claim a narrower interval than the clusters support.
    _, token_low, token_high = cluster_ratio_interval(per_token, np.ones_like(per_token))
    assert (token_high - token_low) < 0.8 * (high - low)


def test_cluster_inputs_are_checked():
    from quantize_pipeline.verdict.metrics import cluster_ratio_interval, cluster_sums

    with pytest.raises(ValueError, match="cluster lengths"):
        cluster_sums([0.1, 0.2, 0.3], [1, 1])
    with pytest.raises(ValueError, match="one numerator per denominator"):
        cluster_ratio_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="positive total"):
        cluster_ratio_interval([1.0], [0.0])
