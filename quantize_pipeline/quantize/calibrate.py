"""calibrate: tokenize N calibration samples and save them with their hash."""

from __future__ import annotations

import json
import random
from pathlib import Path

from quantize_pipeline.quantize.corpora import read_hub_dataset, read_texts, resolve_text_source
from quantize_pipeline.recipe.schema import Recipe
from quantize_pipeline.run.rundir import sha256_file

TOKENS_FILE = "tokens.jsonl"


def calibrate(recipe: Recipe, model_dir: Path, out_dir: Path) -> dict:
    """Write tokens.jsonl (one list of token ids per sample) and return its summary."""
    from tokenizers import Tokenizer  # the fast tokenizer alone: no torch needed here

    spec = recipe.calibration
    if spec.source.startswith("hf:"):
        texts = read_hub_dataset(spec.source[3:], spec.subset, spec.split, spec.text_field)
    else:
        texts = read_texts(resolve_text_source(spec.source), spec.text_field)
    rng = random.Random(spec.seed)
    chosen = rng.sample(texts, k=min(spec.samples, len(texts)))
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(spec.max_seq_len)
    encoded = [tokenizer.encode(text).ids for text in chosen]
    tokens_path = out_dir / TOKENS_FILE
    with open(tokens_path, "w", encoding="utf-8") as handle:
        for ids in encoded:
            handle.write(json.dumps(ids) + "\n")
    return {
        "source": spec.source,
        "samples": len(encoded),
        "samples_requested": spec.samples,
        "tokens": sum(len(ids) for ids in encoded),
        "max_seq_len": spec.max_seq_len,
        "tokens_sha256": sha256_file(tokens_path),
    }


def load_token_batches(calibrate_dir: Path) -> list[list[int]]:
    lines = (calibrate_dir / TOKENS_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]
