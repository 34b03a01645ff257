#!/usr/bin/env bash
# Runbook: serve the training dashboard (read-only view of a run's JSONL logs).
#
#   ./launch_dashboard.sh                              # training_config.yaml here, http://127.0.0.1:5000
#   ./launch_dashboard.sh --config my.yaml --port 5050 # MLflow also likes port 5000
#   ./launch_dashboard.sh --logs runs/my-run/logs
#   DASHBOARD_TOKEN=$(openssl rand -hex 16) ./launch_dashboard.sh --host 0.0.0.0   # token: 16+ characters
#   ./launch_dashboard.sh --host 0.0.0.0 --no-auth     # trusted network only
#
# Environment defaults (flags win): DASHBOARD_CONFIG, DASHBOARD_LOGS,
# DASHBOARD_OUTPUT_DIR, DASHBOARD_HOST, DASHBOARD_PORT, DASHBOARD_TOKEN,
# DASHBOARD_SERVER (auto|gunicorn|flask), DASHBOARD_THREADS, PYTHON.
set -euo pipefail

# ---- Stage 0: what the caller asked for ---------------------------------------
# Defaults (host, port, threads) and the host/token policy live in Python
# (glmkit/dashboard/defaults.py and exposure.py); empty here means "Python decides".
SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${DASHBOARD_CONFIG:-$SCRIPT_DIR/training_config.yaml}"
LOGS="${DASHBOARD_LOGS:-}"
OUTPUT_DIR="${DASHBOARD_OUTPUT_DIR:-}"
HOST="${DASHBOARD_HOST:-}"
PORT="${DASHBOARD_PORT:-}"
SERVER="${DASHBOARD_SERVER:-auto}"
THREADS="${DASHBOARD_THREADS:-}"
NO_AUTH=0
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$SCRIPT_DIR/.venv/bin/python" ]]; then PYTHON="$SCRIPT_DIR/.venv/bin/python"; else PYTHON=python3; fi
fi

die() { echo "launch_dashboard: $*" >&2; exit 2; }

usage() {
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  cat <<'EOF'
Options:
  --config PATH      training YAML (default: training_config.yaml next to this script)
  --logs DIR         read this logs folder instead of the config's <output_dir>/logs
  --output-dir DIR   checkpoint folder (default: from the config, or the parent of --logs)
  --host ADDR        bind address (default 127.0.0.1; anything else needs a 16+ character token)
  --port N           port (default 5000)
  --no-auth          allow a non-loopback --host without DASHBOARD_TOKEN
  --server NAME      auto (gunicorn if installed), gunicorn or flask
EOF
}

# ---- Stage 1: arguments -----------------------------------------------------
need_value() { [[ $# -ge 2 && -n "$2" ]] || die "$1 needs a value"; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config) need_value "$@"; CONFIG="$2"; LOGS=""; shift 2 ;;
    --logs) need_value "$@"; LOGS="$2"; shift 2 ;;
    --output-dir) need_value "$@"; OUTPUT_DIR="$2"; shift 2 ;;
    --host) need_value "$@"; HOST="$2"; shift 2 ;;
    --port) need_value "$@"; PORT="$2"; shift 2 ;;
    --server) need_value "$@"; SERVER="$2"; shift 2 ;;
    --no-auth) NO_AUTH=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done
case "$SERVER" in auto|gunicorn|flask) ;; *) die "--server must be auto, gunicorn or flask" ;; esac
if [[ -n "$THREADS" ]] && ! [[ "$THREADS" =~ ^[1-9][0-9]{0,3}$ ]]; then
  die "DASHBOARD_THREADS must be a positive integer, got '$THREADS'"
fi

# ---- Stage 2: ask Python for the plan -----------------------------------------
# The Python CLI reads the YAML with the trainer's own loader (so both agree on
# <paths.output_dir>/logs), fills in the defaults and applies the exposure
# policy (a non-loopback host needs a 16+ character DASHBOARD_TOKEN, or
# --no-auth). A refusal is one line on stderr and exit 2, which ends us here.
if [[ -n "$LOGS" ]]; then ARGS=(--logs "$LOGS"); else ARGS=(--config "$CONFIG"); fi
if [[ -n "$OUTPUT_DIR" ]]; then ARGS+=(--output-dir "$OUTPUT_DIR"); fi
if [[ -n "$HOST" ]]; then ARGS+=(--host "$HOST"); fi
if [[ -n "$PORT" ]]; then ARGS+=(--port "$PORT"); fi
if [[ "$NO_AUTH" == 1 ]]; then ARGS+=(--no-auth); fi
PLAN="$("$PYTHON" "$SCRIPT_DIR/training_dashboard.py" "${ARGS[@]}" --print-plan)"
plan() { sed -n "s/^$1=//p" <<<"$PLAN"; }
LOGS_DIR="$(plan LOGS_DIR)"
OUTPUT_DIR="$(plan OUTPUT_DIR)"
HOST="$(plan HOST)"
PORT="$(plan PORT)"
BIND="$(plan BIND)"
LOOPBACK="$(plan LOOPBACK)"
THREADS="${THREADS:-$(plan THREADS)}"
[[ -d "$LOGS_DIR" ]] || echo "launch_dashboard: $LOGS_DIR does not exist yet; the page will wait for the run" >&2
if [[ "$NO_AUTH" == 1 ]]; then unset DASHBOARD_TOKEN; fi

# ---- Stage 3: say where to look -------------------------------------------------
echo "Dashboard for $LOGS_DIR"
if [[ "$LOOPBACK" == 1 ]]; then
  echo "  http://$BIND/"
else
  for ip in $(hostname -I 2>/dev/null || true); do
    [[ "$ip" == *:* ]] && ip="[$ip]"
    echo "  http://$ip:$PORT/"
  done
  echo "  http://$(hostname -f 2>/dev/null || hostname):$PORT/"
  if [[ -n "${DASHBOARD_TOKEN:-}" ]]; then
    echo "  first visit: add ?token=<DASHBOARD_TOKEN> to the URL (scripts: Authorization: Bearer ...)"
  fi
fi

# ---- Stage 4: serve -------------------------------------------------------------
# One gunicorn worker with threads: the parsed logs live in the process, so
# more workers would each hold (and parse) their own copy.  Never debug mode.
# The gunicorn app reads the same settings back (app_from_env) and applies the
# same policy; both servers write ?token= values as [redacted] in their logs.
export DASHBOARD_LOGS_DIR="$LOGS_DIR" DASHBOARD_OUTPUT_DIR="$OUTPUT_DIR" DASHBOARD_NO_AUTH="$NO_AUTH" \
  DASHBOARD_HOST="$HOST" DASHBOARD_PORT="$PORT"
if [[ "$SERVER" != flask ]] && "$PYTHON" -c 'import gunicorn' 2>/dev/null; then
  EXTRA=()
  # gunicorn >= 24 opens a control socket at one fixed path per user; two
  # dashboards (one per run) would fight over it, and we do not use it.
  if "$PYTHON" -m gunicorn --help 2>/dev/null | grep -q -- --no-control-socket; then EXTRA+=(--no-control-socket); fi
  cd "$SCRIPT_DIR"
  exec "$PYTHON" -m gunicorn --workers 1 --worker-class gthread --threads "$THREADS" \
    --bind "$BIND" --timeout 120 --access-logfile - "${EXTRA[@]}" 'training_dashboard:app_from_env()'
fi
[[ "$SERVER" != gunicorn ]] || die "gunicorn is not installed for $PYTHON"
exec "$PYTHON" "$SCRIPT_DIR/training_dashboard.py" "${ARGS[@]}"
