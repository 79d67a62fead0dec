"""Benchmark: how long each gate metric takes, and how small an accuracy drop the paired
comparison detects at the default sample size.

    .venv/bin/python bench/gate_metrics.py [--questions 200] [--trials 200]

Prints seconds per metric measured in this run and, for each true drop, the share of
simulated evaluations whose 95% paired interval excludes zero (the detection power).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from pipeline import metrics


def _time(label: str, work, repeat: int = 5) -> None:
    started = time.perf_counter()
    for _ in range(repeat):
        work()
    print(f"{label:<48} {(time.perf_counter() - started) / repeat * 1000:8.2f} ms")


def _simulated_answers(rng, questions: int, base_accuracy: float, drop: float, flip_rate: float):
    """Base answers, and quantized answers that flip a share of them, with a net drop of `drop`."""
    base = rng.random(questions) < base_accuracy
    quantized = base.copy()
    # Net drop = base_accuracy * P(lose) - (1 - base_accuracy) * P(gain) = drop when base_accuracy = 0.5.
    lost = rng.random(questions) < (flip_rate / 2 + drop / max(base_accuracy, 1e-9)) * base
    gained = rng.random(questions) < (flip_rate / 2) * ~base
    quantized[lost] = False
    quantized[gained] = True
    return base, quantized


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    print("== seconds per metric (tiny-model sizes)")
    vocab, tokens = 49152, 256
    logits = rng.standard_normal((tokens, vocab)).astype(np.float32)
    base_lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    noisy = logits + rng.standard_normal((tokens, vocab)).astype(np.float32) * 0.1
    quant_lp = noisy - np.log(np.exp(noisy).sum(axis=1, keepdims=True))
    base, quantized = _simulated_answers(rng, args.questions, 0.5, 0.02, 0.1)
    _time(f"paired bootstrap + McNemar, {args.questions} questions", lambda: metrics.paired_accuracy_comparison(base, quantized))
    _time(f"token KL + top-1 agreement, {tokens} tokens x {vocab} vocab", lambda: metrics.token_divergence(base_lp, quant_lp), 2)
    text = "The capital of France is Paris. " * 8
    _time("garbage verdict, 4 completions", lambda: metrics.garbage_verdict([text] * 4), 50)

    print(f"\n== detection power at {args.questions} questions (base acc 0.5, 10% of answers flip)")
    print(f"{'true drop':>10} {'detected':>10}")
    for drop in (0.0, 0.01, 0.02, 0.04, 0.06, 0.08, 0.10):
        detected = 0
        for _ in range(args.trials):
            base, quantized = _simulated_answers(rng, args.questions, 0.5, drop, 0.1)
            result = metrics.paired_accuracy_comparison(base, quantized, bootstrap_samples=500, seed=int(rng.integers(1 << 30)))
            detected += result["drop_ci_low"] > 0
        print(f"{drop:>10.2f} {detected / args.trials:>10.2f}")


if __name__ == "__main__":
    main()
