#!/usr/bin/env bash
# GPU smoke benchmark: QLoRA training with bitsandbytes' CUDA kernels in bf16, on
#   1. the tiny GLM-4.5-Air model (configs/tiny.yaml), and
#   2. a mid-size GLM-4.5-Air-architecture model generated locally (bench/midmodel.py:
#      hidden 1024, 12 layers, 64 experts of 512, 1.17 B parameters, random weights).
# For each: tokens/s (median over the steps after warm-up, from training_log.jsonl), peak GPU
# memory (gpu_mem_peak = torch.cuda.max_memory_allocated) and MFU, with the FLOPs per token
# written out in bench/mfu.py (model FLOPs = 4N + 3A for a frozen 4-bit base, not 6N).
# Results: bench/results/gpu_smoke.json.
#
#   bench/gpu_smoke.sh                      # on a CUDA machine
#   STEPS=40 MID_SEQ=4096 bench/gpu_smoke.sh
#   PEAK_TFLOPS=756 bench/gpu_smoke.sh      # override the datasheet peak (here: H100 PCIe)
#   ALLOW_CPU=1 STEPS=4 MID_ARGS="--layers 2 --experts 4 --hidden 256 --moe-intermediate 128 --intermediate 512" \
#     TINY_SEQ=128 MID_SEQ=128 bench/gpu_smoke.sh   # plumbing check without a GPU (numbers meaningless)
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-.venv/bin/python}
STEPS=${STEPS:-30}
SKIP=${SKIP:-5}
TINY_SEQ=${TINY_SEQ:-1024}
TINY_MB=${TINY_MB:-4}
MID_SEQ=${MID_SEQ:-2048}
MID_MB=${MID_MB:-4}
MID_ARGS=${MID_ARGS:-}
MID_DIR=${MID_DIR:-scratch/bench-mid-gpu}
WORK=${WORK:-scratch/gpu-smoke}
OUT=${OUT:-bench/results/gpu_smoke.json}
ALLOW_CPU=${ALLOW_CPU:-0}
KEEP=${KEEP:-0}

abspath() {  # the kit resolves relative paths against the config file's folder, so pass absolute ones
  case $1 in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$ROOT/$1" ;;
  esac
}
MID_DIR=$(abspath "$MID_DIR")
WORK=$(abspath "$WORK")
TINY_DIR=$ROOT/models/tiny-glm4-moe

peak_args=()
if [[ -n "${PEAK_TFLOPS:-}" ]]; then
  peak_args=(--peak-tflops "$PEAK_TFLOPS")
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [[ "$ALLOW_CPU" != "1" ]]; then
    echo "gpu_smoke: no CUDA device; this benchmark needs a GPU (ALLOW_CPU=1 checks the plumbing only)" >&2
    exit 2
  fi
  echo "gpu_smoke: no CUDA device, running on the CPU because ALLOW_CPU=1: the numbers mean nothing" >&2
fi

rm -rf "$WORK"
mkdir -p "$WORK" "$(dirname "$OUT")"
rm -f "$OUT"

# Where and with what it ran, first (the report merges each run into the same file).
"$PY" - "$OUT" <<'EOF'
import json, subprocess, sys
import torch
out = sys.argv[1]
info = {"torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
try:
    import bitsandbytes
    info["bitsandbytes"] = bitsandbytes.__version__
except ImportError:
    pass
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        check=False).stdout.strip()
except OSError:
    info["nvidia_smi"] = None
with open(out, "w") as fh:
    json.dump({"benchmark": "gpu_smoke", "machine": info, "runs": {}}, fh, indent=2)
EOF

"$PY" -c "import sys; sys.path.insert(0, 'bench'); import benchlib; benchlib.ensure_tiny_assets()"

common=(--set quantization.compute_dtype=bfloat16
        --set training.max_steps="$STEPS"
        --set training.val_fraction=0.01
        --set logging.eval_interval=1000000
        --set logging.checkpoint_interval=1000000
        --set performance.tf32=true)

train() {  # name model_dir seq micro_batch
  local name=$1 model_dir=$2 seq=$3 mb=$4
  echo "== $name: $model_dir, $mb x $seq tokens per micro-batch, $STEPS steps, bf16 compute"
  "$PY" train_qlora.py --config configs/tiny.yaml "${common[@]}" \
    --set paths.model_dir="$model_dir" \
    --set paths.output_dir="$WORK/$name" \
    --set paths.best_adapter_dir="$WORK/$name-best" \
    --set training.max_seq_length="$seq" \
    --set optimization.micro_batch_per_gpu="$mb" \
    --set optimization.grad_accum_steps=1
  "$PY" bench/mfu.py report --name "$name" --log "$WORK/$name/logs/training_log.jsonl" \
    --model-dir "$model_dir" --seq-len "$seq" --skip-steps "$SKIP" --out "$OUT" "${peak_args[@]}"
}

train tiny "$TINY_DIR" "$TINY_SEQ" "$TINY_MB"

# shellcheck disable=SC2086  # MID_ARGS is a list of flags on purpose
"$PY" bench/midmodel.py "$MID_DIR" $MID_ARGS > "$WORK/mid-model.json"
train mid "$MID_DIR" "$MID_SEQ" "$MID_MB"

if [[ "$KEEP" != "1" ]]; then
  rm -rf "$MID_DIR" "$WORK"
fi
echo "wrote $OUT"
