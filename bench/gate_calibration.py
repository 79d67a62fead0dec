"""Benchmark: does the interval gate with sequential rounds give the verdicts it promises?

    .venv/bin/python bench/gate_calibration.py collect --work-dir DIR   # real exports, evaluated once (long)
    .venv/bin/python bench/gate_calibration.py replay --work-dir DIR [--replays 400]
    .venv/bin/python bench/gate_calibration.py replay --work-dir bench/data/gate-calibration   # the recorded data

collect: real exports of the tiny model, each evaluated once by the evaluate stage (no serve:
no_garbage is not replayed) on the whole ARC-Easy validation split (570 questions), word
perplexity on 100 held-out documents and token divergence on 32 held-out paragraphs:
- good: INT8 per-channel (the default recipe's export, --good-export, else made here);
- bad: a copy with every weight scale multiplied by exp(0.5 N(0,1)) per output channel;
- mild: a copy with the weight scales of decoder layers 10 and 20 multiplied by
  exp(0.1 N(0,1)) per output channel (about +-10%);
- per-tensor: INT8 per-tensor (recipes/smollm2-135m-int8-per-tensor.yaml), run here.
Each export's evaluate/ folder (per-question outcomes, per-document log-likelihoods,
per-token divergence) is recorded in WORK_DIR/evaluate-dirs.json as soon as it is done.

replay: replays the gate many times per export. Each replay draws its questions (with
replacement, as a fresh sample of the same question population would) and its held-out
documents and paragraphs (bootstrap), then runs the sequential rounds of the default recipe
(200 -> 500 -> 1,000 questions per task, capped by the questions recorded; Bonferroni alpha
over the planned looks) with the gate's own rule functions, and compares with one look at
95% on all the questions the rounds could reach. Prints per export: share of pass /
inconclusive / fail, the chance that two reruns agree (sum of squared shares), mean
questions and seconds per verdict (quantized-model lm-eval seconds per question measured
by collect; the base's answers are cached per question, so a rerun does not pay them).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from quantize_pipeline.recipe.schema import GatesSpec  # noqa: E402
from quantize_pipeline.verdict import gate  # noqa: E402
from quantize_pipeline.verdict import sequential  # noqa: E402
from quantize_pipeline.verdict import metrics
from quantize_pipeline.verdict.evidence import Interval, PerToken, perplexity_ratio_from_values  # noqa: E402

BENCH_TASKS = ("arc_easy",)
BENCH_LIMIT = 1000  # per task; ARC-Easy validation has 570: all of it
EXPORTS = ("good", "bad", "mild", "per-tensor")
BASE = "builtin:smollm2-135m-instruct"


# --- collect ----------------------------------------------------------------


def _bench_recipe(shipped: str, work_dir: Path) -> Path:
    """The shipped recipe evaluated on the bench's tasks and limit, without a publish target."""
    text = (REPO / "recipes" / shipped).read_text()
    text = text.replace("  tasks: [arc_easy]", f"  tasks: [{', '.join(BENCH_TASKS)}]")
    text = re.sub(r"\n  max_limit: .*", "", text)
    text = re.sub(r"\n  limit: 200.*", f"\n  limit: {BENCH_LIMIT}\n  max_limit: {BENCH_LIMIT}", text)
    text = text[:text.index("publish:")] if "publish:" in text else text
    path = work_dir / f"bench-{shipped}"
    path.write_text(text)
    return path


def _cli(*args: str, log: Path) -> Path:
    """Run the CLI; return the run directory it printed (exit codes 0, 3, 4 all leave one)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", *args], capture_output=True, text=True, cwd=REPO)
    log.write_text(done.stdout + done.stderr)
    print(f"  {' '.join(args[:2])}: exit {done.returncode} in {time.perf_counter() - started:.0f} s", flush=True)
    for line in (done.stdout + done.stderr).splitlines():
        if line.startswith("run directory: "):
            return Path(line.removeprefix("run directory: "))
    sys.exit(f"no run directory in {log}")


def corrupt_scales(source: Path, target: Path, layers: list[int] | None, sigma: float, seed: int) -> None:
    """Copy an export, multiplying weight scales by exp(sigma N(0,1)) per output channel.
    layers: decoder layer indices to corrupt (None: all)."""
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(source / "model.safetensors"))
    for name, tensor in tensors.items():
        if not name.endswith("weight_scale"):
            continue
        if layers is not None and not any(f"model.layers.{layer}." in name for layer in layers):
            continue
        noise = torch.exp(sigma * torch.randn(tensor.shape, generator=generator))
        tensors[name] = (tensor.float() * noise).to(tensor.dtype)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})


def _evaluate_export(recipe_path: Path, export: Path, out_dir: Path) -> Path:
    """serve + evaluate on an export (one engine load, as in a run); the bench replays the sampled rules only."""
    from quantize_pipeline.evaluate import evaluate
    from quantize_pipeline.recipe.schema import load_recipe
    from quantize_pipeline.run.runner import resolve_base_model

    recipe = load_recipe(recipe_path)
    (out_dir / "serve").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base_dir = resolve_base_model(recipe, out_dir / "prepare.log", print)
    evaluate.serve_and_evaluate(recipe, base_dir, export, out_dir / "serve", out_dir, out_dir / "logs")
    print(f"  evaluate {export}: {time.perf_counter() - started:.0f} s", flush=True)
    return out_dir


def collect(work_dir: Path, good_export: Path | None, names: tuple[str, ...] = EXPORTS) -> None:
    """good_export: an export of the default recipe made earlier (else one is made here)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    runs = work_dir / "runs"
    good_recipe = _bench_recipe("smollm2-135m-int8.yaml", work_dir)
    dirs_file = work_dir / "evaluate-dirs.json"
    evaluate_dirs = json.loads(dirs_file.read_text()) if dirs_file.is_file() else {}

    def record(name: str, folder: Path) -> None:
        evaluate_dirs[name] = str(folder)
        dirs_file.write_text(json.dumps(evaluate_dirs, indent=2))  # after each export: partial data replays too

    if good_export is None:
        good_export = _cli("run", str(good_recipe), "--output-dir", str(runs), "-q", log=work_dir / "good.log") / "model"
    corrupted = {"mild": ([10, 20], 0.1), "bad": (None, 0.5)}
    for name in names:
        if name in evaluate_dirs:
            continue
        if name == "good":
            record(name, _evaluate_export(good_recipe, good_export, work_dir / "evaluate-good"))
        elif name in corrupted:
            export = work_dir / f"export-{name}"
            if not export.is_dir():
                corrupt_scales(good_export, export, *corrupted[name], seed=0)
            record(name, _evaluate_export(good_recipe, export, work_dir / f"evaluate-{name}"))
        elif name == "per-tensor":
            tensor = _cli("run", str(_bench_recipe("smollm2-135m-int8-per-tensor.yaml", work_dir)), "--output-dir",
                          str(runs), "-q", log=work_dir / "per-tensor.log")
            record(name, tensor / "evaluate")


# --- replay -----------------------------------------------------------------


class ExportEvidence:
    """What one export's evaluation recorded: per-question outcomes, per-document perplexity, per-token divergence."""

    def __init__(self, evaluate_dir: Path):
        from quantize_pipeline.verdict.evidence import paired_outcomes, per_doc_values

        self.outcomes = {task: paired_outcomes(evaluate_dir, task) for task in BENCH_TASKS}
        base_ppl = per_doc_values(evaluate_dir, "base", "wikipedia-heldout")
        quantized_ppl = per_doc_values(evaluate_dir, "quantized", "wikipedia-heldout")
        docs = sorted(set(base_ppl) & set(quantized_ppl))
        self.perplexity = ([base_ppl[doc] for doc in docs], [quantized_ppl[doc] for doc in docs])
        self.per_token = PerToken.load(evaluate_dir)
        timings = json.loads((evaluate_dir / "evaluate.json").read_text())["timings_s"]
        # Seconds per question of the quantized model (the base's are cached per question after its first run).
        self.seconds_per_question = {
            task: timings[f"lm-eval {task}: quantized"] / len(self.outcomes[task][0]) for task in BENCH_TASKS
        }


def _paragraph_resample(per_token: PerToken, rng) -> PerToken:
    lengths = np.array(per_token.positions_per_text)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    picks = rng.integers(0, len(lengths), len(lengths))
    kl = np.concatenate([per_token.kl[bounds[i]:bounds[i + 1]] for i in picks])
    agree = np.concatenate([per_token.top1_agree[bounds[i]:bounds[i + 1]] for i in picks])
    return PerToken(kl, agree, [int(lengths[i]) for i in picks])


def _fixed_rules(evidence: ExportEvidence, gates: GatesSpec, rng) -> list:
    """The rules that do not grow with questions, on a resample of the held-out text."""
    one_look = 1.0 - gates.alpha
    rules = []
    docs = rng.integers(0, len(evidence.perplexity[0]), len(evidence.perplexity[0]))
    base_ppl, quantized_ppl = ([values[i] for i in docs] for values in evidence.perplexity)
    rules.append(gate._judged("max_perplexity_ratio", perplexity_ratio_from_values(base_ppl, quantized_ppl,
                              confidence=one_look), gates.max_perplexity_ratio, "below", one_look, ""))
    per_token = _paragraph_resample(evidence.per_token, rng)
    rules.append(gate._judged("max_mean_kl", per_token.mean_kl_interval(confidence=one_look), gates.max_mean_kl,
                              "below", one_look, ""))
    rules.append(gate._judged("min_top1_agreement", per_token.top1_interval(confidence=one_look),
                              gates.min_top1_agreement, "above", one_look, ""))
    return rules


def _accuracy_rules(evidence: ExportEvidence, draws: dict, limits: dict, gates: GatesSpec, confidence: float) -> list:
    rules = []
    for task in BENCH_TASKS:
        base, quantized = (values[draws[task][:limits[task]]] for values in evidence.outcomes[task])
        both_right, b, c = int(np.sum(base * quantized)), int(np.sum(base * (1 - quantized))), int(np.sum((1 - base) * quantized))
        paired = metrics.paired_comparison_from_counts(both_right, b, c, len(base) - both_right - b - c,
                                                       confidence=confidence, bootstrap_samples=1000)
        interval = None if paired["recovery"] is None else Interval(
            paired["recovery"], paired["recovery_ci_low"], paired["recovery_ci_high"], len(base), "questions")
        rules.append(gate._judged(f"min_recovery[{task}]", interval, gates.min_recovery, "above", confidence, ""))
    return rules


def replay_once(evidence: ExportEvidence, gates: GatesSpec, rng) -> tuple[dict, dict]:
    """(sequential, fixed) outcomes of one replay: {verdict, questions, seconds}."""
    schedules = {task: sequential.round_schedule(200, BENCH_LIMIT, split_size=len(evidence.outcomes[task][0]))
                 for task in BENCH_TASKS}
    longest = max(schedules.values(), key=len)
    looks = len(longest)
    draws = {task: rng.integers(0, len(evidence.outcomes[task][0]), schedules[task][-1].limit) for task in BENCH_TASKS}
    fixed_rules = _fixed_rules(evidence, gates, rng)
    accuracy_names = {f"min_recovery[{task}]" for task in BENCH_TASKS}
    confidence = 1.0 - sequential.per_look_alpha(looks, gates.alpha)
    look = 0
    while True:
        limits = {task: schedules[task][min(look, len(schedules[task]) - 1)].limit for task in BENCH_TASKS}
        rules = _accuracy_rules(evidence, draws, limits, gates, confidence) + fixed_rules
        decision = sequential.next_round(longest, look, {rule.rule: rule.state for rule in rules},
                                         more_questions_help=accuracy_names)
        if decision.stop:
            break
        look += 1
    outcome = {"verdict": gate.verdict_of(rules), "questions": sum(limits.values()),
               "seconds": sum(limits[task] * evidence.seconds_per_question[task] for task in BENCH_TASKS)}
    last = {task: schedules[task][-1].limit for task in BENCH_TASKS}
    fixed = _accuracy_rules(evidence, draws, last, gates, 1.0 - gates.alpha) + fixed_rules
    fixed_outcome = {"verdict": gate.verdict_of(fixed), "questions": sum(last.values()),
                     "seconds": sum(last[task] * evidence.seconds_per_question[task] for task in BENCH_TASKS)}
    return outcome, fixed_outcome


def _summary(outcomes: list[dict]) -> dict:
    verdicts = [outcome["verdict"] for outcome in outcomes]
    shares = {state: verdicts.count(state) / len(verdicts) for state in ("pass", "inconclusive", "fail")}
    return {**shares, "same_verdict": sum(share ** 2 for share in shares.values()),
            "questions": float(np.mean([outcome["questions"] for outcome in outcomes])),
            "seconds": float(np.mean([outcome["seconds"] for outcome in outcomes]))}


def replay(work_dir: Path, replays: int) -> None:
    dirs = json.loads((work_dir / "evaluate-dirs.json").read_text())
    gates = GatesSpec()
    print(f"gate defaults: min_recovery {gates.min_recovery}, max_perplexity_ratio {gates.max_perplexity_ratio}, "
          f"max_mean_kl {gates.max_mean_kl}, min_top1_agreement {gates.min_top1_agreement}, alpha {gates.alpha}")
    print(f"{replays} replays per export; tasks {', '.join(BENCH_TASKS)}; rounds 200 -> 500 -> 1000 per task "
          "(capped by the questions recorded)\n")
    header = (f"| export | recorded figures | mode | pass | inconclusive | fail | same verdict on rerun "
              f"| questions per verdict | seconds per verdict |")
    print(header)
    print("|---|---|---|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for name in EXPORTS:
        if name not in dirs:
            continue
        evidence = ExportEvidence(work_dir / dirs[name])  # relative paths: inside the work dir (bench/data)
        figures = ", ".join(
            f"{task} recovery {evidence.outcomes[task][1].mean() / evidence.outcomes[task][0].mean():.3f} "
            f"({len(evidence.outcomes[task][0])} q)" for task in BENCH_TASKS)
        figures += f"; KL {np.mean(evidence.per_token.kl):.3f}, top-1 {np.mean(evidence.per_token.top1_agree):.3f}"
        results = [replay_once(evidence, gates, rng) for _ in range(replays)]
        for mode, index in (("sequential rounds", 0), ("one look at all", 1)):
            row = _summary([result[index] for result in results])
            print(f"| {name} | {figures} | {mode} | {row['pass']:.3f} | {row['inconclusive']:.3f} | {row['fail']:.3f} "
                  f"| {row['same_verdict']:.3f} | {row['questions']:.0f} | {row['seconds']:.0f} |", flush=True)
            figures = ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["collect", "replay"])
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--good-export", type=Path, help="collect: an export of the default recipe made earlier")
    parser.add_argument("--replays", type=int, default=400)
    parser.add_argument("--exports", nargs="+", choices=EXPORTS, default=list(EXPORTS))
    args = parser.parse_args()
    if args.mode == "collect":
        collect(args.work_dir, args.good_export, tuple(args.exports))
    else:
        replay(args.work_dir, args.replays)


if __name__ == "__main__":
    main()
