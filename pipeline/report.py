"""report.md: the table a reviewer reads in a PR, rendered from report.json."""

from __future__ import annotations

ACCURACY_PLOT = "accuracy.png"


def _fmt(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_markdown(report: dict, plot_link: str = ACCURACY_PLOT) -> str:
    """plot_link: where accuracy.png lies relative to the Markdown (the run directory, or a published bundle)."""
    lines = [
        f"# {report['recipe']}: {report['verdict'].upper()}",
        "",
        f"Scheme `{report['scheme']}`. Engine: {report.get('engine', {}).get('label', 'vllm')}.",
        "",
        "## Gate",
        "",
        "| rule | figure | threshold | result | detail |",
        "|---|---|---|---|---|",
    ]
    for rule in report["rules"]:
        result = "pass" if rule["passed"] else "**FAIL**"
        lines.append(f"| {rule['rule']} | {_fmt(rule['figure'])} | {_fmt(rule['threshold'])} | {result} | {rule['detail']} |")
    evaluation = report.get("evaluation", {})
    lines += ["", "## Evaluation (base vs quantized)", "", "| metric | base | quantized |", "|---|---|---|"]
    for task, figures in evaluation.get("tasks", {}).items():
        lines.append(f"| {task} acc | {_fmt(figures.get('base', {}).get('acc'))} | {_fmt(figures.get('quantized', {}).get('acc'))} |")
    perplexity = evaluation.get("perplexity")
    if perplexity:
        lines.append(f"| word perplexity | {_fmt(perplexity.get('base'))} | {_fmt(perplexity.get('quantized'))} |")
    if evaluation.get("tasks"):
        lines += ["", f"![per-task accuracy, base vs quantized, 95% intervals]({plot_link})"]
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
            lines.append(f"- vLLM {serve.get('engine_version')}: load {_fmt(serve.get('load_s'))} s, "
                         f"{_fmt(serve.get('tokens_per_s'))} tokens/s, peak RSS {_fmt(serve.get('peak_rss_mb'))} MiB")
            for item in serve.get("completions", []):
                completion = item["completion"].replace("\n", " ").replace("|", "\\|")
                lines.append(f"  - `{item['prompt']}` → {completion}")
    return "\n".join(lines) + "\n"


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
            cells.append("—" if rule is None else f"{_fmt(rule['figure'])} {'pass' if rule['passed'] else '**FAIL**'}")
        lines.append(f"| {rule_name} | " + " | ".join(cells) + " |")
    for label, key in (("export size ratio", "size_ratio"),):
        lines.append(f"| {label} | " + " | ".join(_fmt(report.get("export", {}).get(key)) for _, report in reports) + " |")
    lines.append("| tokens/s | " + " | ".join(_fmt(report.get("serve", {}).get("tokens_per_s")) for _, report in reports) + " |")
    return "\n".join(lines) + "\n"
