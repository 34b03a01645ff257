#!/usr/bin/env bash
# GPU measurement of the fast path, on a mid-size GLM-4.5-Air-architecture model generated
# locally (bench/midmodel.py: hidden 1024, 12 layers, 64 experts of 512, 1.17 B parameters,
# random weights), 4-bit, LoRA on q/k/v/o, bf16 compute:
#   1. per layer (bench/gpu_layers.py): attention with sdpa's block mask vs varlen, the MoE
#      block (grouped_mm experts reading 4-bit weights) and the dequantization alone, the
#      full-vocabulary vs the chunked loss: median ms and peak memory;
#   2. whole training steps through train_qlora.py, varlen and sdpa: tokens/s (median after
#      warm-up), peak memory and MFU (bench/mfu.py: model FLOPs = 4N + 3A for a frozen base);
#   3. the largest micro-batch that fits in FIT_GB, probed (bench/gpu_fit.py), against the
#      memory plan's max_micro_batch_per_gpu.
# Results: bench/results/gpu_smoke.json (machine, then runs.layers, runs.step_varlen,
# runs.step_sdpa, runs.fit).
#
#   bench/gpu_smoke.sh                          # on a CUDA machine
#   STEPS=40 MID_SEQ=4096 MID_MB=4 bench/gpu_smoke.sh
#   PEAK_TFLOPS=756 bench/gpu_smoke.sh          # override the datasheet peak (here: H100 PCIe)
#   DRY=1 bench/gpu_smoke.sh                    # end to end on the CPU at toy sizes: checks the plumbing only
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
PY=${PYTHON:-.venv/bin/python}
DRY=${DRY:-0}

# ---- sizes: the real measurement, or the CPU dry run ------------------------------------------
if [[ "$DRY" == "1" ]]; then
  STEPS=${STEPS:-3}
  SKIP=${SKIP:-1}
  MID_SEQ=${MID_SEQ:-256}
  MID_MB=${MID_MB:-2}
  MID_ARGS=${MID_ARGS:---layers 2 --experts 4 --hidden 128 --moe-intermediate 64 --intermediate 256 --heads 4 --kv-heads 2 --head-dim 32 --top-k 2}
  REPS=${REPS:-2}
  FIT_GB=${FIT_GB:-4}
  OUT=${OUT:-scratch/gpu-smoke-dry.json}
  MID_DIR=${MID_DIR:-scratch/bench-mid-dry}
else
  STEPS=${STEPS:-30}
  SKIP=${SKIP:-5}
  MID_SEQ=${MID_SEQ:-4096}
  MID_MB=${MID_MB:-4}
  MID_ARGS=${MID_ARGS:-}
  REPS=${REPS:-10}
  FIT_GB=${FIT_GB:-24}
  OUT=${OUT:-bench/results/gpu_smoke.json}
  MID_DIR=${MID_DIR:-scratch/bench-mid-gpu}
fi
WORK=${WORK:-scratch/gpu-smoke}
KEEP=${KEEP:-0}
DATA=${DATA:-}  # the corpus the whole steps train on; empty: configs/tiny.yaml's (the full demo corpus)

abspath() {  # the kit resolves relative paths against the config file's folder, so pass absolute ones
  case $1 in
    /*) printf '%s\n' "$1" ;;
    *) printf '%s\n' "$ROOT/$1" ;;
  esac
}
MID_DIR=$(abspath "$MID_DIR")
WORK=$(abspath "$WORK")
OUT=$(abspath "$OUT")

peak_args=()
if [[ -n "${PEAK_TFLOPS:-}" ]]; then
  peak_args=(--peak-tflops "$PEAK_TFLOPS")
fi

# ---- stage 0: a GPU, or the dry run ------------------------------------------------------------
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  if [[ "$DRY" != "1" ]]; then
    echo "gpu_smoke: no CUDA device; this benchmark needs a GPU (DRY=1 runs it on the CPU at toy sizes)" >&2
    exit 2
  fi
  echo "gpu_smoke: no CUDA device, DRY=1: running on the CPU at toy sizes; the numbers mean nothing" >&2
fi

rm -rf "$WORK"
mkdir -p "$WORK" "$(dirname "$OUT")"
rm -f "$OUT"

# Where and with what it ran, first (every stage merges its results into the same file).
"$PY" - "$OUT" "$DRY" <<'EOF'
import json, subprocess, sys
import torch
out, dry = sys.argv[1], sys.argv[2] == "1"
info = {"torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "dry_run": dry}
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

# ---- stage 1: the mid-size model (and the tiny model's tokenizer and demo corpus it uses) --------
PYTHONPATH="bench${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import benchlib; benchlib.ensure_tiny_assets()"
# shellcheck disable=SC2086  # MID_ARGS is a list of flags on purpose
"$PY" bench/midmodel.py "$MID_DIR" $MID_ARGS > "$WORK/mid-model.json"

# ---- stage 2: per layer ------------------------------------------------------------------------
echo "== per layer: $MID_MB x $MID_SEQ tokens"
"$PY" bench/gpu_layers.py --model-dir "$MID_DIR" --seq-len "$MID_SEQ" --micro-batch "$MID_MB" \
  --reps "$REPS" --out "$OUT"

# ---- stage 3: whole steps, varlen and masked sdpa -----------------------------------------------
common=(--set training.max_steps="$STEPS"
        --set training.val_fraction=0.01
        --set logging.eval_interval=1000000
        --set checkpoint.interval=1000000
        --set performance.tf32=true
        --set paths.model_dir="$MID_DIR"
        --set training.max_seq_length="$MID_SEQ"
        --set optimization.micro_batch_per_gpu="$MID_MB"
        --set optimization.grad_accum_steps=1)
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  common+=(--set quantization.compute_dtype=bfloat16)
fi
if [[ -n "$DATA" ]]; then
  common+=(--set paths.data_path="$(abspath "$DATA")")
fi

for attn in varlen sdpa; do
  name=step_$attn
  echo "== whole steps, $attn: $MID_MB x $MID_SEQ tokens per micro-batch, $STEPS steps"
  "$PY" train_qlora.py --config configs/tiny.yaml "${common[@]}" \
    --set model.attn_implementation="$attn" \
    --set paths.output_dir="$WORK/$name" \
    --set paths.best_adapter_dir="$WORK/$name-best"
  "$PY" bench/mfu.py report --name "$name" --log "$WORK/$name/logs/training_log.jsonl" \
    --model-dir "$MID_DIR" --seq-len "$MID_SEQ" --skip-steps "$SKIP" --out "$OUT" "${peak_args[@]}"
done

# ---- stage 4: the largest micro-batch that fits, against the plan ---------------------------------
echo "== largest micro-batch at $MID_SEQ tokens in $FIT_GB GB"
"$PY" bench/gpu_fit.py --model-dir "$MID_DIR" --seq-len "$MID_SEQ" --memory-gb "$FIT_GB" --out "$OUT"

if [[ "$KEEP" != "1" ]]; then
  rm -rf "$MID_DIR" "$WORK"
fi
echo "wrote $OUT"
