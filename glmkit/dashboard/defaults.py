"""The dashboard's defaults, defined once: create_app, the command line, the gunicorn factory
(app_from_env) and launch_dashboard.sh (through `training_dashboard.py --print-plan`) all read them here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DashboardDefaults:
    host: str = "127.0.0.1"  # loopback: private to this machine, no token needed
    port: int = 5000
    smoothing: float = 0.6  # EMA weight of the loss card and plots, in [0, 1)
    stall_seconds: float = 300.0  # silence after which a run without run_end is "stalled"
    refresh_seconds: float = 5.0  # the page's auto-refresh interval
    min_poll_interval: float = 0.25  # the log files are re-read at most this often
    threads: int = 8  # gunicorn threads of its one worker


DEFAULTS = DashboardDefaults()

# Environment variables the command line and the gunicorn factory read (flags win on the command line).
ENV_HOST = "DASHBOARD_HOST"
ENV_PORT = "DASHBOARD_PORT"
ENV_TOKEN = "DASHBOARD_TOKEN"
ENV_NO_AUTH = "DASHBOARD_NO_AUTH"
ENV_LOGS_DIR = "DASHBOARD_LOGS_DIR"
ENV_OUTPUT_DIR = "DASHBOARD_OUTPUT_DIR"
ENV_SMOOTHING = "DASHBOARD_SMOOTHING"
ENV_STALL_SECONDS = "DASHBOARD_STALL_SECONDS"
ENV_REFRESH = "DASHBOARD_REFRESH"
