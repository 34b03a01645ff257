#!/usr/bin/env bash
# Run every benchmark in bench/ with its default sizes, one after another (never in parallel: they would
# time each other). Results: bench/results/<name>.json; a Markdown table of each on stdout. What each one
# measures and how long it takes: bench/README.md.
#
# On a shared 2-core CPU machine the CPU benchmarks take roughly 1 hour, plus about 50 minutes for data_prep
# (it generates and prepares 1.25 GiB of corpora); expert_lora and packed_attention are the long ones.
# gpu_smoke runs only where torch sees a CUDA GPU (bench/gpu_smoke.sh; `DRY=1 bench/gpu_smoke.sh` checks its
# plumbing on a CPU).
#
#   bench/run_all.sh                       # all of them
#   bench/run_all.sh loading dashboard     # only those named (see ALL below, and gpu_smoke)
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
# Quick ones first, so a broken setup shows in seconds; data_prep, the longest, last.
ALL=(memory_plan overheads vs_trainer data_efficiency loss_memory packed_attention loading sharded_load
     expert_lora cache_verify long_document dashboard chat_prep sequence_parallel mtp_drift data_prep)

if [[ $# -gt 0 ]]; then
  selected=("$@")
else
  selected=("${ALL[@]}" gpu_smoke)
fi

# ---- check every name before running anything: a typo should not cost an hour of benchmarks first ----
for name in "${selected[@]}"; do
  if [[ "$name" != gpu_smoke && ! -f "bench/bench_${name}.py" ]]; then
    echo "run_all: no benchmark named '$name' (choose from: ${ALL[*]} gpu_smoke)" >&2
    exit 2
  fi
done

# ---- the tiny model and the demo corpus most benchmarks read (built once, offline) ----
PYTHONPATH=bench "$PY" -c "import benchlib; benchlib.ensure_tiny_assets()"

for name in "${selected[@]}"; do
  echo
  echo "=== $name ($(date -u +%H:%M:%S) UTC) ==="
  if [[ "$name" == gpu_smoke ]]; then
    if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
      bench/gpu_smoke.sh
    else
      echo "skipped: torch sees no CUDA GPU here (DRY=1 bench/gpu_smoke.sh runs its plumbing on the CPU)"
    fi
  else
    "$PY" "bench/bench_${name}.py"
  fi
done
echo
echo "results in bench/results/"
