"""report.md: the table a reviewer reads in a PR, rendered from report.json."""

from __future__ import annotations

ACCURACY_PLOT = "accuracy.png"


def _fmt(value) -> str:
    """A figure in a table cell (the sweep's table too)."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _state(rule: dict) -> str:
    state = rule.get("state") or ("pass" if rule["passed"] else "fail")  # schema 1 reports have only passed
    if state == "inconclusive":
        more = rule.get("more_samples_to_decide")
        return "**INCONCLUSIVE**" + (f" (~{more} more {rule.get('unit', 'samples')} would likely decide)" if more else "")
    return "pass" if state == "pass" else "**FAIL**"


def _interval(rule: dict) -> str:
    interval = rule.get("interval")
    if not interval:
        return "—"
    return f"[{_fmt(interval[0])}, {_fmt(interval[1])}] at {_fmt(100 * rule['confidence'])}%"


def _rounds(rounds: list[dict]) -> str:
    """[{"limit": {"arc_easy": 200, ...}}, ...] -> "arc_easy 200 → arc_easy 500"."""
    return " → ".join(
        ", ".join(f"{task} {'all' if limit is None else limit}" for task, limit in (entry.get("limit") or {}).items())
        for entry in rounds
    ) or "—"


def _samples(rule: dict) -> str:
    return f"{rule['samples']} {rule.get('unit', '')}".strip() if rule.get("samples") is not None else "—"


def render_markdown(report: dict, plot_link: str = ACCURACY_PLOT) -> str:
    """plot_link: where accuracy.png lies relative to the Markdown (the run directory, or a published bundle)."""
    lines = [
        f"# {report['recipe']}: {report['verdict'].upper()}",
        "",
        f"Scheme `{report['scheme']}`. Engine: {report.get('engine', {}).get('label', 'vllm')}.",
        "",
        *[f"**WARNING (quantize)**: {warning}" for warning in report.get("quantize_warnings", [])],
        *([""] if report.get("quantize_warnings") else []),
        "## Gate",
        "",
        "A rule measured on a sample passes when its whole interval is on the good side of the threshold,",
        "fails when it is wholly on the bad side, and is inconclusive otherwise.",
        "",
        "| rule | figure | interval | threshold | result | samples | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule in report["rules"]:
        lines.append(f"| {rule['rule']} | {_fmt(rule['figure'])} | {_interval(rule)} | {_fmt(rule['threshold'])} | "
                     f"{_state(rule)} | {_samples(rule)} | {rule['detail']} |")
    sequential = report.get("sequential")
    if sequential:
        lines += ["", f"Accuracy intervals at {_fmt(100 * sequential['accuracy_confidence_per_look'])}% per look "
                      f"({sequential['looks_planned']} planned rounds share the "
                      f"{_fmt(100 * sequential.get('alpha', 0.05))}% error budget); "
                      f"rounds (questions per task): {_rounds(sequential.get('rounds') or [])}."]
    evaluation = report.get("evaluation", {})
    lines += ["", "## Evaluation (base vs quantized)", "", "| metric | base | quantized |", "|---|---|---|"]
    for task, figures in evaluation.get("tasks", {}).items():
        lines.append(f"| {task} acc | {_fmt(figures.get('base', {}).get('acc'))} | {_fmt(figures.get('quantized', {}).get('acc'))} |")
    perplexity = evaluation.get("perplexity")
    if perplexity:
        lines.append(f"| word perplexity | {_fmt(perplexity.get('base'))} | {_fmt(perplexity.get('quantized'))} |")
    if evaluation.get("tasks"):
        lines += ["", f"![per-task accuracy, base vs quantized, 95% intervals]({plot_link})"]
    if evaluation.get("baselines"):
        lines += _baseline_lines(report)
    divergence = evaluation.get("divergence")
    if divergence:
        lines += [
            "", f"## Token divergence from the base ({_fmt(divergence.get('tokens'))} held-out tokens)", "",
            "| mean KL | median KL | p90 KL | p99 KL | max KL | top-1 agreement |", "|---|---|---|---|---|---|",
            "| " + " | ".join(_fmt(divergence.get(key)) for key in
                             ("mean_kl", "median_kl", "p90_kl", "p99_kl", "max_kl", "top1_agreement")) + " |",
            "", f"KL in nats; {divergence.get('method', '')}.",
        ]
    timings = evaluation.get("timings_s")
    if timings:
        lines += ["", "## Seconds per metric", "", "| measurement | seconds |", "|---|---|"]
        lines += [f"| {name} | {_fmt(seconds)} |" for name, seconds in timings.items()]
    export = report.get("export", {})
    serve = report.get("serve", {})
    if export or serve:
        lines += ["", "## Export and serving", ""]
        if export:
            lines.append(f"- export size: {export.get('export_size_bytes', 0) / 2**20:.1f} MiB "
                         f"({_fmt(export.get('size_ratio'))} of base)")
        if serve:
            lines.append(f"- {serve.get('engine')} {serve.get('engine_version')}: load {_fmt(serve.get('load_s'))} s "
                         f"(+ import {_fmt(serve.get('import_s'))} s), time to first token {_fmt(serve.get('ttft_s'))} s, "
                         f"{_fmt(serve.get('tokens_per_s'))} tokens/s (batch {len(serve.get('completions', []))}), "
                         f"{_fmt(serve.get('batch1_tokens_per_s'))} at batch 1, {_fmt(serve.get('batch_tokens_per_s'))} "
                         f"at batch {serve.get('batch_size')}, peak RSS while generating {_fmt(serve.get('peak_rss_mb'))} MiB"
                         + (f", device {_fmt(serve['device_peak_mb'])} MiB" if serve.get("device_peak_mb") else ""))
            lines.append("  (all after a warm-up call, timed around generate alone; definitions in serve/generations.json)")
            for item in serve.get("completions", []):
                completion = item["completion"].replace("\n", " ").replace("|", "\\|")
                lines.append(f"  - `{item['prompt']}` → {completion}")
    return "\n".join(lines) + "\n"


def _recovery(paired: dict | None) -> str:
    if not paired or paired.get("recovery") is None:
        return ""
    return (f" (recovery {_fmt(paired['recovery'])} [{_fmt(paired.get('recovery_ci_low'))}, "
            f"{_fmt(paired.get('recovery_ci_high'))}], {paired.get('questions')} q)")


def _baseline_lines(report: dict) -> list[str]:
    """The export beside what users ran before: same first-round questions, generation speed and
    memory while generating. Not gated: the verdict above is the export's alone."""
    evaluation = report["evaluation"]
    columns = evaluation["baselines"]
    serve = report.get("serve") or {}
    names = list(columns)
    lines = ["", "## Baselines (evaluation only, not gated)", "",
             "| | export | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|",
             f"| what | {report.get('scheme')} ({serve.get('engine', '—')}) | "
             + " | ".join(f"{column['kind']} ({column['engine']})" for column in columns.values()) + " |"]
    for task, figures in evaluation.get("tasks", {}).items():
        cells = []
        for column in columns.values():
            entry = (column.get("tasks") or {}).get(task)
            cells.append("—" if entry is None else f"{_fmt(entry.get('acc'))}{_recovery(entry.get('paired'))}")
        lines.append(f"| {task} acc (base {_fmt(figures.get('base', {}).get('acc'))}) | "
                     f"{_fmt(figures.get('quantized', {}).get('acc'))}{_recovery(figures.get('paired'))} | "
                     + " | ".join(cells) + " |")
    for label, key in (("tokens/s (one call of the prompts, after a warm-up)", "tokens_per_s"),
                       ("peak RSS while generating, MiB", "peak_rss_mb"), ("device peak while generating, MiB", "device_peak_mb"),
                       ("load s", "load_s")):
        lines.append(f"| {label} | {_fmt(serve.get(key))} | "
                     + " | ".join(_fmt((column.get("serve") or {}).get(key)) for column in columns.values()) + " |")
    errors = {name: column["error"] for name, column in columns.items() if column.get("error")}
    if errors:
        lines.append("| could not run here | — | "
                     + " | ".join(errors.get(name, "—").replace("|", "\\|") for name in names) + " |")
    lines += ["", "Baseline accuracy is on the export's first-round questions, paired with the base model's answers "
                  "to the same questions; the export's column shows its figures after all rounds."]
    return lines


def render_comparison(reports: list[tuple[str, dict]]) -> str:
    """Several runs side by side: one column per run, one row per rule or figure."""
    header = "| | " + " | ".join(name for name, _ in reports) + " |"
    lines = [header, "|---" * (len(reports) + 1) + "|"]
    lines.append("| verdict | " + " | ".join(report["verdict"] for _, report in reports) + " |")
    lines.append("| scheme | " + " | ".join(report["scheme"] for _, report in reports) + " |")
    rule_names = list(dict.fromkeys(rule["rule"] for _, report in reports for rule in report["rules"]))
    for rule_name in rule_names:
        cells = []
        for _, report in reports:
            rule = next((rule for rule in report["rules"] if rule["rule"] == rule_name), None)
            cells.append("—" if rule is None else f"{_fmt(rule['figure'])} {_state(rule)}")
        lines.append(f"| {rule_name} | " + " | ".join(cells) + " |")
    for label, key in (("export size ratio", "size_ratio"),):
        lines.append(f"| {label} | " + " | ".join(_fmt(report.get("export", {}).get(key)) for _, report in reports) + " |")
    lines.append("| tokens/s (one generate call of the recipe's prompts, after a warm-up) | "
                 + " | ".join(_tokens_per_s(report) for _, report in reports) + " |")
    return "\n".join(lines) + "\n"


def _tokens_per_s(report: dict) -> str:
    """A run's tokens/s, only where it was measured as the column says (serving figures with definitions):
    older runs timed the import and the load with the generation, a figure of another kind."""
    serve = report.get("serve") or {}
    if not serve.get("definitions"):
        return f"not comparable: {_fmt(serve.get('tokens_per_s'))} measured with import and load" if serve else "—"
    return _fmt(serve.get("tokens_per_s"))
