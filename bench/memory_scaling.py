"""Peak memory and wall time of the quantize stage vs checkpoint size, streaming and in-memory.

Synthetic Llama checkpoints (bench/synthetic_llama.py: published shapes, random bf16 weights, written
shard by shard) from 135M to one larger than this machine's memory (14B: ~29.5 GB of bf16), quantized
with `fp8` (static per-tensor calibration) and `int8_per_channel`, lm_head excluded, in both modes where
plan says in-memory fits the host budget. Each quantization is one child process (imports + reading the
weights + calibration + quantize + freeze + export): its peak RSS is that of the whole process tree,
sampled by quantize_pipeline.run.worker as for every stage. Every export is checked with `verify`. Prints one table
(and writes JSON + a PNG) with the ratio of each peak to the checkpoint size and to plan's estimate.

    .venv/bin/python bench/memory_scaling.py [--shapes 135m,1b,3b,8b,14b] [--schemes fp8,int8_per_channel]
        [--samples 8 --seq-len 128] [--work /var/tmp/qp-memory-scaling] [--out docs]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))  # quantize_pipeline itself comes from the venv (make install)

from synthetic_llama import SHAPES, make_config, write_checkpoint  # noqa: E402

GIB = 2**30


def quantize_job(recipe: dict, model_dir: str, calibrate_dir: str, out_root: str, mode: str) -> dict:
    """Child-process job: quantize -> freeze -> export one checkpoint in one mode; stage records."""
    from quantize_pipeline.quantize.calibrate import load_token_batches
    from quantize_pipeline.recipe.schema import Recipe

    out = Path(out_root)
    out_dirs = {stage: str(out / stage) for stage in ("quantize", "freeze", "model")}
    for folder in out_dirs.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    if mode == "streaming":
        from quantize_pipeline.quantize.streaming import stream_quantize

        return stream_quantize(Recipe.model_validate(recipe), Path(model_dir),
                               load_token_batches(Path(calibrate_dir)), out_dirs)
    from quantize_pipeline.quantize.stage import quantize_freeze_export

    return quantize_freeze_export(recipe, model_dir, calibrate_dir, out_dirs)


def _recipe(model_dir: Path, scheme: str, mode: str, samples: int, seq_len: int):
    from quantize_pipeline.recipe.schema import Recipe

    return Recipe.model_validate({
        "name": f"bench-{model_dir.name}-{scheme}",
        "model": {"source": str(model_dir)},
        "calibration": {"samples": samples, "max_seq_len": seq_len},
        "quantization": {"scheme": scheme, "exclude": ["lm_head"], "mode": mode},
    })


def _calibration_tokens(folder: Path, vocab_size: int, samples: int, seq_len: int) -> Path:
    """Random token ids (the weights are random too): what calibrate writes, tokens.jsonl."""
    from quantize_pipeline.quantize.calibrate import TOKENS_FILE

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(folder / TOKENS_FILE, "w") as handle:
        for _ in range(samples):
            handle.write(json.dumps([rng.randrange(vocab_size) for _ in range(seq_len)]) + "\n")
    return folder


def measure(shape: str, scheme: str, mode: str, model_dir: Path, work: Path, samples: int, seq_len: int) -> dict:
    from quantize_pipeline.recipe import checks, plan
    from quantize_pipeline.run.worker import call_isolated
    from quantize_pipeline.verify import verify

    recipe = _recipe(model_dir, scheme, mode, samples, seq_len)
    calibrate_dir = _calibration_tokens(work / "calibrate", SHAPES[shape]["vocab_size"], samples, seq_len)
    out_root = work / f"{shape}-{scheme}-{mode}"
    shutil.rmtree(out_root, ignore_errors=True)
    started = time.perf_counter()
    records, peak_mb = call_isolated(
        "memory_scaling:quantize_job",
        {"recipe": recipe.model_dump(mode="json"), "model_dir": str(model_dir), "calibrate_dir": str(calibrate_dir),
         "out_root": str(out_root), "mode": mode},
        log_path=work / "logs" / f"{out_root.name}.log", stage="quantize",
    )
    wall_s = time.perf_counter() - started
    linear = checks.weight_layer_names(model_dir)
    (out_root / "verify").mkdir(exist_ok=True)
    try:
        verified = verify.verify(recipe, model_dir, out_root / "model", linear, out_root / "verify")["passed"]
    except Exception as exc:  # a verify failure is a result of the benchmark, printed in the table
        verified = f"FAILED: {exc}"
    estimate = plan.make_plan(recipe, model_dir / "config.json", device="cpu").quantize_peaks[mode]["host"]
    shutil.rmtree(out_root / "model", ignore_errors=True)  # exports of the large shapes fill the disk
    checkpoint = sum(path.stat().st_size for path in model_dir.glob("*.safetensors"))
    return {
        "shape": shape, "scheme": scheme, "mode": mode, "checkpoint_bytes": checkpoint,
        "peak_rss_bytes": int(peak_mb * 2**20), "wall_s": round(wall_s, 1),
        "stage_wall_s": {stage: round(record["wall_s"], 1) for stage, record in records.items()},
        "plan_estimate_bytes": estimate, "verify": verified, "samples": samples, "seq_len": seq_len,
    }


def _in_memory_fits(model_dir: Path, scheme: str, samples: int, seq_len: int) -> bool:
    from quantize_pipeline.recipe import plan

    result = plan.make_plan(_recipe(model_dir, scheme, "auto", samples, seq_len), model_dir / "config.json", device="cpu")
    return result.quantize_peaks["in_memory"]["host"] <= result.host_budget_bytes


def table(rows: list[dict]) -> str:
    lines = ["| shape | checkpoint GiB | scheme | mode | peak RSS GiB | peak / checkpoint | plan estimate GiB | "
             "measured / estimate | wall s | verify |", "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        size, peak, estimate = row["checkpoint_bytes"], row["peak_rss_bytes"], row["plan_estimate_bytes"]
        lines.append(
            f"| {row['shape']} | {size / GIB:.2f} | {row['scheme']} | {row['mode']} | {peak / GIB:.2f} | "
            f"{peak / size:.2f} | {estimate / GIB:.2f} | {peak / estimate:.2f} | {row['wall_s']} | {row['verify']} |"
        )
    return "\n".join(lines)


def ratios(rows: list[dict]) -> list[str]:
    """Streaming wall time over in-memory's where both ran (target <= 1.3)."""
    found = []
    for row in rows:
        if row["mode"] != "streaming":
            continue
        twin = next((other for other in rows if other["mode"] == "in_memory" and other["shape"] == row["shape"]
                     and other["scheme"] == row["scheme"]), None)
        if twin is not None:
            found.append(f"{row['shape']} {row['scheme']}: streaming / in-memory wall time "
                         f"{row['wall_s'] / twin['wall_s']:.2f}, peak RSS {row['peak_rss_bytes'] / twin['peak_rss_bytes']:.2f}")
    return found


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for mode, marker in (("streaming", "o-"), ("in_memory", "s--")):
        for scheme in sorted({row["scheme"] for row in rows}):
            points = sorted((row["checkpoint_bytes"] / GIB, row["peak_rss_bytes"] / GIB) for row in rows
                            if row["mode"] == mode and row["scheme"] == scheme)
            if points:
                axis.plot(*zip(*points), marker, label=f"{mode} {scheme}")
    axis.set_xlabel("checkpoint size (GiB of bf16)")
    axis.set_ylabel("peak RSS of the quantize process tree (GiB)")
    axis.set_title("quantize stage: peak memory vs model size (2-core CPU)")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def reestimate(rows: list[dict], samples: int, seq_len: int) -> None:
    """plan's estimates recomputed for measured rows (from the shapes' configs alone, no weights)."""
    import tempfile

    from quantize_pipeline.recipe import plan

    with tempfile.TemporaryDirectory() as folder:
        for row in rows:
            config_dir = Path(folder) / row["shape"]
            make_config(row["shape"]).save_pretrained(config_dir)
            recipe = _recipe(config_dir, row["scheme"], row["mode"], samples, seq_len)
            row["plan_estimate_bytes"] = plan.make_plan(recipe, config_dir / "config.json", device="cpu").quantize_peaks[
                row["mode"]]["host"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="135m,1b,3b,8b,14b")
    parser.add_argument("--schemes", default="fp8,int8_per_channel")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/qp-memory-scaling"))
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep the synthetic checkpoints (disk!)")
    parser.add_argument("--report-only", action="store_true",
                        help="print the table of OUT/memory_scaling.json again, with plan's current estimates")
    args = parser.parse_args()
    if args.report_only:
        rows = json.loads((args.out / "memory_scaling.json").read_text())
        reestimate(rows, args.samples, args.seq_len)
        (args.out / "memory_scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
        plot(rows, args.out / "memory_scaling.png")
        print(table(rows))
        for line in ratios(rows):
            print(line)
        return
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")]))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"calibration: {args.samples} samples x {args.seq_len} random tokens; machine: {os.cpu_count()} CPUs, "
          f"{__import__('psutil').virtual_memory().total / GIB:.1f} GiB", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        model_dir = args.work / f"synthetic-{shape}"
        started = time.perf_counter()
        written = write_checkpoint(shape, model_dir)
        print(f"{shape}: checkpoint {written['bytes'] / GIB:.2f} GiB in {written['shards']} shards "
              f"({time.perf_counter() - started:.0f} s to write or find)", flush=True)
        for scheme in args.schemes.split(","):
            modes = ["streaming"] + (["in_memory"] if _in_memory_fits(model_dir, scheme, args.samples, args.seq_len) else [])
            for mode in modes:
                row = measure(shape, scheme, mode, model_dir, args.work, args.samples, args.seq_len)
                rows.append(row)
                # After every row: a long run stopped early keeps what it measured (--report-only prints it).
                (args.out / "memory_scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
                print(f"  {scheme:17s} {mode:9s} peak {row['peak_rss_bytes'] / GIB:6.2f} GiB  wall {row['wall_s']:7.1f} s"
                      f"  plan {row['plan_estimate_bytes'] / GIB:6.2f} GiB  verify {row['verify']}", flush=True)
            if len(modes) == 1:
                print(f"  {scheme:17s} in_memory skipped: plan's estimate exceeds this machine's budget", flush=True)
        if not args.keep_checkpoints:
            shutil.rmtree(model_dir, ignore_errors=True)
    (args.out / "memory_scaling.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(rows, args.out / "memory_scaling.png")
    print()
    print(table(rows))
    for line in ratios(rows):
        print(line)


if __name__ == "__main__":
    main()
