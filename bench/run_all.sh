#!/usr/bin/env bash
# Run every CPU benchmark with its default sizes, one after another (never in parallel: they
# time each other otherwise). Results: bench/results/*.json; tables on stdout.
# About 25-35 minutes on a shared 2-core machine, plus data_prep (it generates and prepares 1.25 GiB of
# corpora: about 50 minutes on a busy machine). The GPU benchmark is bench/gpu_smoke.sh.
#
#   bench/run_all.sh            # all of them
#   bench/run_all.sh loading    # only those named (data_efficiency vs_trainer memory_plan loading overheads
#                               #   expert_lora packed_attention loss_memory data_prep cache_verify
#                               #   long_document sharded_load sequence_parallel)
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
ALL=(memory_plan data_efficiency vs_trainer overheads loading sharded_load expert_lora packed_attention loss_memory data_prep
     cache_verify long_document sequence_parallel)

if [[ $# -gt 0 ]]; then
  selected=("$@")
else
  selected=("${ALL[@]}")
fi

PYTHONPATH=bench "$PY" -c "import benchlib; benchlib.ensure_tiny_assets()"

for name in "${selected[@]}"; do
  script="bench/bench_${name}.py"
  if [[ ! -f "$script" ]]; then
    echo "run_all: no benchmark named '$name' (choose from: ${ALL[*]})" >&2
    exit 2
  fi
  echo
  echo "=== $name ($(date -u +%H:%M:%S) UTC) ==="
  "$PY" "$script"
done
echo
echo "results in bench/results/"
