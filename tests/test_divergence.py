"""Top-k token divergence (what the pipeline measures from vLLM's top-k log-probs), by hand
and against the full-vocabulary KL; the accuracy plot."""

from __future__ import annotations

import math

import numpy as np
import pytest

from quantize_pipeline.verdict import plot
from quantize_pipeline.verdict.metrics import divergence_summary, token_divergence, topk_token_kl
from quantize_pipeline.verdict.record import Report


def _normalized(rng, tokens: int, vocab: int, scale: float = 2.0) -> np.ndarray:
    logits = rng.normal(size=(tokens, vocab)) * scale
    return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))


def _top(logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.argsort(-logprobs, axis=1)[:, :k]
    return ids, np.take_along_axis(logprobs, ids, axis=1)


def test_topk_kl_by_hand():
    # Vocabulary of 4. Base top-2: tokens 0 (0.5), 1 (0.3); quantized top-2: tokens 1 (0.4), 2 (0.35).
    # Shared: token 1 only. Rest bucket: base 1 - 0.3 = 0.7, quantized 1 - 0.4 = 0.6.
    # KL = 0.3 ln(0.3/0.4) + 0.7 ln(0.7/0.6) = -0.086305 + 0.107906 = 0.021601
    kl = topk_token_kl([[0, 1]], np.log([[0.5, 0.3]]), [[1, 2]], np.log([[0.4, 0.35]]))
    assert kl[0] == pytest.approx(0.3 * math.log(0.3 / 0.4) + 0.7 * math.log(0.7 / 0.6))
    assert kl[0] == pytest.approx(0.021601, abs=1e-6)


def test_topk_kl_equals_full_kl_when_k_covers_the_vocabulary():
    rng = np.random.default_rng(1)
    base = _normalized(rng, 300, 40)  # > one row block
    quantized = base + rng.normal(size=base.shape) * 0.3
    quantized -= np.log(np.exp(quantized).sum(axis=1, keepdims=True))
    full = token_divergence(base, quantized)
    per_token = topk_token_kl(*_top(base, 40), *_top(quantized, 40))
    assert per_token.mean() == pytest.approx(full["mean_kl"], rel=1e-9)
    assert divergence_summary(per_token, _top(base, 1)[0][:, 0] == _top(quantized, 1)[0][:, 0])["top1_agreement"] == \
        pytest.approx(full["top1_agreement"])


@pytest.mark.parametrize("k", [1, 3, 10, 25])
def test_topk_kl_is_a_lower_bound_that_tightens_with_k(k):
    rng = np.random.default_rng(2)
    base = _normalized(rng, 50, 40)
    quantized = base + rng.normal(size=base.shape) * 0.5
    quantized -= np.log(np.exp(quantized).sum(axis=1, keepdims=True))
    exact = np.array([token_divergence(base[i:i + 1], quantized[i:i + 1])["mean_kl"] for i in range(50)])
    bound = topk_token_kl(*_top(base, k), *_top(quantized, k))
    assert (bound <= exact + 1e-9).all()
    if k > 1:
        assert bound.mean() >= topk_token_kl(*_top(base, k - 1), *_top(quantized, k - 1)).mean() - 1e-12


def test_topk_kl_sees_mass_moved_off_the_base_tokens():
    # Word salad: no token in common. Base top-2 {0: 0.6, 1: 0.3}; quantized top-2 {5: 0.5, 6: 0.3}:
    # q(0), q(1) <= 0.3, so KL >= 0.6 ln(0.6/0.3) + 0.3 ln(0.3/0.3) + 0.1 ln(0.1/1) = 0.185630
    kl = topk_token_kl([[0, 1]], np.log([[0.6, 0.3]]), [[5, 6]], np.log([[0.5, 0.3]]))
    assert kl[0] == pytest.approx(0.6 * math.log(2) + 0.1 * math.log(0.1))
    assert kl[0] == pytest.approx(0.185630, abs=1e-6)


def test_topk_kl_identical_is_zero_and_disjoint_lists_still_measure_the_shift():
    rng = np.random.default_rng(3)
    base = _normalized(rng, 5, 30)
    ids, values = _top(base, 8)
    assert topk_token_kl(ids, values, ids, values).max() == pytest.approx(0.0, abs=1e-12)
    # No shared token: everything is in the rest bucket for both, KL 0 from the bucket alone,
    # but top-1 disagreement still shows it: KL is only a lower bound, agreement is exact.
    kl = topk_token_kl([[0]], np.log([[0.9]]), [[1]], np.log([[0.9]]))
    assert kl[0] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("bad", [
    dict(base_top_logprobs=[[0.5, 0.9]]),  # positive: logits or probabilities, not log-probs
    dict(base_top_logprobs=[[math.log(0.8), math.log(0.7)]]),  # sums to 1.5
    dict(base_top_logprobs=[[math.nan, -1.0]]),
    dict(base_top_ids=[[0, 1, 2]]),  # shape mismatch with its values
    dict(quantized_top_ids=[[0, 1], [2, 3]], quantized_top_logprobs=np.log([[0.5, 0.2], [0.5, 0.2]])),  # token count
])
def test_topk_kl_rejects_bad_input(bad):
    arguments = dict(base_top_ids=[[0, 1]], base_top_logprobs=np.log([[0.5, 0.2]]),
                     quantized_top_ids=[[0, 1]], quantized_top_logprobs=np.log([[0.5, 0.2]]))
    with pytest.raises(ValueError):
        topk_token_kl(**{**arguments, **bad})


def test_divergence_summary_statistics():
    summary = divergence_summary([0.0, 0.1, 0.2, 0.3, 1.0], [True, True, False, True, False])
    assert summary["tokens"] == 5
    assert summary["mean_kl"] == pytest.approx(0.32)
    assert summary["median_kl"] == pytest.approx(0.2)
    assert summary["max_kl"] == pytest.approx(1.0)
    assert summary["top1_agreement"] == pytest.approx(0.6)
    with pytest.raises(ValueError):
        divergence_summary([0.1, 0.2], [True])


# --- accuracy plot ---------------------------------------------------------


def test_wilson_interval_by_hand():
    # p = 0.5, n = 100: center 0.5, half-width 1.96 * sqrt(0.0025 + 1.96^2/40000) / (1 + 1.96^2/100) = 0.0962
    low, high = plot.wilson_interval(0.5, 100)
    assert (low, high) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert plot.wilson_interval(0.0, 10)[0] == 0.0 and plot.wilson_interval(1.0, 10)[1] == pytest.approx(1.0)
    assert plot.wilson_interval(1.0, 10)[0] < 1.0  # never a zero-width interval at the edges


def _report(**tasks) -> Report:
    return Report.model_validate({"recipe": "r", "scheme": "int8_per_channel", "verdict": "pass", "evaluation": {"tasks": tasks}})


def test_accuracy_plot_is_a_png_with_one_pair_per_task(tmp_path):
    report = _report(
        arc_easy={"base": {"acc": 0.49, "samples": 200}, "quantized": {"acc": 0.475, "samples": 200},
                  "paired": {"accuracy_drop": 0.015, "drop_ci_low": -0.02, "drop_ci_high": 0.05}},
        arc_challenge={"base": {"acc": 0.25, "samples": 100}, "quantized": {"acc": None, "samples": 100}},
    )
    rows = plot.accuracy_rows(report)
    assert [row["task"] for row in rows] == ["arc_easy"]  # a missing accuracy is not drawn as zero
    assert rows[0]["base"][1] == plot.wilson_interval(0.49, 200)
    path = tmp_path / "accuracy.png"
    assert plot.write_accuracy_plot(report, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
    assert not list(tmp_path.glob(".*.tmp"))
    assert not plot.write_accuracy_plot(_report(), tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


class _FixedTopK:
    """Stands in for an engine's top_logprobs only: the files and the comparison are what is tested."""

    def __init__(self, shift: float = 0.0):
        self.shift = shift

    def top_logprobs(self, token_ids, k):
        positions = sum(len(ids) - 1 for ids in token_ids)
        probabilities = np.linspace(1.0, 0.1, k)
        probabilities /= probabilities.sum() * (1.0 + self.shift)
        ids = np.tile(np.arange(k, dtype=np.int64), (positions, 1))
        return ids, np.log(np.tile(probabilities, (positions, 1))).astype(np.float32)


def test_two_models_files_compare_to_zero_kl_when_equal_and_more_when_not(tmp_path):
    from quantize_pipeline.evaluate import divergence

    token_ids = [[1, 2, 3, 4], [5, 6, 7]]
    base, same, other = tmp_path / "base.st", tmp_path / "same.st", tmp_path / "other.st"
    assert divergence.write_top_logprobs(_FixedTopK(), token_ids, str(base))["tokens"] == 5
    divergence.write_top_logprobs(_FixedTopK(), token_ids, str(same))
    divergence.write_top_logprobs(_FixedTopK(shift=0.5), token_ids, str(other))
    equal = divergence.compare(str(base), str(same))
    assert equal["mean_kl"] == pytest.approx(0.0, abs=1e-6) and equal["top1_agreement"] == 1.0
    assert equal["per_token"]["positions_per_text"] == [3, 2]
    assert divergence.compare(str(base), str(other))["mean_kl"] > 0.01


def test_files_on_different_token_ids_are_refused(tmp_path):
    from quantize_pipeline.errors import StageError
    from quantize_pipeline.evaluate import divergence

    divergence.write_top_logprobs(_FixedTopK(), [[1, 2, 3]], str(tmp_path / "base.st"))
    divergence.write_top_logprobs(_FixedTopK(), [[1, 2, 4]], str(tmp_path / "export.st"))
    with pytest.raises(StageError, match="token ids differ"):
        divergence.compare(str(tmp_path / "base.st"), str(tmp_path / "export.st"))
