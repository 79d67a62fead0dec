"""This pipeline against llm-compressor's model-free path and the disk, on one checkpoint larger than memory.

One sitting, one after the other, on a synthetic checkpoint (bench/synthetic_llama.py; default the 14B shape,
~27.5 GiB of bf16, more than this machine's memory), each row timed around exactly what it names:

- read + write: every shard read once and the same number of bytes written to a new file (fsync'd): the disk's
  floor for any file-to-file job;
- this pipeline, data-free `int8_per_channel` (lm_head kept): `quantize_freeze_export` in a child process, as
  `run` calls it (its imports, reading, quantizing, writing, config): wall of the child call, peak RSS of its tree;
- llm-compressor `model_free_ptq(scheme="W8A8", ignore=["lm_head"], max_workers=2, device="cpu")`, the same
  job (int8 weights per channel, int8 activations per token at run time), in a peer virtualenv built once
  from PyPI (`torch==2.13.0`, then `llmcompressor==0.14.0.1`): wall of the child process, peak RSS of its tree;
- this pipeline, calibrated `fp8` in streaming mode (static activation scales, 8 x 128 random tokens).

Every row starts with the checkpoint out of the page cache (`cold`: what an earlier row read or wrote does not
help or hinder the next, whatever the order). Each export of ours is checked by `verify`; every export is removed
after its row (disk). Prints a table, the ratios the issue sets targets for, and plan's estimate next to each
measured peak; writes JSON.

    .venv/bin/python bench/scale_vs_peers.py [--shape 14b] [--work /var/tmp/qp-scale] [--out bench/data]
        [--peer-venv /var/tmp/qp-peer-venv] [--rows read_write,data_free,peer,fp8_streaming]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))  # quantize_pipeline itself comes from the venv (make install)

from memory_scaling import _calibration_tokens  # noqa: E402
from synthetic_llama import SHAPES, write_checkpoint  # noqa: E402

GIB = 2**30
PEER_REQUIREMENTS = (["torch==2.13.0"], ["llmcompressor==0.14.0.1"])
PEER_JOB = """
import sys
from llmcompressor import model_free_ptq
model_free_ptq(model_stub=sys.argv[1], save_directory=sys.argv[2], scheme="W8A8", ignore=["lm_head"],
               max_workers=2, device="cpu")
"""


def peer_python(venv: Path) -> Path:
    """The peer virtualenv's python, built once (pip: torch first, so that llmcompressor takes the CPU wheel)."""
    python = venv / "bin" / "python"
    if not python.is_file() or subprocess.run([str(python), "-c", "import llmcompressor"], capture_output=True).returncode:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for requirement in PEER_REQUIREMENTS:
            subprocess.run([str(python), "-m", "pip", "install", "-q", *requirement], check=True)
    return python


def _timed_process(command: list[str], log: Path) -> tuple[float, int, int]:
    """(wall seconds, peak RSS of the process tree in bytes, exit code), sampling the tree every 0.2 s."""
    from quantize_pipeline.run.worker import tree_rss_bytes

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        peak = 0
        while process.poll() is None:
            peak = max(peak, tree_rss_bytes(process.pid))
            time.sleep(0.2)
        return time.perf_counter() - started, peak, process.returncode


def cold(model_dir: Path) -> None:
    """The checkpoint's pages dropped from the page cache (dirty ones written first): the next row reads it from
    the disk, as a first run after a download does. posix_fadvise needs no privileges; pages another process maps
    stay."""
    os.sync()
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(descriptor)


def read_write(model_dir: Path, work: Path) -> dict:
    """Every shard read in 64 MiB chunks and the same bytes written, fsync'd, into a file rewritten from its start
    every 4 GiB (a second copy of a checkpoint larger than the free disk would not fit beside it)."""
    target = work / "read-write.bin"
    chunk, rewind = 64 * 2**20, 4 * GIB
    total = 0
    started = time.perf_counter()
    with open(target, "wb") as out:
        for shard in sorted(model_dir.glob("*.safetensors")):
            with open(shard, "rb") as handle:
                while block := handle.read(chunk):
                    out.write(block)
                    total += len(block)
                    if out.tell() >= rewind:
                        out.flush()
                        os.fsync(out.fileno())
                        out.seek(0)
        out.flush()
        os.fsync(out.fileno())
    wall = time.perf_counter() - started
    target.unlink()
    return {"row": "read_write", "wall_s": round(wall, 1), "bytes": total, "peak_rss_bytes": None,
            "what": "read every shard + write the same bytes (a 4 GiB file rewritten), fsync"}


def _recipe(model_dir: Path, scheme: str, mode: str, samples: int, seq_len: int):
    """In the checkpoint's bf16, as the peer keeps it (auto would compute in float32 on CPUs without bf16)."""
    from quantize_pipeline.recipe.schema import Recipe

    return Recipe.model_validate({
        "name": f"scale-{model_dir.name}-{scheme}", "model": {"source": str(model_dir), "dtype": "bfloat16"},
        "calibration": {"samples": samples, "max_seq_len": seq_len},
        "quantization": {"scheme": scheme, "exclude": ["lm_head"], "mode": mode},
    })


def ours(model_dir: Path, work: Path, shape: str, scheme: str, mode: str, samples: int = 8, seq_len: int = 128) -> dict:
    from quantize_pipeline.recipe import checks, plan
    from quantize_pipeline.run.worker import call_isolated
    from quantize_pipeline.verify import verify

    recipe = _recipe(model_dir, scheme, mode, samples, seq_len)
    calibrate_dir = _calibration_tokens(work / "calibrate", SHAPES[shape]["vocab_size"], samples, seq_len)
    out_root = work / f"ours-{scheme}-{mode}"
    shutil.rmtree(out_root, ignore_errors=True)
    out_dirs = {stage: out_root / stage for stage in ("quantize", "freeze", "model")}
    for folder in out_dirs.values():
        folder.mkdir(parents=True)
    started = time.perf_counter()
    records, peak_mb = call_isolated(
        "quantize_pipeline.quantize.stage:quantize_freeze_export",
        {"recipe": recipe.model_dump(mode="json"), "model_dir": str(model_dir), "calibrate_dir": str(calibrate_dir),
         "out_dirs": {name: str(path) for name, path in out_dirs.items()}},
        log_path=work / "logs" / f"{out_root.name}.log", stage="quantize")
    wall = time.perf_counter() - started
    (out_root / "verify").mkdir()
    try:
        linear = checks.weight_layer_names(model_dir)
        verified = verify.verify(recipe, model_dir, out_dirs["model"], linear, out_root / "verify")["passed"]
    except Exception as exc:  # a result of the benchmark, printed in the table
        verified = f"FAILED: {exc}"
    summary = records["quantize"]["summary"]
    estimate = plan.make_plan(recipe, model_dir / "config.json", device="cpu").quantize_peaks[summary["mode"]]["host"]
    shutil.rmtree(out_root, ignore_errors=True)
    return {"row": f"{scheme} {summary['mode']}", "wall_s": round(wall, 1), "peak_rss_bytes": int(peak_mb * 2**20),
            "plan_estimate_bytes": estimate, "verify": verified,
            "stage_wall_s": {stage: round(record["wall_s"], 1) for stage, record in records.items()},
            # data-free: quantize_s is the main thread's quantizing and copying; read_wait_s its waits on the
            # reader thread; write_s the writer thread's (overlapped) writing; total: the function, no imports.
            "data_free_s": {key: summary[key] for key in ("read_wait_s", "write_s") if key in summary}
            | ({"total": round(records["quantize"]["total_wall_s"], 1)} if "total_wall_s" in records["quantize"] else {}),
            # streaming: seconds summed over the layers (quantize/streaming.py StreamTotals): waits on the read-ahead
            # thread, Quark's calibration, freeing layers, the writer thread's writes and the waits on them.
            "streaming_s": summary.get("seconds"),
            "what": "quantize_freeze_export in a child: imports, read, quantize, write, config"}


def peer(model_dir: Path, work: Path, venv: Path) -> dict:
    python = peer_python(venv)
    out = work / "peer-w8a8"
    shutil.rmtree(out, ignore_errors=True)
    wall, peak, code = _timed_process([str(python), "-c", PEER_JOB, str(model_dir), str(out)],
                                      work / "logs" / "peer-w8a8.log")
    written = sum(path.stat().st_size for path in out.glob("*.safetensors")) if out.is_dir() else 0
    shutil.rmtree(out, ignore_errors=True)
    return {"row": "llm-compressor model_free_ptq W8A8", "wall_s": round(wall, 1), "peak_rss_bytes": peak,
            "exit_code": code, "export_bytes": written,
            "what": "python -c model_free_ptq(...) in the peer venv: imports, read, quantize, write"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="14b")
    parser.add_argument("--work", type=Path, default=Path("/var/tmp/qp-scale"))
    parser.add_argument("--out", type=Path, default=BENCH / "data")
    parser.add_argument("--peer-venv", type=Path, default=Path("/var/tmp/qp-peer-venv"))
    parser.add_argument("--rows", default="read_write,data_free,peer,fp8_streaming")
    parser.add_argument("--keep-checkpoint", action="store_true")
    args = parser.parse_args()
    import psutil

    args.work.mkdir(parents=True, exist_ok=True)
    model_dir = args.work / f"synthetic-{args.shape}"
    started = time.perf_counter()
    written = write_checkpoint(args.shape, model_dir)
    print(f"{args.shape}: {written['bytes'] / GIB:.2f} GiB in {written['shards']} shards "
          f"({time.perf_counter() - started:.0f} s to write or find); machine: {os.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / GIB:.1f} GiB", flush=True)
    rows = []
    for name in args.rows.split(","):
        cold(model_dir)
        if name == "read_write":
            row = read_write(model_dir, args.work)
        elif name == "data_free":
            row = ours(model_dir, args.work, args.shape, "int8_per_channel", "auto")
        elif name == "peer":
            row = peer(model_dir, args.work, args.peer_venv)
        elif name == "fp8_streaming":
            row = ours(model_dir, args.work, args.shape, "fp8", "streaming")
        else:
            raise SystemExit(f"--rows: unknown row {name!r}")
        rows.append(row)
        peak = f"{row['peak_rss_bytes'] / GIB:6.2f} GiB" if row.get("peak_rss_bytes") else "     -    "
        plan_peak = f"  plan {row['plan_estimate_bytes'] / GIB:.2f} GiB" if row.get("plan_estimate_bytes") else ""
        print(f"  {row['row']:36s} wall {row['wall_s']:7.1f} s  peak {peak}{plan_peak}"
              f"  {('verify ' + str(row['verify'])) if 'verify' in row else ''}", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"scale_vs_peers_{args.shape}.json").write_text(json.dumps(
            {"shape": args.shape, "checkpoint_bytes": written["bytes"], "rows": rows}, indent=2) + "\n")
    by_name = {row["row"]: row for row in rows}
    data_free = by_name.get("int8_per_channel data_free")
    if data_free:
        if (peer_row := by_name.get("llm-compressor model_free_ptq W8A8")):
            print(f"data-free / llm-compressor: {data_free['wall_s'] / peer_row['wall_s']:.2f} (target <= 0.5)")
        if (disk := by_name.get("read_write")):
            print(f"data-free / read+write: {data_free['wall_s'] / disk['wall_s']:.2f}")
        if (fp8 := by_name.get("fp8 streaming")):
            print(f"calibrated fp8 streaming / data-free: {fp8['wall_s'] / data_free['wall_s']:.2f} (target <= 1.5)")
        print(f"data-free peak RSS: {data_free['peak_rss_bytes'] / GIB:.2f} GiB (target <= 4)")
    for row in rows:
        if row.get("plan_estimate_bytes") and row.get("peak_rss_bytes"):
            print(f"plan / measured peak, {row['row']}: {row['plan_estimate_bytes'] / row['peak_rss_bytes']:.2f} "
                  "(target within 0.75-1.25)")
    if not args.keep_checkpoint:
        shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
