"""The per-sample evidence behind each gate figure, read from a run's evaluate/ folder, and its intervals.

The evaluate stage keeps what the gate needs to say how sure it is:
- `{base,quantized}-samples.jsonl`: one line per question or document, {task, doc_id, value}
  (accuracy: 0/1; lm-eval's word_perplexity: [loglik, words] per document);
- `divergence-per-token.json`: per-token KL (None = infinite) and top-1 agreement, with
  the token count of each held-out paragraph (tokens of one paragraph are correlated,
  so intervals resample whole paragraphs, never single tokens).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantize_pipeline.verdict import metrics


@dataclass(frozen=True)
class Interval:
    figure: float
    low: float
    high: float
    samples: int  # questions, documents or paragraphs resampled
    unit: str  # what one sample is


def per_doc_values(evaluate_dir: Path, role: str, task: str) -> dict[int, object]:
    """{doc_id: value} of one model ("base" or "quantized") on one task; empty when not recorded."""
    path = evaluate_dir / f"{role}-samples.jsonl"
    if not path.is_file():
        return {}
    values = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if row["task"] == task:
            values[row["doc_id"]] = row["value"]
    return values


def paired_outcomes(evaluate_dir: Path, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Base and quantized 0/1 outcomes on the questions both answered, in doc_id order."""
    base, quantized = per_doc_values(evaluate_dir, "base", task), per_doc_values(evaluate_dir, "quantized", task)
    docs = sorted(set(base) & set(quantized))
    return np.array([base[doc] for doc in docs], dtype=float), np.array([quantized[doc] for doc in docs], dtype=float)


def perplexity_ratio_interval(evaluate_dir: Path, text: str, *, confidence: float) -> Interval | None:
    """Quantized / base word perplexity on the documents both scored, bootstrap over documents."""
    base, quantized = per_doc_values(evaluate_dir, "base", text), per_doc_values(evaluate_dir, "quantized", text)
    docs = sorted(set(base) & set(quantized))
    if not docs:
        return None
    return perplexity_ratio_from_values([base[doc] for doc in docs], [quantized[doc] for doc in docs],
                                        confidence=confidence)


def perplexity_ratio_from_values(base_values, quantized_values, *, confidence: float) -> Interval:
    """From per-document [loglik, words] pairs: ratio = exp((sum base ll - sum quantized ll) / sum words)."""
    base_ll = np.array([value[0] for value in base_values], dtype=float)
    quantized_ll = np.array([value[0] for value in quantized_values], dtype=float)
    words = np.array([value[1] for value in base_values], dtype=float)
    log_ratio, low, high = metrics.cluster_ratio_interval(base_ll - quantized_ll, words, confidence=confidence)
    return Interval(_exp(log_ratio), _exp(low), _exp(high), len(words), "documents")


def _exp(value: float) -> float:
    try:
        return math.exp(value)
    except OverflowError:
        return math.inf


@dataclass(frozen=True)
class PerToken:
    kl: np.ndarray  # inf where the quantized model gave a base token no mass
    top1_agree: np.ndarray
    positions_per_text: list[int]

    @classmethod
    def load(cls, evaluate_dir: Path) -> "PerToken | None":
        path = evaluate_dir / "divergence-per-token.json"
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        kl = np.array([math.inf if value is None else value for value in data["kl"]], dtype=float)
        return cls(kl, np.array(data["top1_agree"], dtype=float), list(data["positions_per_text"]))

    def mean_kl_interval(self, *, confidence: float) -> Interval:
        sums, counts = metrics.cluster_sums(self.kl, self.positions_per_text)
        if not np.isfinite(sums).all():  # an infinite KL: no resample can bring it back
            return Interval(math.inf, math.inf, math.inf, len(sums), "paragraphs")
        return Interval(*metrics.cluster_ratio_interval(sums, counts, confidence=confidence), len(sums), "paragraphs")

    def top1_interval(self, *, confidence: float) -> Interval:
        sums, counts = metrics.cluster_sums(self.top1_agree, self.positions_per_text)
        return Interval(*metrics.cluster_ratio_interval(sums, counts, confidence=confidence), len(sums), "paragraphs")
