"""Command line of the dashboard (training_dashboard.py is a thin wrapper), and the gunicorn factory.

The access token is read from the DASHBOARD_TOKEN environment variable, never
from argv, where every user of the machine could read it in `ps`.
Defaults come from defaults.py and the exposure policy from exposure.py;
launch_dashboard.sh asks `--print-plan` rather than repeating either.
"""

from __future__ import annotations

import argparse
import os
import sys

from .app import create_app
from .defaults import DEFAULTS, ENV
from .exposure import Exposure, ExposureError, decide

__all__ = ["app_from_env", "build_parser", "main", "resolve_dirs"]


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 1 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"must be 1-65535, got {text!r}")
    return int(text)


class _OneLineParser(argparse.ArgumentParser):
    """Bad input is one line and exit 2, as everywhere in the kit (argparse adds the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(
        prog="training_dashboard.py",
        description="Browser dashboard for a glmkit training run (reads the JSONL logs only).",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="training YAML; logs are read from <paths.output_dir>/logs")
    src.add_argument("--logs", help="folder holding the *_log.jsonl files")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (with --config), repeatable")
    p.add_argument("--output-dir", help="checkpoint folder (default: parent of the logs folder)")
    p.add_argument("--host", default=os.environ.get(ENV.host) or DEFAULTS.host,
                   help=f"bind address (default ${ENV.host} or {DEFAULTS.host}); a non-loopback address needs "
                        f"${ENV.token} (16+ characters) or --no-auth")
    p.add_argument("--port", type=_port, default=os.environ.get(ENV.port) or str(DEFAULTS.port),
                   help=f"port (default ${ENV.port} or {DEFAULTS.port})")
    p.add_argument("--no-auth", action="store_true",
                   help=f"serve without ${ENV.token}, even on a non-loopback --host (trusted networks only)")
    p.add_argument("--smoothing", type=float, default=DEFAULTS.smoothing, help="default EMA weight in [0, 1)")
    p.add_argument("--stall-seconds", type=float, default=DEFAULTS.stall_seconds,
                   help="silence after which a run counts as stalled")
    p.add_argument("--refresh", type=float, default=DEFAULTS.refresh_seconds,
                   help="default page refresh interval, seconds")
    p.add_argument("--print-plan", action="store_true",
                   help="check the host/token policy, print LOGS_DIR, OUTPUT_DIR, HOST, PORT, BIND, LOOPBACK "
                        "and THREADS as KEY=VALUE lines, and exit (for launch_dashboard.sh)")
    return p


def _dirs_from_config(path: str, overrides: list[str]) -> tuple[str, str]:
    from glmkit.config.load import load_config
    from glmkit.config.schema import ConfigError

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


def _plan_lines(logs_dir: str, output_dir: str, exposure: Exposure) -> str:
    return "\n".join([f"LOGS_DIR={logs_dir}", f"OUTPUT_DIR={output_dir}", f"HOST={exposure.host}",
                      f"PORT={exposure.port}", f"BIND={exposure.bind}", f"LOOPBACK={int(exposure.loopback)}",
                      f"THREADS={DEFAULTS.threads}"])


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.overrides and not args.config:
        parser.error("--set needs --config")
    if not 0.0 <= args.smoothing < 1.0:
        parser.error("--smoothing must be in [0, 1)")
    try:
        exposure = decide(args.host, args.port, os.environ.get(ENV.token), no_auth=args.no_auth)
    except ExposureError as exc:
        print(f"training_dashboard: {exc}", file=sys.stderr)
        return 2
    logs_dir, output_dir = resolve_dirs(args)
    if exposure.warning():
        print(f"training_dashboard: {exposure.warning()}", file=sys.stderr)
    if args.print_plan:
        print(_plan_lines(logs_dir, output_dir, exposure))
        return 0
    app = create_app(logs_dir, output_dir, token=exposure.token, bind_host=exposure.host,
                     smoothing=args.smoothing, stall_seconds=args.stall_seconds, refresh_seconds=args.refresh)
    print(f"dashboard: reading {logs_dir}\n  open http://{exposure.bind}/", file=sys.stderr)
    app.run(host=exposure.host.strip("[]"), port=exposure.port, debug=False, use_reloader=False, threaded=True)
    return 0


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise SystemExit(f"app_from_env: {name} must be a number, got {raw!r}") from None


def app_from_env():
    """Factory for `gunicorn 'training_dashboard:app_from_env()'` (see launch_dashboard.sh).

    DASHBOARD_HOST must name the address gunicorn binds (default 127.0.0.1), so that the same
    exposure policy applies: a token for exposed binds, the Host check for loopback ones.
    """
    if ENV.logs_dir not in os.environ:
        raise SystemExit(f"app_from_env: set {ENV.logs_dir} to the run's logs folder")
    try:
        exposure = decide(os.environ.get(ENV.host) or DEFAULTS.host, DEFAULTS.port, os.environ.get(ENV.token),
                          no_auth=os.environ.get(ENV.no_auth) == "1")
    except ExposureError as exc:
        raise SystemExit(f"app_from_env: {exc}") from None
    return create_app(
        os.environ[ENV.logs_dir],
        os.environ.get(ENV.output_dir) or None,
        token=exposure.token,
        bind_host=exposure.host,
        smoothing=_env_float(ENV.smoothing, DEFAULTS.smoothing),
        stall_seconds=_env_float(ENV.stall_seconds, DEFAULTS.stall_seconds),
        refresh_seconds=_env_float(ENV.refresh_seconds, DEFAULTS.refresh_seconds),
    )
