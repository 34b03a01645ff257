"""Command line of the dashboard (training_dashboard.py is a thin wrapper).

The access token is read from the DASHBOARD_TOKEN environment variable, never
from argv, where every user of the machine could read it in `ps`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from .app import create_app

LOOPBACK_NAMES = ("localhost", "localhost.localdomain")


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="training_dashboard.py",
        description="Browser dashboard for a glmkit training run (reads the JSONL logs only).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="training YAML; logs are read from <paths.output_dir>/logs")
    src.add_argument("--logs", help="folder holding the *_log.jsonl files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (with --config), repeatable")
    p.add_argument("--output-dir", help="checkpoint folder (default: parent of the logs folder)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=int(os.environ.get("DASHBOARD_PORT", "5000")),
                   help="port (default $DASHBOARD_PORT or 5000)")
    p.add_argument("--no-auth", action="store_true",
                   help="allow a non-loopback --host without DASHBOARD_TOKEN")
    p.add_argument("--smoothing", type=float, default=0.6, help="default EMA weight in [0, 1)")
    p.add_argument("--stall-seconds", type=float, default=300.0,
                   help="silence after which a run counts as stalled")
    p.add_argument("--refresh", type=float, default=5.0, help="default page refresh interval, seconds")
    p.add_argument("--print-paths", action="store_true",
                   help="print LOGS_DIR=<dir> and OUTPUT_DIR=<dir> lines and exit (for launch_dashboard.sh)")
    return p


def _dirs_from_config(path: str, overrides: list[str]) -> tuple[str, str]:
    from glmkit.config import ConfigError, load_config  # only the CLI depends on the config

    try:
        cfg = load_config(path, overrides)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)  # already one problem per line; no traceback
        raise SystemExit(2) from None
    return cfg.logs_dir, cfg.paths.output_dir


def resolve_dirs(args: argparse.Namespace) -> tuple[str, str]:
    """(logs_dir, output_dir) from --config or --logs, then --output-dir."""
    if args.config:
        logs_dir, output_dir = _dirs_from_config(args.config, args.overrides)
    else:
        logs_dir = os.path.abspath(args.logs)
        output_dir = os.path.dirname(logs_dir.rstrip(os.sep))
    return logs_dir, os.path.abspath(args.output_dir) if args.output_dir else output_dir


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.overrides and not args.config:
        parser.error("--set needs --config")
    if not 0.0 <= args.smoothing < 1.0:
        parser.error("--smoothing must be in [0, 1)")
    logs_dir, output_dir = resolve_dirs(args)
    if args.print_paths:
        print(f"LOGS_DIR={logs_dir}\nOUTPUT_DIR={output_dir}")
        return 0
    token = os.environ.get("DASHBOARD_TOKEN") or None
    if not is_loopback(args.host) and not token and not args.no_auth:
        print(f"refusing to serve on {args.host} without DASHBOARD_TOKEN; set it, or pass --no-auth",
              file=sys.stderr)
        return 2
    app = create_app(logs_dir, output_dir, token=None if args.no_auth else token,
                     smoothing=args.smoothing, stall_seconds=args.stall_seconds, refresh_seconds=args.refresh)
    print(f"dashboard: reading {logs_dir}\n  open http://{args.host}:{args.port}/", file=sys.stderr)
    app.run(host=args.host, port=args.port, debug=False, use_reloader=False, threaded=True)
    return 0


def app_from_env():
    """Factory for `gunicorn 'training_dashboard:app_from_env()'` (see launch_dashboard.sh)."""
    no_auth = os.environ.get("DASHBOARD_NO_AUTH") == "1"
    return create_app(
        os.environ["DASHBOARD_LOGS_DIR"],
        os.environ.get("DASHBOARD_OUTPUT_DIR") or None,
        token=None if no_auth else (os.environ.get("DASHBOARD_TOKEN") or None),
        smoothing=float(os.environ.get("DASHBOARD_SMOOTHING", "0.6")),
        stall_seconds=float(os.environ.get("DASHBOARD_STALL_SECONDS", "300")),
        refresh_seconds=float(os.environ.get("DASHBOARD_REFRESH", "5")),
    )
