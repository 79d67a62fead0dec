#!/usr/bin/env bash
# GPU check (issue 11): the tiny model, fp8 and int8_per_channel, streaming and in-memory quantization on
# the GPU, served and evaluated by vLLM's GPU build. Run it on a GPU machine with network for pip:
#     make install ENGINE=vllm && bash bench/gpu_check.sh
# and record what it prints in docs/performance.md. CI never runs it (no GPU there).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT_DIR:-/tmp/qp-gpu-check}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$BIN/python" -c "import torch, importlib.metadata as m; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'vllm', m.version('vllm'))"
"$BIN/quantize-pipeline" prepare-model
for scheme in fp8 int8_per_channel; do
  for mode in streaming in_memory; do
    recipe="$OUT/gpu-$scheme-$mode.yaml"
    cat > "$recipe" <<YAML
name: gpu-check-$scheme-$mode
model: {source: "builtin:smollm2-135m-instruct"}
calibration: {samples: 32, max_seq_len: 256}
quantization: {scheme: $scheme, exclude: [lm_head], mode: $mode}
resources: {device: cuda}
evaluation: {engine: vllm, limit: 200}
YAML
    started=$(date +%s)
    set +e
    "$BIN/quantize-pipeline" run "$recipe" --new-run --output-dir "$OUT/exports" --json > "$OUT/$scheme-$mode.jsonl"
    code=$?
    set -e
    run_dir=$(tail -1 "$OUT/$scheme-$mode.jsonl" | "$BIN/python" -c "import json,sys; print(json.load(sys.stdin)['run_dir'])")
    echo "== $scheme $mode: exit $code in $(( $(date +%s) - started )) s, run $run_dir"
    "$BIN/python" - "$run_dir" <<'PY'
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
manifest = json.loads((run / "manifest.json").read_text())
for stage, record in manifest["stages"].items():
    print(f"   {stage:9s} {record.get('wall_s')} s  peak RSS {record.get('peak_rss_mb')} MiB")
report = run / "report.json"
if report.is_file():
    data = json.loads(report.read_text())
    print("   verdict", data["verdict"], "failed:", data["failed_rules"])
    print("   serve", {k: v for k, v in data.get("serve", {}).items() if k != "completions"})
PY
  done
done
