#!/usr/bin/env bash
# Runbook: serve the training dashboard (read-only view of a run's JSONL logs).
#
#   ./launch_dashboard.sh                              # training_config.yaml here, http://127.0.0.1:5000
#   ./launch_dashboard.sh --config my.yaml --port 5050 # MLflow also likes port 5000
#   ./launch_dashboard.sh --logs runs/my-run/logs
#   DASHBOARD_TOKEN=$(openssl rand -hex 16) ./launch_dashboard.sh --host 0.0.0.0
#   ./launch_dashboard.sh --host 0.0.0.0 --no-auth     # trusted network only
#
# Environment defaults (flags win): DASHBOARD_CONFIG, DASHBOARD_LOGS,
# DASHBOARD_OUTPUT_DIR, DASHBOARD_HOST, DASHBOARD_PORT, DASHBOARD_TOKEN,
# DASHBOARD_SERVER (auto|gunicorn|flask), DASHBOARD_THREADS, PYTHON.
set -euo pipefail

# ---- Stage 0: defaults ------------------------------------------------------
SCRIPT_DIR="$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)"
CONFIG="${DASHBOARD_CONFIG:-$SCRIPT_DIR/training_config.yaml}"
LOGS="${DASHBOARD_LOGS:-}"
OUTPUT_DIR="${DASHBOARD_OUTPUT_DIR:-}"
HOST="${DASHBOARD_HOST:-127.0.0.1}"
PORT="${DASHBOARD_PORT:-5000}"
SERVER="${DASHBOARD_SERVER:-auto}"
THREADS="${DASHBOARD_THREADS:-8}"
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
  --host ADDR        bind address (default 127.0.0.1; anything else needs a token)
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
if ! [[ "$PORT" =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then die "--port must be 1-65535, got '$PORT'"; fi
if ! [[ "$THREADS" =~ ^[0-9]+$ ]] || ((THREADS < 1)); then die "DASHBOARD_THREADS must be a positive integer"; fi
case "$SERVER" in auto|gunicorn|flask) ;; *) die "--server must be auto, gunicorn or flask" ;; esac

# ---- Stage 2: find the logs -------------------------------------------------
# The Python CLI reads the YAML with the trainer's own loader, so both agree
# on <paths.output_dir>/logs.  It prints config errors itself and exits 2.
if [[ -n "$LOGS" ]]; then SOURCE=(--logs "$LOGS"); else SOURCE=(--config "$CONFIG"); fi
if [[ -n "$OUTPUT_DIR" ]]; then SOURCE+=(--output-dir "$OUTPUT_DIR"); fi
PATHS="$("$PYTHON" "$SCRIPT_DIR/training_dashboard.py" "${SOURCE[@]}" --print-paths)"
LOGS_DIR="$(sed -n 's/^LOGS_DIR=//p' <<<"$PATHS")"
OUTPUT_DIR="$(sed -n 's/^OUTPUT_DIR=//p' <<<"$PATHS")"
[[ -d "$LOGS_DIR" ]] || echo "launch_dashboard: $LOGS_DIR does not exist yet; the page will wait for the run" >&2

# ---- Stage 3: access policy ---------------------------------------------------
# Loopback binds are private to this machine; anything else is reachable from
# the network and needs a token, unless --no-auth says the network is trusted.
case "$HOST" in
  127.*|localhost|::1) LOCAL=1 ;;
  *) LOCAL=0 ;;
esac
if [[ "$LOCAL" == 0 && "$NO_AUTH" == 0 && -z "${DASHBOARD_TOKEN:-}" ]]; then
  die "--host $HOST is reachable from the network: export DASHBOARD_TOKEN=<secret> (e.g. \$(openssl rand -hex 16)), or pass --no-auth"
fi
if [[ "$NO_AUTH" == 1 ]]; then
  unset DASHBOARD_TOKEN
  [[ "$LOCAL" == 1 ]] || echo "launch_dashboard: WARNING: serving on $HOST without authentication" >&2
fi

# ---- Stage 4: say where to look -----------------------------------------------
echo "Dashboard for $LOGS_DIR"
if [[ "$LOCAL" == 1 ]]; then
  echo "  http://$HOST:$PORT/"
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

# ---- Stage 5: serve -------------------------------------------------------------
# One gunicorn worker with threads: the parsed logs live in the process, so
# more workers would each hold (and parse) their own copy.  Never debug mode.
export DASHBOARD_LOGS_DIR="$LOGS_DIR" DASHBOARD_OUTPUT_DIR="$OUTPUT_DIR" DASHBOARD_NO_AUTH="$NO_AUTH"
if [[ "$SERVER" != flask ]] && "$PYTHON" -c 'import gunicorn' 2>/dev/null; then
  BIND="$HOST:$PORT"
  [[ "$HOST" == *:* ]] && BIND="[$HOST]:$PORT"
  EXTRA=()
  # gunicorn >= 24 opens a control socket at one fixed path per user; two
  # dashboards (one per run) would fight over it, and we do not use it.
  if "$PYTHON" -m gunicorn --help 2>/dev/null | grep -q -- --no-control-socket; then EXTRA+=(--no-control-socket); fi
  cd "$SCRIPT_DIR"
  exec "$PYTHON" -m gunicorn --workers 1 --worker-class gthread --threads "$THREADS" \
    --bind "$BIND" --timeout 120 --access-logfile - "${EXTRA[@]}" 'training_dashboard:app_from_env()'
fi
[[ "$SERVER" != gunicorn ]] || die "gunicorn is not installed for $PYTHON"
FLAGS=()
if [[ "$NO_AUTH" == 1 ]]; then FLAGS+=(--no-auth); fi
exec "$PYTHON" "$SCRIPT_DIR/training_dashboard.py" --logs "$LOGS_DIR" --output-dir "$OUTPUT_DIR" \
  --host "$HOST" --port "$PORT" "${FLAGS[@]}"
