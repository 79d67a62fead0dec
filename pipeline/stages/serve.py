"""serve: load the export in the engine and generate: "it loaded" is not enough.

Greedy completions of fixed prompts, with load time and tokens/s; the parent
measures the peak RSS of the whole process tree (vLLM runs its engine in a grandchild).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline import engine


def _generate_vllm(model_dir: str, prompts: list[str], max_new_tokens: int, options: dict) -> tuple[list, float]:
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(**engine.llm_kwargs(model_dir, options))
    load_s = time.perf_counter() - started
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_new_tokens), use_tqdm=False)
    return [(output.outputs[0].text, len(output.outputs[0].token_ids)) for output in outputs], load_s


def _generate_transformers(model_dir: str, prompts: list[str], max_new_tokens: int, options: dict) -> tuple[list, float]:
    import torch

    started = time.perf_counter()
    model, tokenizer = engine.load_transformers_model(model_dir, options)
    load_s = time.perf_counter() - started
    tokenizer.padding_side = "left"  # batched greedy generation of prompts of different lengths
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    results = []
    for row in output[:, batch["input_ids"].shape[1]:]:
        tokens = [token for token in row.tolist() if token != tokenizer.pad_token_id]
        results.append((tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)))
    return results, load_s


def generate(model_dir: str, prompts: list[str], max_new_tokens: int, engine_options: dict, out_dir: str) -> dict:
    """Child-process job: returns load time, throughput and the completions (also in generations.json)."""
    engine.prepare_environment(engine_options)
    engine_name = engine_options.get("engine", "vllm")
    run = _generate_transformers if engine_name == "transformers" else _generate_vllm
    started = time.perf_counter()
    results, load_s = run(model_dir, prompts, max_new_tokens, engine_options)
    generate_s = time.perf_counter() - started - load_s
    completions = [
        {"prompt": prompt, "completion": text, "tokens": tokens} for prompt, (text, tokens) in zip(prompts, results)
    ]
    generated = sum(item["tokens"] for item in completions)
    summary = {
        "engine": engine_name,
        "engine_version": engine.engine_version(engine_name),
        "load_s": round(load_s, 2),
        "generate_s": round(generate_s, 2),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / generate_s, 1) if generate_s > 0 else None,
        "completions": completions,
    }
    Path(out_dir, "generations.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
