#!/usr/bin/env bash
# launch_training.sh - the runbook for a QLoRA run of GLM-4.5-Air, one node or many, via Accelerate.
#
#   ./launch_training.sh [--config PATH] [--set KEY=VALUE]... [--no-resume | --resume_from PATH]
#                        [--force] [--dry-run] [-- ARGS FOR train_qlora.py]
#
#   --config PATH        the YAML (default: training_config.yaml beside this script)
#   --set KEY=VALUE      override one config key, for the launcher and the trainer alike
#   --no-resume          do not auto-resume; refused (exit 2) when output_dir already holds checkpoints
#   --resume_from PATH   continue from this checkpoint folder
#   --force              launch even when the memory plan says the run will not fit
#   --dry-run            do every check and print the launch command, but do not run it
#
# Environment (all optional): PYTHON; NUM_MACHINES, MACHINE_RANK (defaults to SLURM_NODEID),
# MAIN_PROCESS_IP, MAIN_PROCESS_PORT for multi-node runs; and every cache, NCCL and CUDA
# variable exported in stage 5, each of which keeps the value it already has.
# On a machine without a GPU the run takes the CPU path: DDP over gloo (the tiny demo, the tests).
# Exit status: 2 bad input (one line says what to fix), 3 the memory plan says it won't fit, otherwise
# the trainer's own status.
set -euo pipefail

KIT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

say() { printf '[launch] %s\n' "$*"; }
# die MESSAGE [STATUS]: one line on stderr; the status defaults to 2 (bad input the user can fix).
die() { printf 'launch_training.sh: %s\n' "$1" >&2; exit "${2:-2}"; }
# need_count NAME VALUE: environment numbers must be plain non-negative integers (bash arithmetic
# would otherwise evaluate "1.5" as a syntax error or "node1" as a variable).
need_count() { [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"; }
usage() { sed -n '2,20s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }

# ---- Stage 1: arguments. Launcher options first; everything after -- goes to the trainer. ----
CONFIG="$KIT_ROOT/training_config.yaml"
RESUME_MODE=auto          # auto | none | path | given (resume options after --)
RESUME_PATH=""
FORCE=0
DRY_RUN=0
SET_ARGS=()               # --set pairs: for the helper, the plan and the trainer
TRAINER_ARGS=()
while (($#)); do
    case "$1" in
        --config) (($# >= 2)) || die "--config needs a path"; CONFIG="$2"; shift 2 ;;
        --config=*) CONFIG="${1#*=}"; shift ;;
        --set) (($# >= 2)) || die "--set needs KEY=VALUE"; SET_ARGS+=(--set "$2"); shift 2 ;;
        --no-resume) RESUME_MODE=none; shift ;;
        --resume_from) (($# >= 2)) || die "--resume_from needs a checkpoint folder"
            RESUME_MODE=path; RESUME_PATH="$2"; shift 2 ;;
        --force) FORCE=1; shift ;;
        --dry-run) DRY_RUN=1; shift ;;
        -h|--help) usage; exit 0 ;;
        --) shift; TRAINER_ARGS=("$@"); break ;;
        *) die "unknown option $1 (trainer options go after --; see --help)" 2 ;;
    esac
done
# Config overrides given to the trainer must reach the helper and the plan too.
PASS_ARGS=()
for ((i = 0; i < ${#TRAINER_ARGS[@]}; i++)); do
    arg="${TRAINER_ARGS[i]}"
    case "$arg" in
        --set) SET_ARGS+=(--set "${TRAINER_ARGS[i + 1]:-}"); i=$((i + 1)); continue ;;
        --set=*) SET_ARGS+=(--set "${arg#--set=}"); continue ;;
        --resume|--resume_from|--resume_from=*) RESUME_MODE=given ;;
        *) ;;
    esac
    PASS_ARGS+=("$arg")
done

# ---- Stage 2: interpreter. $PYTHON if set, else the kit's venv, else python3. ----
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$KIT_ROOT/.venv/bin/python" ]]; then PYTHON="$KIT_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null || die "Python interpreter $PYTHON not found; set PYTHON=/path/to/python"
export PYTHONPATH="$KIT_ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ---- Stage 3: read the config. Paths, process count, strategy and resume point come from the YAML. ----
[[ ! -d "$CONFIG" ]] || die "config $CONFIG is a folder; pass --config with the YAML file inside it"
[[ -f "$CONFIG" ]] || die "config $CONFIG not found; pass --config PATH"
# On a bad config (or an unreadable run folder) the helper prints the problem, one line each, and exits 2.
KIT_ENV="$("$PYTHON" -m glmkit.launch.env --config "$CONFIG" ${SET_ARGS[@]+"${SET_ARGS[@]}"})" || exit $?
# The helper prints KIT_*=value lines quoted with shlex.quote, so eval is safe for any path.
eval "$KIT_ENV"
say "config $KIT_CONFIG"

# ---- Stage 4: inputs. Fail now, with the fix, rather than after minutes of start-up. ----
if [[ ! -f "$KIT_MODEL_DIR/config.json" ]]; then
    die "no model in $KIT_MODEL_DIR (paths.model_dir has no config.json); download $KIT_MODEL_NAME with: python download_model.py --config $KIT_CONFIG  (CPU demo model: python download_model.py --tiny --config $KIT_CONFIG)"
fi
# The same resolution the trainer does (files, folders, globs, weighted sources), minus the tokenizing.
if [[ -n "$KIT_DATA_PROBLEM" ]]; then
    die "no usable training data: $KIT_DATA_PROBLEM  (paths.data_path in $KIT_CONFIG; one {\"$KIT_TEXT_FIELD\": ...} record per line; CPU demo corpus: python -m glmkit.demo.corpus --config $KIT_CONFIG)"
fi
# The trainer never starts over on top of a run's checkpoints (and the kit deletes nothing it did not
# write), so refuse here, in one line, rather than after minutes of start-up.
if [[ "$RESUME_MODE" == none && -n "$KIT_LATEST_CHECKPOINT" ]]; then
    die "--no-resume: paths.output_dir $KIT_OUTPUT_DIR already holds checkpoints of a run (latest: $KIT_LATEST_CHECKPOINT); to continue it, drop --no-resume (or pass --resume_from PATH); to start over, set paths.output_dir to a new folder (e.g. --set paths.output_dir=...)"
fi
for dir_key in "paths.output_dir:$KIT_OUTPUT_DIR" "paths.scratch_dir:$KIT_SCRATCH_DIR"; do
    if [[ -e "${dir_key#*:}" && ! -d "${dir_key#*:}" ]]; then
        die "${dir_key%%:*} ${dir_key#*:} is a file, not a folder; point ${dir_key%%:*} at a folder"
    fi
done
say "model $KIT_MODEL_DIR"
say "data  $KIT_DATA_PATH"
say "output $KIT_OUTPUT_DIR (logs in $KIT_LOGS_DIR)"

# ---- Stage 5: environment. Caches and temp files go under paths.scratch_dir; each variable can be preset. ----
: "${HF_HOME:=$KIT_SCRATCH_DIR/hf}"
: "${TMPDIR:=$KIT_SCRATCH_DIR/tmp}"
: "${TRITON_CACHE_DIR:=$KIT_SCRATCH_DIR/triton}"
: "${TORCHINDUCTOR_CACHE_DIR:=$KIT_SCRATCH_DIR/inductor}"
: "${CUDA_CACHE_PATH:=$KIT_SCRATCH_DIR/nv}"
: "${XDG_CACHE_HOME:=$KIT_SCRATCH_DIR/cache}"
: "${MPLCONFIGDIR:=$KIT_SCRATCH_DIR/matplotlib}"
export HF_HOME TMPDIR TRITON_CACHE_DIR TORCHINDUCTOR_CACHE_DIR CUDA_CACHE_PATH XDG_CACHE_HOME MPLCONFIGDIR
for dir in "$KIT_OUTPUT_DIR" "$HF_HOME" "$TMPDIR" "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR" \
    "$CUDA_CACHE_PATH" "$XDG_CACHE_HOME" "$MPLCONFIGDIR"; do
    mkdir -p "$dir" 2>/dev/null || die "cannot create the folder $dir (permissions, a file in the way, or a full disk); fix it or point paths.output_dir / paths.scratch_dir elsewhere"
done
# The weights are local: never stall a compute node on the Hub.
: "${HF_HUB_OFFLINE:=1}"
# A dead peer raises an error instead of hanging every rank until the NCCL timeout.
: "${TORCH_NCCL_ASYNC_ERROR_HANDLING:=1}"
# On a timeout, dump the flight recorder so the hung collective can be found.
: "${TORCH_NCCL_DUMP_ON_TIMEOUT:=1}"
: "${NCCL_DEBUG:=WARN}"
# Expandable segments cut fragmentation from the variable-size expert dequantization buffers.
: "${PYTORCH_CUDA_ALLOC_CONF:=expandable_segments:True}"
# GPU indices as nvidia-smi prints them.
: "${CUDA_DEVICE_ORDER:=PCI_BUS_ID}"
# Tokenizer threads fork badly under DataLoader workers.
: "${TOKENIZERS_PARALLELISM:=false}"
: "${PYTHONUNBUFFERED:=1}"
export HF_HUB_OFFLINE TORCH_NCCL_ASYNC_ERROR_HANDLING TORCH_NCCL_DUMP_ON_TIMEOUT NCCL_DEBUG \
    PYTORCH_CUDA_ALLOC_CONF CUDA_DEVICE_ORDER TOKENIZERS_PARALLELISM PYTHONUNBUFFERED
say "env HF_HOME=$HF_HOME TMPDIR=$TMPDIR PYTORCH_CUDA_ALLOC_CONF=$PYTORCH_CUDA_ALLOC_CONF" \
    "TORCH_NCCL_ASYNC_ERROR_HANDLING=$TORCH_NCCL_ASYNC_ERROR_HANDLING HF_HUB_OFFLINE=$HF_HUB_OFFLINE"

# ---- Stage 6: hardware and processes per machine (distributed.num_processes, else one per GPU). ----
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi || say "nvidia-smi failed (continuing)"
fi
if ((KIT_VISIBLE_GPUS > 0)); then
    DEVICE=gpu
    PER_MACHINE="${KIT_NUM_PROCESSES:-$KIT_VISIBLE_GPUS}"
    ((PER_MACHINE <= KIT_VISIBLE_GPUS)) \
        || die "distributed.num_processes is $PER_MACHINE but only $KIT_VISIBLE_GPUS GPUs are visible"
else
    DEVICE=cpu
    PER_MACHINE="${KIT_NUM_PROCESSES:-1}"
    # ddp and fsdp both run over gloo on the CPU (the trainer shards the model itself under fsdp).
    # Without this, `accelerate launch --multi_gpu` on a CPU-only machine starts N unrelated
    # world-size-1 processes instead of one gloo group.
    export ACCELERATE_USE_CPU=true
fi
CORES="$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)"
: "${OMP_NUM_THREADS:=$((CORES / PER_MACHINE > 0 ? CORES / PER_MACHINE : 1))}"
export OMP_NUM_THREADS

# ---- Stage 7: machines. accelerate counts num_processes over all machines. ----
: "${NUM_MACHINES:=1}"
: "${MACHINE_RANK:=${SLURM_NODEID:-0}}"
need_count NUM_MACHINES "$NUM_MACHINES"
need_count MACHINE_RANK "$MACHINE_RANK"
if [[ -n "${MAIN_PROCESS_PORT:-}" ]]; then need_count MAIN_PROCESS_PORT "$MAIN_PROCESS_PORT"; fi
((NUM_MACHINES >= 1)) || die "NUM_MACHINES must be >= 1, got $NUM_MACHINES"
((MACHINE_RANK >= 0 && MACHINE_RANK < NUM_MACHINES)) \
    || die "MACHINE_RANK must be in 0..$((NUM_MACHINES - 1)), got $MACHINE_RANK"
if ((NUM_MACHINES > 1)); then
    [[ -n "${MAIN_PROCESS_IP:-}" ]] || die "NUM_MACHINES=$NUM_MACHINES needs MAIN_PROCESS_IP (the address of machine rank 0)"
    : "${MAIN_PROCESS_PORT:=29500}"
fi
TOTAL=$((PER_MACHINE * NUM_MACHINES))
say "$DEVICE path: $PER_MACHINE process(es) on each of $NUM_MACHINES machine(s) = $TOTAL, strategy $KIT_STRATEGY," \
    "machine rank $MACHINE_RANK, OMP_NUM_THREADS=$OMP_NUM_THREADS${ACCELERATE_USE_CPU:+, ACCELERATE_USE_CPU=$ACCELERATE_USE_CPU}"

# ---- Stage 8: memory plan. Refuse a run that clearly won't fit, unless --force. ----
plan_rc=0
VERDICT="$("$PYTHON" -m glmkit.plan --config "$KIT_CONFIG" ${SET_ARGS[@]+"${SET_ARGS[@]}"} \
    --num_processes "$TOTAL" --check)" || plan_rc=$?
if [[ -n "$VERDICT" ]]; then
    if [[ "$DEVICE" == cpu ]]; then
        # the plan prices GPUs of distributed.gpu_memory_gb; this run's processes share the CPU's memory instead
        say "CPU run: this machine has no GPU; for GPUs of distributed.gpu_memory_gb the $VERDICT"
    else
        say "$VERDICT"
    fi
fi
case "$plan_rc" in
    0) ;;
    3) ((FORCE)) || die "refusing to launch a run the memory plan says won't fit; see python train_qlora.py --config $KIT_CONFIG --plan, or pass --force" 3
       say "--force: launching anyway" ;;
    2) exit 2 ;;  # the plan printed the config problems, one line each
    *) ((FORCE)) || die "the memory plan failed (exit $plan_rc, above); fix it or pass --force" 1
       say "--force: launching without a memory plan" ;;
esac

# ---- Stage 9: resume. A complete checkpoint in output_dir means continue, unless told otherwise. ----
RESUME_ARGS=()
case "$RESUME_MODE" in
    given) say "resume options given after --: passed to the trainer as they are" ;;
    path) say "resuming from $RESUME_PATH (--resume_from)"; RESUME_ARGS=(--resume_from "$RESUME_PATH") ;;
    none) say "--no-resume: starting fresh" ;;  # over existing checkpoints it was refused in stage 4
    auto) if [[ -n "$KIT_LATEST_CHECKPOINT" ]]; then
              say "resuming from $KIT_LATEST_CHECKPOINT (latest complete checkpoint; to start over, use a new paths.output_dir)"
              if [[ "$KIT_RUN_STATUS" == finished ]]; then
                  say "the last run logged run_end finished: unless its settings changed, the trainer says so and exits"
              fi
              RESUME_ARGS=(--resume)
          else
              say "no complete checkpoint in $KIT_OUTPUT_DIR: starting a fresh run"
          fi ;;
esac
FORCE_ARGS=()
if ((FORCE)); then FORCE_ARGS=(--force); fi

# ---- Stage 10: launch through accelerate (glmkit.launch.accelerate: the trainer's exit status, no traceback). ----
LAUNCH_ARGS=(--num_processes "$TOTAL" --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK")
if [[ "$DEVICE" == cpu ]]; then
    # --cpu and --multi_gpu exclude each other; ACCELERATE_USE_CPU (stage 6) covers the multi-process case.
    if ((TOTAL > 1)); then LAUNCH_ARGS+=(--multi_gpu); else LAUNCH_ARGS+=(--cpu); fi
    LAUNCH_ARGS+=(--mixed_precision no --dynamo_backend no)
elif [[ -n "$KIT_ACCELERATE_CONFIG" ]]; then
    LAUNCH_ARGS+=(--config_file "$KIT_ACCELERATE_CONFIG")
else
    if ((TOTAL > 1)); then LAUNCH_ARGS+=(--multi_gpu); fi
    LAUNCH_ARGS+=(--mixed_precision no --dynamo_backend no)
fi
if [[ -n "${MAIN_PROCESS_IP:-}" ]]; then LAUNCH_ARGS+=(--main_process_ip "$MAIN_PROCESS_IP"); fi
if [[ -n "${MAIN_PROCESS_PORT:-}" ]]; then LAUNCH_ARGS+=(--main_process_port "$MAIN_PROCESS_PORT"); fi

CMD=("$PYTHON" -m glmkit.launch.accelerate "${LAUNCH_ARGS[@]}" "$KIT_ROOT/train_qlora.py"
     --config "$KIT_CONFIG" ${SET_ARGS[@]+"${SET_ARGS[@]}"} ${RESUME_ARGS[@]+"${RESUME_ARGS[@]}"}
     ${FORCE_ARGS[@]+"${FORCE_ARGS[@]}"} ${PASS_ARGS[@]+"${PASS_ARGS[@]}"})
say "command: $(printf '%q ' "${CMD[@]}")"
if ((DRY_RUN)); then
    say "--dry-run: not launching"
    exit 0
fi
[[ -f "$KIT_ROOT/train_qlora.py" ]] || die "$KIT_ROOT/train_qlora.py not found; the checkout is incomplete" 1
exec "${CMD[@]}"
