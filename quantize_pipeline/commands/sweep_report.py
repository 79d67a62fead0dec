"""A sweep's table, Pareto front and plot: sweep.json, sweep.md, sweep.png.

The front is over three figures: export size (smaller is better), accuracy recovery (the lowest
quantized/base accuracy ratio over the recipe's tasks: larger is better) and mean token KL against
the base (smaller is better). A variant is on the front when no other variant is at least as good
on all three and better on one. Variants without figures (refused, crashed) are rows, not points.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from quantize_pipeline.run.rundir import atomic_write_json, atomic_write_text
from quantize_pipeline.verdict.report import _fmt

SWEEP_JSON, SWEEP_MD, SWEEP_PNG = "sweep.json", "sweep.md", "sweep.png"
FRONT_COLOR, OTHER_COLOR = "#d62728", "#7f7f7f"
PANELS = (("recovery", "accuracy recovery (min over tasks, quantized / base)"),
          ("mean_kl", "mean token KL vs base (nats)"))
DEFINITIONS = {
    "export_size_bytes": "bytes of the exported safetensors folder",
    "size_ratio": "export size / base model size",
    "recovery": "lowest quantized / base accuracy over the recipe's accuracy tasks (same questions)",
    "mean_kl": "mean per-token KL(base || quantized) on the held-out divergence text",
    "top1_agreement": "share of held-out tokens where both models rank the same next token first",
    "perplexity_ratio": "quantized / base word perplexity on the held-out perplexity text",
    "tokens_per_s": "serve's figure: generated tokens / seconds of one generate call of the recipe's prompts, "
                    "after a warm-up (no import, no load)",
    "serving_peak_rss_mb": "peak host RSS of the engine's process tree while generating",
}


def _has_figures(row: dict) -> bool:
    return row.get("export_size_bytes") is not None and row.get("recovery") is not None


def _objectives(row: dict) -> tuple[float, float, float]:
    kl = row.get("mean_kl")
    return (row["export_size_bytes"], -row["recovery"], math.inf if kl is None else kl)  # all: smaller is better


def pareto_front(rows: list[dict]) -> list[str]:
    """Names of the variants no other variant dominates (see the module's docstring)."""
    points = [(row["variant"], _objectives(row)) for row in rows if _has_figures(row)]
    front = []
    for name, mine in points:
        dominated = any(all(o <= m for o, m in zip(other, mine)) and any(o < m for o, m in zip(other, mine))
                        for other_name, other in points if other_name != name)
        if not dominated:
            front.append(name)
    return front


def smallest_passing(rows: list[dict]) -> str | None:
    passing = [row for row in rows if row.get("status") == "pass" and row.get("export_size_bytes") is not None]
    return min(passing, key=lambda row: (row["export_size_bytes"], row["variant"]))["variant"] if passing else None


def write(sweep_dir: Path, recipe, recipe_path: str, executor: str, rows: list[dict], extras: dict | None = None) -> dict:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    front = pareto_front(rows)
    for row in rows:
        row["pareto"] = row["variant"] in front
    result = {
        "recipe": recipe.name, "recipe_path": recipe_path, "executor": executor, "sweep_dir": str(sweep_dir),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "rows": rows, "pareto_front": front, "smallest_passing": smallest_passing(rows), "definitions": DEFINITIONS,
        **(extras or {}),
    }
    result["plot"] = write_plot(rows, sweep_dir / SWEEP_PNG, result["smallest_passing"])
    atomic_write_text(sweep_dir / SWEEP_MD, render_markdown(result))
    atomic_write_json(sweep_dir / SWEEP_JSON, result)
    return result


def render_markdown(result: dict) -> str:
    lines = [f"# Sweep of {result['recipe']} ({result['executor']} executor)", ""]
    best = result["smallest_passing"]
    lines.append(f"Smallest variant that passes every gate: **{best}**" if best else
                 "No variant passes every gate.")
    lines += ["", f"![size vs recovery and KL]({SWEEP_PNG})", "",
              "| variant | verdict | export MiB | size ratio | recovery | mean KL | top-1 | ppl ratio | tokens/s "
              "| serving peak RSS MiB | Pareto | reason |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        size = row.get("export_size_bytes")
        lines.append("| " + " | ".join([
            row["variant"], row["status"] + (" (reused)" if row.get("reused") else ""),
            _fmt(round(size / 2**20, 1) if size is not None else None), _fmt(row.get("size_ratio")),
            _fmt(row.get("recovery")), _fmt(row.get("mean_kl")), _fmt(row.get("top1_agreement")),
            _fmt(row.get("perplexity_ratio")), _fmt(row.get("tokens_per_s")), _fmt(row.get("serving_peak_rss_mb")),
            "yes" if row.get("pareto") else "", (row.get("reason") or "").replace("|", "/"),
        ]) + " |")
    for scheme, ranking in (result.get("sensitivity") or {}).items():
        lines += ["", f"Most sensitive layers under {scheme} (per-token relative output error on the calibration tokens): "
                  + ", ".join(f"{row['layer']} {row['relative_output_error']:.3g}" for row in ranking)]
    for scheme, found in (result.get("auto_exclude") or {}).items():
        trials = "; ".join(f"{trial['variant']}: {trial['status']}" for trial in found["trials"])
        if found["fewest_layers_kept"] is None:
            lines += ["", f"Auto-exclude for {scheme}: no trial passed ({trials})."]
        else:
            cost = found.get("size_cost_bytes")
            lines += ["", f"Auto-exclude for {scheme}: keeping the {found['fewest_layers_kept']} most sensitive unit(s) "
                      f"({len(found['kept_layers'])} layers with the shards vLLM fuses with them) in the model dtype "
                      f"passes the gate ({', '.join(found['kept_layers'])}); size cost "
                      f"{'—' if cost is None else f'{cost / 2**20:.1f} MiB'}; recipe `{found['recipe_file']}` "
                      f"(trials: {trials})."]
    lines += ["", "Columns:", ""]
    lines += [f"- {name}: {text}" for name, text in result["definitions"].items()]
    return "\n".join(lines) + "\n"


def write_plot(rows: list[dict], path: Path, best: str | None) -> dict:
    """sweep.png: export size against recovery (left) and mean KL (right); the front in red, the others in
    grey, the smallest passing variant labelled. Returns where each point was drawn, in the PNG's pixels
    (column, row from the top): what a test reads the image at."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plotted = [row for row in rows if _has_figures(row)]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=100)
    points = []
    for axis, (key, label) in zip(axes, PANELS):
        drawn = [row for row in plotted if row.get(key) is not None]
        for index, row in enumerate(drawn):
            size_mib = row["export_size_bytes"] / 2**20
            color = FRONT_COLOR if row.get("pareto") else OTHER_COLOR
            axis.scatter([size_mib], [row[key]], s=120, color=color, zorder=3 if row.get("pareto") else 2)
            text = row["variant"] + (" (smallest pass)" if row["variant"] == best else "")
            # Labels stepped down by row: variants of one size (rtn, gptq) sit on top of each other.
            axis.annotate(text, (size_mib, row[key]), textcoords="offset points", xytext=(8, 6 - 10 * (index % 3)),
                          fontsize=7)
        front = sorted((row for row in drawn if row.get("pareto")), key=lambda row: row["export_size_bytes"])
        if len(front) > 1:
            axis.plot([row["export_size_bytes"] / 2**20 for row in front], [row[key] for row in front],
                      color=FRONT_COLOR, linewidth=1, linestyle="--", zorder=1)
        axis.set_xlabel("export size (MiB)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
        axis.margins(0.15)
    axes[0].set_title("Pareto front in red")
    figure.tight_layout()
    figure.canvas.draw()
    height = figure.canvas.get_width_height()[1]
    for axis, (key, _) in zip(axes, PANELS):
        for row in plotted:
            if row.get(key) is None:
                continue
            x, y = axis.transData.transform((row["export_size_bytes"] / 2**20, row[key]))
            points.append({"panel": key, "variant": row["variant"], "pareto": bool(row.get("pareto")),
                           "pixel": [int(round(x)), int(round(height - y))]})
    staged = path.with_name(path.name + ".tmp")
    figure.savefig(staged, format="png", dpi=figure.dpi)
    plt.close(figure)
    staged.replace(path)
    return {"file": path.name, "points": points, "colors": {"pareto": FRONT_COLOR, "other": OTHER_COLOR}}
