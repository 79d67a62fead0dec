"""The model card (README.md) of a published quantized model.

YAML front matter from huggingface_hub's ModelCardData, so the Hub indexes the
base model, the "quantized" relation, the tags and the evaluation results;
then a body that says how to serve the model with vLLM and carries the gate
report verbatim.

Only the quantized model's figures go into `model-index`: the Hub shows those
entries as results *of this model*, so the base model's figures would read as
claims about this one. The base figures sit beside them in the body table.
"""

from __future__ import annotations

RESULT_KEYS = ("task_type", "dataset_type", "dataset_name", "metric_type", "base", "quantized")


def _card_data(*, model_name, base_model, scheme, weight_dtype_tag, task_results):
    from huggingface_hub import EvalResult, ModelCardData

    return ModelCardData(
        model_name=model_name,  # model-index needs a name once there are eval results
        base_model=base_model,
        base_model_relation="quantized",
        library_name="vllm",
        tags=["quark", weight_dtype_tag, scheme, "vllm"],
        eval_results=[
            EvalResult(
                task_type=row["task_type"],
                dataset_type=row["dataset_type"],
                dataset_name=row["dataset_name"],
                metric_type=row["metric_type"],
                metric_value=float(row["quantized"]),
            )
            for row in task_results
        ]
        or None,
    )


def _results_table(task_results: list[dict]) -> list[str]:
    lines = [
        "| Task | Dataset | Metric | Base model | Quantized | Change |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in task_results:
        base, quantized = float(row["base"]), float(row["quantized"])
        lines.append(
            f"| {row['task_type']} | {row['dataset_name']} ({row['dataset_type']}) | {row['metric_type']} "
            f"| {base:.4f} | {quantized:.4f} | {quantized - base:+.4f} |"
        )
    return lines


def serve_snippet(model: str, kv_cache: str | None) -> str:
    """The vLLM call that loads this checkpoint; Quark's config.json entry needs quantization="quark".
    A relative `model` (a folder target) gets a comment saying where it must point."""
    kv = f', kv_cache_dtype="{kv_cache}"' if kv_cache else ""
    where = "  # the folder of this README, wherever it was copied" if model.startswith("./") else ""
    return f'llm = LLM(model="{model}", quantization="quark"{kv}){where}'


def build_model_card(
    *,
    model_name: str,
    base_model: str,
    scheme: str,
    scheme_description: str,
    weight_dtype_tag: str,
    excluded: list[str],
    kv_cache: str | None,
    task_results: list[dict],
    gate_markdown: str,
    serve_as: str | None = None,
) -> str:
    """README.md text: front matter that `huggingface_hub.ModelCard` parses back, then the body.

    `serve_as` is what the vLLM snippet loads (the Hub repo id or a folder); it defaults to `model_name`.
    """
    for row in task_results:
        missing = [key for key in RESULT_KEYS if key not in row]
        if missing:
            raise ValueError(f"task result {row!r} lacks {', '.join(missing)}")
    data = _card_data(
        model_name=model_name,
        base_model=base_model,
        scheme=scheme,
        weight_dtype_tag=weight_dtype_tag,
        task_results=task_results,
    )
    body = [
        f"# {model_name}",
        "",
        f"[{base_model}](https://huggingface.co/{base_model}) quantized with AMD Quark: "
        f"**{scheme}** — {scheme_description}.",
        f"Excluded from quantization: {', '.join(excluded) or 'nothing'}.",
        f"KV cache: {kv_cache or 'not quantized'}.",
        "",
        "## Serve with vLLM",
        "",
        "```python",
        "from vllm import LLM",
        serve_snippet(serve_as or model_name, kv_cache),
        "```",
        "",
        "## Evaluation",
        "",
        *_results_table(task_results),
        "",
        gate_markdown.rstrip("\n"),
        "",
    ]
    # By hand rather than ModelCard.from_template: same YAML, no Jinja2 template to keep in step.
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
