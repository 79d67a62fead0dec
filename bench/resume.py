"""Benchmark: a no-op resume of a finished run vs the full run that produced it.

    .venv/bin/python bench/resume.py RECIPE RUN_DIR

Runs `quantize-pipeline run RECIPE --resume RUN_DIR` (nothing changed, so every stage is
kept) and prints its wall time next to the sum of the original stages' wall times from
the manifest, and the ratio. Target: well under 2 s, dominated by hashing (size+mtime cache).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    recipe, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
    manifest = json.loads((run_dir / "manifest.json").read_text())
    full_s = sum(record["wall_s"] for record in manifest["stages"].values() if not record.get("reused"))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "quantize_pipeline.cli", "run", str(recipe), "--resume", str(run_dir), "-q"],
                          capture_output=True, text=True)
    resume_s = time.perf_counter() - started
    if done.returncode != 0:
        sys.exit(done.stderr)
    reused = [stage for stage, record in json.loads((run_dir / "manifest.json").read_text())["stages"].items()
              if record.get("reused")]
    print(f"full run (stage wall times): {full_s:8.1f} s")
    print(f"no-op resume (whole command): {resume_s:7.2f} s   ({len(reused)} stages kept)")
    print(f"ratio resume / full: {resume_s / full_s:.4f}")


if __name__ == "__main__":
    main()
