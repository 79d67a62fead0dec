"""report.md: the table a reviewer reads in a PR, rendered from report.json."""

from __future__ import annotations

from quantize_pipeline.evaluate.record import PairedComparison, Round, ServeFigures
from quantize_pipeline.verdict.record import Report, Rule, RuleState

ACCURACY_PLOT = "accuracy.png"


def _fmt(value) -> str:
    """A figure in a table cell (the sweep's table too)."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _state(rule: Rule) -> str:
    if rule.state == RuleState.INCONCLUSIVE:
        more = rule.more_samples_to_decide
        return "**INCONCLUSIVE**" + (f" (~{more} more {rule.unit or 'samples'} would likely decide)" if more else "")
    return "pass" if rule.state == RuleState.PASS else "**FAIL**"


def _interval(rule: Rule) -> str:
    if not rule.interval:
        return "—"
    return f"[{_fmt(rule.interval[0])}, {_fmt(rule.interval[1])}] at {_fmt(100 * rule.confidence)}%"


def _rounds(rounds: list[Round]) -> str:
    """[{"limit": {"arc_easy": 200, ...}}, ...] -> "arc_easy 200 → arc_easy 500"."""
    return " → ".join(
        ", ".join(f"{task} {'all' if limit is None else limit}" for task, limit in (entry.limit or {}).items())
        for entry in rounds
    ) or "—"


def _samples(rule: Rule) -> str:
    return f"{rule.samples} {rule.unit or ''}".strip() if rule.samples is not None else "—"


def render_markdown(report: Report, plot_link: str = ACCURACY_PLOT) -> str:
    """plot_link: where accuracy.png lies relative to the Markdown (the run directory, or a published bundle)."""
    lines = [
        f"# {report.recipe}: {report.verdict.upper()}",
        "",
        f"Scheme `{report.scheme}`. Engine: {report.engine.label if report.engine and report.engine.label else 'vllm'}.",
        "",
        *[f"**WARNING (quantize)**: {warning}" for warning in report.quantize_warnings],
        *([""] if report.quantize_warnings else []),
        "## Gate",
        "",
        "A rule measured on a sample passes when its whole interval is on the good side of the threshold,",
        "fails when it is wholly on the bad side, and is inconclusive otherwise.",
        "",
        "| rule | figure | interval | threshold | result | samples | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule in report.rules:
        lines.append(f"| {rule.rule} | {_fmt(rule.figure)} | {_interval(rule)} | {_fmt(rule.threshold)} | "
                     f"{_state(rule)} | {_samples(rule)} | {rule.detail} |")
    sequential = report.sequential
    if sequential:
        lines += ["", f"Accuracy intervals at {_fmt(100 * sequential.accuracy_confidence_per_look)}% per look "
                      f"({sequential.looks_planned} planned rounds share the "
                      f"{_fmt(100 * (sequential.alpha if sequential.alpha is not None else 0.05))}% error budget); "
                      f"rounds (questions per task): {_rounds(sequential.rounds)}."]
    evaluation = report.evaluation
    lines += ["", "## Evaluation (base vs quantized)", "", "| metric | base | quantized |", "|---|---|---|"]
    for task, figures in evaluation.tasks.items():
        lines.append(f"| {task} acc | {_fmt(figures.base.acc)} | {_fmt(figures.quantized.acc)} |")
    perplexity = evaluation.perplexity
    if perplexity and perplexity.to_json():
        lines.append(f"| word perplexity | {_fmt(perplexity.base)} | {_fmt(perplexity.quantized)} |")
    if evaluation.tasks:
        lines += ["", f"![per-task accuracy, base vs quantized, 95% intervals]({plot_link})"]
    if evaluation.baselines:
        lines += _baseline_lines(report)
    divergence = evaluation.divergence
    if divergence and divergence.to_json():
        lines += [
            "", f"## Token divergence from the base ({_fmt(divergence.tokens)} held-out tokens)", "",
            "| mean KL | median KL | p90 KL | p99 KL | max KL | top-1 agreement |", "|---|---|---|---|---|---|",
            "| " + " | ".join(_fmt(value) for value in (divergence.mean_kl, divergence.median_kl, divergence.p90_kl,
                                                      divergence.p99_kl, divergence.max_kl, divergence.top1_agreement))
            + " |",
            "", f"KL in nats; {divergence.method or ''}.",
        ]
    timings = evaluation.timings_s
    if timings:
        lines += ["", "## Seconds per metric", "", "| measurement | seconds |", "|---|---|"]
        lines += [f"| {name} | {_fmt(seconds)} |" for name, seconds in timings.items()]
    export = report.export.to_json() if report.export else {}
    serve = report.serve.to_json() if report.serve else {}
    if export or serve:
        lines += ["", "## Export and serving", ""]
        if export:
            lines.append(f"- export size: {(report.export.export_size_bytes or 0) / 2**20:.1f} MiB "
                         f"({_fmt(report.export.size_ratio)} of base)")
        if serve:
            lines += _serve_lines(report.serve)
    return "\n".join(lines) + "\n"


def _serve_lines(serve: ServeFigures) -> list[str]:
    lines = [f"- {serve.engine} {serve.engine_version}: load {_fmt(serve.load_s)} s "
             f"(+ import {_fmt(serve.import_s)} s), time to first token {_fmt(serve.ttft_s)} s, "
             f"{_fmt(serve.tokens_per_s)} tokens/s (batch {len(serve.completions)}), "
             f"{_fmt(serve.batch1_tokens_per_s)} at batch 1, {_fmt(serve.batch_tokens_per_s)} "
             f"at batch {serve.batch_size}, peak RSS while generating {_fmt(serve.peak_rss_mb)} MiB"
             + (f", device {_fmt(serve.device_peak_mb)} MiB" if serve.device_peak_mb else ""),
             "  (all after a warm-up call, timed around generate alone; definitions in serve/generations.json)"]
    for item in serve.completions:
        completion = item["completion"].replace("\n", " ").replace("|", "\\|")
        lines.append(f"  - `{item['prompt']}` → {completion}")
    return lines


def _recovery(paired: PairedComparison | None) -> str:
    if paired is None or paired.recovery is None:
        return ""
    return (f" (recovery {_fmt(paired.recovery)} [{_fmt(paired.recovery_ci_low)}, "
            f"{_fmt(paired.recovery_ci_high)}], {paired.questions} q)")


def _baseline_lines(report: Report) -> list[str]:
    """The export beside what users ran before: same first-round questions, generation speed and
    memory while generating. Not gated: the verdict above is the export's alone."""
    evaluation = report.evaluation
    columns = evaluation.baselines
    serve = report.serve or ServeFigures()
    names = list(columns)
    lines = ["", "## Baselines (evaluation only, not gated)", "",
             "| | export | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|",
             f"| what | {report.scheme} ({serve.engine or '—'}) | "
             + " | ".join(f"{column.kind} ({column.engine})" for column in columns.values()) + " |"]
    for task, figures in evaluation.tasks.items():
        cells = []
        for column in columns.values():
            entry = (column.tasks or {}).get(task)
            cells.append("—" if entry is None else f"{_fmt(entry.acc)}{_recovery(entry.paired)}")
        lines.append(f"| {task} acc (base {_fmt(figures.base.acc)}) | "
                     f"{_fmt(figures.quantized.acc)}{_recovery(figures.paired)} | "
                     + " | ".join(cells) + " |")
    for label, key in (("tokens/s (one call of the prompts, after a warm-up)", "tokens_per_s"),
                       ("peak RSS while generating, MiB", "peak_rss_mb"), ("device peak while generating, MiB", "device_peak_mb"),
                       ("load s", "load_s")):
        lines.append(f"| {label} | {_fmt(getattr(serve, key))} | "
                     + " | ".join(_fmt(getattr(column.serve, key) if column.serve else None) for column in columns.values())
                     + " |")
    errors = {name: column.error for name, column in columns.items() if column.error}
    if errors:
        lines.append("| could not run here | — | "
                     + " | ".join(errors.get(name, "—").replace("|", "\\|") for name in names) + " |")
    lines += ["", "Baseline accuracy is on the export's first-round questions, paired with the base model's answers "
                  "to the same questions; the export's column shows its figures after all rounds."]
    return lines


def render_comparison(reports: list[tuple[str, Report]]) -> str:
    """Several runs side by side: one column per run, one row per rule or figure."""
    header = "| | " + " | ".join(name for name, _ in reports) + " |"
    lines = [header, "|---" * (len(reports) + 1) + "|"]
    lines.append("| verdict | " + " | ".join(report.verdict for _, report in reports) + " |")
    lines.append("| scheme | " + " | ".join(str(report.scheme) for _, report in reports) + " |")
    rule_names = list(dict.fromkeys(rule.rule for _, report in reports for rule in report.rules))
    for rule_name in rule_names:
        cells = []
        for _, report in reports:
            rule = next((rule for rule in report.rules if rule.rule == rule_name), None)
            cells.append("—" if rule is None else f"{_fmt(rule.figure)} {_state(rule)}")
        lines.append(f"| {rule_name} | " + " | ".join(cells) + " |")
    lines.append("| export size ratio | "
                 + " | ".join(_fmt(report.export.size_ratio if report.export else None) for _, report in reports) + " |")
    lines.append("| tokens/s (one generate call of the recipe's prompts, after a warm-up) | "
                 + " | ".join(_tokens_per_s(report) for _, report in reports) + " |")
    return "\n".join(lines) + "\n"


def _tokens_per_s(report: Report) -> str:
    """A run's tokens/s, only where it was measured as the column says (serving figures with definitions):
    older runs timed the import and the load with the generation, a figure of another kind."""
    serve = report.serve
    if serve is None or not serve.definitions:
        return f"not comparable: {_fmt(serve.tokens_per_s)} measured with import and load" if serve else "—"
    return _fmt(serve.tokens_per_s)
