"""accuracy.png: per-task accuracy, base vs quantized, with 95% intervals.

Each bar's interval is the Wilson score interval of that model's accuracy; the
label above each pair is the paired 95% interval of the drop (same questions),
which is what `max_accuracy_drop` gates on. matplotlib is imported here only.
"""

from __future__ import annotations

import math
from pathlib import Path

from quantize_pipeline.verdict.record import Report

Z_95 = 1.959964


def wilson_interval(accuracy: float, samples: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (stays inside [0, 1], sane at small n)."""
    if samples <= 0:
        raise ValueError("samples must be positive")
    center = (accuracy + Z_95**2 / (2 * samples)) / (1 + Z_95**2 / samples)
    half = Z_95 * math.sqrt(accuracy * (1 - accuracy) / samples + Z_95**2 / (4 * samples**2)) / (1 + Z_95**2 / samples)
    return max(0.0, center - half), min(1.0, center + half)


def accuracy_rows(report: Report) -> list[dict]:
    """One row per task with both accuracies and sample counts: what the plot draws."""
    rows = []
    for task, figures in report.evaluation.tasks.items():
        base, quantized = figures.base, figures.quantized
        if base.acc is None or quantized.acc is None:
            continue
        rows.append({
            "task": task,
            "base": (base.acc, wilson_interval(base.acc, base.samples or 1)),
            "quantized": (quantized.acc, wilson_interval(quantized.acc, quantized.samples or 1)),
            "paired": figures.paired,
            # Evaluation-only baseline columns on the same task (their first-round questions).
            "baselines": {
                name: (entry.acc, wilson_interval(entry.acc, entry.samples or 1))
                for name, column in (report.evaluation.baselines or {}).items()
                if (entry := (column.tasks or {}).get(task)) and entry.acc is not None
            },
        })
    return rows


def write_accuracy_plot(report: Report, path: Path) -> bool:
    """Write the PNG (atomically); False when the report has no task accuracies to draw."""
    rows = accuracy_rows(report)
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on CI machines
    import matplotlib.pyplot as plt

    baseline_names = list(dict.fromkeys(name for row in rows for name in row["baselines"]))
    series = [("base", "#7f8c8d"), ("quantized", "#2e86c1")] + [
        (name, color) for name, color in zip(baseline_names, ("#e67e22", "#8e44ad", "#27ae60", "#c0392b", "#f1c40f"))
    ]
    figure, axes = plt.subplots(figsize=(max(4.0, (1.1 + 0.5 * len(series)) * len(rows)), 4.0), dpi=100)
    width = 0.76 / len(series)
    for position, (role, color) in enumerate(series):
        offset = (position - (len(series) - 1) / 2) * width
        points = [(index, row[role] if role in ("base", "quantized") else row["baselines"].get(role))
                  for index, row in enumerate(rows)]
        points = [(index, point) for index, point in points if point is not None]
        values = [point[0] for _, point in points]
        errors = [[point[0] - point[1][0] for _, point in points], [point[1][1] - point[0] for _, point in points]]
        axes.bar([index + offset for index, _ in points], values, width, yerr=errors, capsize=4, color=color,
                 label=role if role in ("base", "quantized") else f"{role} (baseline)")
    for index, row in enumerate(rows):
        paired = row["paired"]
        if paired is not None and paired.drop_ci_low is not None:
            top = max(row["base"][1][1], row["quantized"][1][1])
            axes.annotate(f"drop {paired.accuracy_drop:+.3f}\n[{paired.drop_ci_low:+.3f}, {paired.drop_ci_high:+.3f}]",
                          (index, min(top + 0.02, 0.98)), ha="center", va="bottom", fontsize=8)
    axes.set_xticks(range(len(rows)), [row["task"] for row in rows])
    axes.set_ylim(0, 1.15)
    axes.set_ylabel("accuracy (95% Wilson interval)")
    axes.set_title(f"{report.recipe or ''}: {report.scheme or ''} — {report.verdict}", fontsize=10)
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.tmp")
    figure.savefig(partial, format="png")
    plt.close(figure)
    partial.replace(path)
    return True
