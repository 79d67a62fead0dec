"""Benchmark: seconds each gate metric takes on the tiny model, and how small a change
each detects at the default sample sizes.

    .venv/bin/python bench/gate_metrics.py [--run-dir RUN_DIR] [--questions 200] [--trials 200]

Without --run-dir it first runs the default recipe (minutes) into a temporary folder.
Prints, all measured in this run:
- seconds per metric on the real tiny model (the evaluate stage's own timings);
- per metric, the half-width of its 95% interval at the default sample size: a
  change smaller than that is inside the noise. Accuracy: simulated paired
  evaluations (detection power per true drop). Perplexity ratio, mean KL and top-1
  agreement: bootstrap over the held-out paragraphs of the run;
- milliseconds of the metric arithmetic itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from quantize_pipeline.verdict import metrics
from quantize_pipeline.verdict.evidence import PerToken, perplexity_ratio_interval

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO / "recipes" / "smollm2-135m-int8.yaml"


def _time(label: str, work, repeat: int = 5) -> None:
    started = time.perf_counter()
    for _ in range(repeat):
        work()
    print(f"  {label:<52} {(time.perf_counter() - started) / repeat * 1000:8.2f} ms")


def _simulated_answers(rng, questions: int, base_accuracy: float, drop: float, flip_rate: float):
    """Base answers, and quantized answers that flip a share of them, with a net drop of `drop`."""
    base = rng.random(questions) < base_accuracy
    quantized = base.copy()
    lost = rng.random(questions) < (flip_rate / 2 + drop / max(base_accuracy, 1e-9)) * base
    gained = rng.random(questions) < (flip_rate / 2) * ~base
    quantized[lost] = False
    quantized[gained] = True
    return base, quantized


def _default_run(workdir: Path) -> Path:
    print(f"running {DEFAULT_RECIPE.name} (minutes) ...", flush=True)
    completed = subprocess.run(
        [sys.executable, "-m", "quantize_pipeline.cli", "run", str(DEFAULT_RECIPE), "--output-dir", str(workdir), "-q"],
        capture_output=True, text=True, cwd=REPO,
    )
    lines = [line for line in (completed.stdout + completed.stderr).splitlines() if line.startswith("run directory: ")]
    if not lines:
        sys.exit(completed.stdout + completed.stderr)
    return Path(lines[-1].removeprefix("run directory: "))


def _perplexity_noise(run_dir: Path) -> tuple[int, float, float] | None:
    """(documents, measured ratio, 95% half-width of the quantized/base word-perplexity ratio), as the gate computes it."""
    interval = perplexity_ratio_interval(run_dir / "evaluate", "wikipedia-heldout", confidence=0.95)
    if interval is None:
        return None
    return interval.samples, interval.figure, (interval.high - interval.low) / 2


def _divergence_noise(run_dir: Path) -> dict | None:
    """Bootstrap over held-out paragraphs (tokens of one paragraph are not independent), as the gate computes it."""
    per_token = PerToken.load(run_dir / "evaluate")
    if per_token is None:
        return None
    kl, top1 = per_token.mean_kl_interval(confidence=0.95), per_token.top1_interval(confidence=0.95)
    return {
        "paragraphs": kl.samples, "tokens": int(sum(per_token.positions_per_text)),
        "mean_kl": kl.figure, "mean_kl_half_width": (kl.high - kl.low) / 2,
        "top1": top1.figure, "top1_half_width": (top1.high - top1.low) / 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-dir", type=Path, help="a finished run of a tiny recipe (default: run the default recipe)")
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--trials", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    with tempfile.TemporaryDirectory(prefix="qp-bench-") as tmp:
        run_dir = args.run_dir or _default_run(Path(tmp))
        report = json.loads((run_dir / "report.json").read_text())
        evaluation = report["evaluation"]
        print(f"== seconds per metric on the tiny model ({report['recipe']}, engine {evaluation['engine']})")
        for name, seconds in evaluation.get("timings_s", {}).items():
            print(f"  {name:<52} {seconds:8.2f} s")
        cached = evaluation.get("baseline", {}).get("cached_tasks", [])
        if cached:
            print(f"  (base model figures of {', '.join(cached)} came from the baseline cache)")

        print("\n== smallest change each metric tells from noise at the default sample sizes (95% interval half-width)")
        perplexity = _perplexity_noise(run_dir)
        if perplexity:
            docs, ratio, half = perplexity
            print(f"  perplexity ratio, {docs} paragraphs: measured {ratio:.4f} +/- {half:.4f}")
        divergence = _divergence_noise(run_dir)
        if divergence:
            print(f"  mean KL, {divergence['tokens']} tokens in {divergence['paragraphs']} paragraphs: "
                  f"measured {divergence['mean_kl']:.4f} +/- {divergence['mean_kl_half_width']:.4f} nats")
            print(f"  top-1 agreement, same tokens: measured {divergence['top1']:.4f} +/- {divergence['top1_half_width']:.4f}")
        print(f"  accuracy, {args.questions} questions (paired; base acc 0.5, 10% of answers flip):")
        print(f"  {'true drop':>12} {'detected':>10}")
        for drop in (0.0, 0.01, 0.02, 0.04, 0.06, 0.08, 0.10):
            detected = 0
            for _ in range(args.trials):
                base, quantized = _simulated_answers(rng, args.questions, 0.5, drop, 0.1)
                result = metrics.paired_accuracy_comparison(base, quantized, bootstrap_samples=500,
                                                            seed=int(rng.integers(1 << 30)))
                detected += result["drop_ci_low"] > 0
            print(f"  {drop:>12.2f} {detected / args.trials:>10.2f}")

    print("\n== milliseconds of the metric arithmetic (tiny-model sizes)")
    vocab, tokens, k = 49152, 256, 64
    logits = rng.standard_normal((tokens, vocab)).astype(np.float32)
    base_lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    noisy = logits + rng.standard_normal((tokens, vocab)).astype(np.float32) * 0.1
    quant_lp = noisy - np.log(np.exp(noisy).sum(axis=1, keepdims=True))
    base_ids, quant_ids = np.argsort(-base_lp, axis=1)[:, :k], np.argsort(-quant_lp, axis=1)[:, :k]
    base, quantized = _simulated_answers(rng, args.questions, 0.5, 0.02, 0.1)
    _time(f"paired bootstrap + McNemar, {args.questions} questions", lambda: metrics.paired_accuracy_comparison(base, quantized))
    _time(f"full-vocabulary KL, {tokens} tokens x {vocab}", lambda: metrics.token_divergence(base_lp, quant_lp), 2)
    _time(f"top-{k} KL, {tokens} tokens", lambda: metrics.topk_token_kl(
        base_ids, np.take_along_axis(base_lp, base_ids, 1), quant_ids, np.take_along_axis(quant_lp, quant_ids, 1)))
    text = "The capital of France is Paris. " * 8
    _time("garbage verdict, 4 completions", lambda: metrics.garbage_verdict([text] * 4), 50)


if __name__ == "__main__":
    main()
