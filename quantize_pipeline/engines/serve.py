"""serve: generate with the loaded export: "it loaded" is not enough, and how fast it serves is measured.

Runs in the export's child on its already-loaded engine (evaluate uses the same load). Every
figure is timed after a warm-up request, around the engine's generate call alone, and says
what it includes (SERVING_FIGURES). Memory is sampled while generating, not over the load.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from quantize_pipeline.engines import Engine
from quantize_pipeline.engines.memory import PeakSampler

# The larger batch: this many copies of the recipe's prompts in one generate call.
BATCH_COPIES = 16
# tokens_per_s is the median of this many identical calls: one call on a shared machine is noisy.
REPEATS = 3

SERVING_FIGURES = {
    "import_s": "importing the engine's libraries (vLLM: `import vllm` and lm-eval's backend); not in load_s",
    "load_s": "building the loaded engine: weights, compilation/graph capture, KV cache, tokenizer; no imports",
    "warmup_s": "the first generate call (the recipe's prompts); excluded from every figure below",
    "ttft_s": "time to first token: median over the prompts of one generate call of one prompt and 1 new token "
              "(prefill plus one decode step)",
    "batch1_tokens_per_s": "generated tokens / seconds of one generate call per prompt (batch 1), summed over the "
                           "prompts; includes each prompt's prefill",
    "batch_tokens_per_s": "generated tokens / seconds of one generate call of `batch_size` requests "
                          f"({BATCH_COPIES} copies of the prompts); includes prefill",
    "tokens_per_s": f"generated tokens / seconds of one generate call of all the prompts (batch = number of prompts; "
                    f"the call that made `completions`), median of {REPEATS} calls; includes prefill",
    "peak_rss_mb": "peak host RSS of the engine's process tree (vLLM's engine core included), sampled every 50 ms "
                   "while the timed generate calls ran",
    "device_peak_mb": "peak accelerator memory in use while generating (vLLM: the whole device; transformers: torch's "
                      "max allocated); null on CPU",
}


@dataclass(frozen=True)
class ServingFigures:
    engine: str
    engine_version: str
    import_s: float
    load_s: float
    warmup_s: float
    ttft_s: float
    batch1_tokens_per_s: float
    batch_size: int
    batch_tokens_per_s: float
    generate_s: float
    generated_tokens: int
    tokens_per_s: float
    peak_rss_mb: float
    device_peak_mb: float | None
    completions: list[dict]
    definitions: dict


def timed_generate(engine: Engine, prompts: list[str], max_new_tokens: int):
    started = time.perf_counter()
    generations = engine.generate(prompts, max_new_tokens)
    return generations, time.perf_counter() - started


def serve(engine: Engine, engine_version: str, prompts: list[str], max_new_tokens: int, out_dir: Path) -> ServingFigures:
    """Completions of the prompts and the serving figures; writes generations.json."""
    _, warmup_s = timed_generate(engine, prompts, max_new_tokens)
    with PeakSampler(engine.device_memory_used_mb) as peak:
        repeats = [timed_generate(engine, prompts, max_new_tokens) for _ in range(REPEATS)]
        generations, generate_s = repeats[0][0], statistics.median(seconds for _, seconds in repeats)
        ttft_s = statistics.median(timed_generate(engine, [prompt], 1)[1] for prompt in prompts)
        single = [timed_generate(engine, [prompt], max_new_tokens) for prompt in prompts]
        batch = prompts * BATCH_COPIES
        batched, batch_s = timed_generate(engine, batch, max_new_tokens)
    generated = sum(item.tokens for item in generations)
    figures = ServingFigures(
        engine=engine.name, engine_version=engine_version,
        import_s=round(engine.import_s, 2), load_s=round(engine.load_s, 2), warmup_s=round(warmup_s, 2),
        ttft_s=round(ttft_s, 4),
        batch1_tokens_per_s=round(sum(out[0].tokens for out, _ in single) / sum(s for _, s in single), 1),
        batch_size=len(batch), batch_tokens_per_s=round(sum(item.tokens for item in batched) / batch_s, 1),
        generate_s=round(generate_s, 3), generated_tokens=generated, tokens_per_s=round(generated / generate_s, 1),
        peak_rss_mb=round(peak.rss_mb, 1),
        device_peak_mb=round(peak.device_mb, 1) if peak.device_mb is not None else None,
        completions=[{"prompt": prompt, "completion": item.text, "tokens": item.tokens}
                     for prompt, item in zip(prompts, generations)],
        definitions=SERVING_FIGURES,
    )
    (Path(out_dir) / "generations.json").write_text(json.dumps(asdict(figures), indent=2) + "\n")
    return figures
