"""serve: load the export in vLLM and generate: "it loaded" is not enough.

Greedy completions of fixed prompts, with load time and tokens/s; the parent
measures the peak RSS of the whole vLLM process tree.
"""

from __future__ import annotations

import json
import time
from pathlib import Path


def generate(model_dir: str, prompts: list[str], max_new_tokens: int, engine_options: dict, out_dir: str) -> dict:
    """Child-process job: returns load time, throughput and the completions (also in generations.json)."""
    from pipeline import engine

    engine.prepare_environment(engine_options.get("offline", True))
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(**engine.llm_kwargs(model_dir, engine_options))
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
    generate_s = time.perf_counter() - started
    completions = [
        {"prompt": prompt, "completion": output.outputs[0].text, "tokens": len(output.outputs[0].token_ids)}
        for prompt, output in zip(prompts, outputs)
    ]
    generated = sum(item["tokens"] for item in completions)
    summary = {
        "engine": "vllm",
        "engine_version": engine.vllm_version(),
        "load_s": round(load_s, 2),
        "generate_s": round(generate_s, 2),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / generate_s, 1) if generate_s > 0 else None,
        "completions": completions,
    }
    Path(out_dir, "generations.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
