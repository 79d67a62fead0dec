"""Streaming with a calibration boundary of GiBs, through `run` (issue #26): plan's streaming peak vs the measured one.

A wide, shallow synthetic model (bench/synthetic_llama.py `wide-2layers`: hidden 8192, two small layers, the
default model's tokenizer) and a calibration of 100 texts of 1024 tokens (the shipped Wikipedia paragraphs joined)
in float32: a boundary of 100 x 1024 x 8192 x 4 bytes = 3.1 GiB, the largest thing the run holds, saved after each
layer for a resume. `quantize-pipeline run --until verify` runs calibrate, quantize (streaming, fp8), freeze,
export and verify; the quantize stage's peak RSS (the child's, from the run's manifest) is compared with `plan`.

    .venv/bin/python bench/large_boundary.py [--work /var/tmp/qp-wide]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from synthetic_llama import write_checkpoint  # noqa: E402

GIB = 2**30
SAMPLES, SEQ_LEN = 100, 1024


def long_texts(tokenizer_json: Path, out: Path) -> int:
    """The shipped Wikipedia paragraphs joined into texts of at least SEQ_LEN tokens; returns how many."""
    from tokenizers import Tokenizer

    from quantize_pipeline.quantize.corpora import read_texts, resolve_text_source

    tokenizer = Tokenizer.from_file(str(tokenizer_json))
    texts, current = [], []
    for paragraph in read_texts(resolve_text_source("wikipedia")):
        current.append(paragraph)
        if len(tokenizer.encode("\n\n".join(current)).ids) >= SEQ_LEN:
            texts.append("\n\n".join(current))
            current = []
    with open(out, "w", encoding="utf-8") as handle:
        for text in texts:
            handle.write(json.dumps({"text": text}) + "\n")
    return len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/qp-wide"))
    args = parser.parse_args()
    from quantize_pipeline.recipe.models import cache_root

    tokenizer_dir = next((cache_root() / "models").glob("smollm2-135m-instruct-*"))  # make prepare-model's
    model_dir = args.work / "model"
    write_checkpoint("wide-2layers", model_dir, tokenizer_from=tokenizer_dir)
    texts = long_texts(model_dir / "tokenizer.json", args.work / "long-texts.jsonl")
    if texts < SAMPLES:
        raise SystemExit(f"only {texts} texts of {SEQ_LEN} tokens")
    recipe = args.work / "large-boundary.yaml"
    recipe.write_text(json.dumps({
        "name": "large-boundary", "model": {"source": str(model_dir), "dtype": "float32"},
        "calibration": {"source": str(args.work / "long-texts.jsonl"), "samples": SAMPLES, "max_seq_len": SEQ_LEN},
        "quantization": {"scheme": "fp8", "exclude": ["lm_head"], "mode": "streaming"},
        "evaluation": {"engine": "auto"},  # vLLM CPU cannot serve fp8; not reached (--until verify)
    }))
    runs = args.work / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    cli = [sys.executable, "-m", "quantize_pipeline.cli"]
    subprocess.run([*cli, "run", str(recipe), "--until", "verify", "--output-dir", str(runs), "-q"], check=True)
    planned = json.loads(subprocess.run([*cli, "plan", str(recipe), "--json"], check=True, capture_output=True,
                                        text=True).stdout)
    manifest = json.loads(next(runs.glob("large-boundary/*/manifest.json")).read_text())
    quantize = manifest["stages"]["quantize"]
    measured = quantize["peak_rss_mb"] * 2**20
    estimate = planned["quantize_peaks_bytes"]["streaming"]["host"]
    summary = quantize.get("summary", {})
    print(f"boundary {SAMPLES} x {SEQ_LEN} x 8192 x 4 B = {SAMPLES * SEQ_LEN * 8192 * 4 / GIB:.2f} GiB; "
          f"quantize stage {quantize.get('wall_s', 0):.1f} s (state save {summary.get('state_save_s', '?')} s)")
    print(f"streaming peak: measured {measured / GIB:.2f} GiB, plan {estimate / GIB:.2f} GiB, "
          f"plan / measured {estimate / measured:.2f} (target within 0.75-1.25)")


if __name__ == "__main__":
    main()
