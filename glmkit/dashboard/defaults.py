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


@dataclass(frozen=True)
class DashboardEnv:
    """Environment variables the command line and the gunicorn factory read (flags win on the command line)."""

    host: str = "DASHBOARD_HOST"
    port: str = "DASHBOARD_PORT"
    token: str = "DASHBOARD_TOKEN"  # never a flag: argv is visible to every user in `ps`
    no_auth: str = "DASHBOARD_NO_AUTH"
    logs_dir: str = "DASHBOARD_LOGS_DIR"
    output_dir: str = "DASHBOARD_OUTPUT_DIR"
    smoothing: str = "DASHBOARD_SMOOTHING"
    stall_seconds: str = "DASHBOARD_STALL_SECONDS"
    refresh_seconds: str = "DASHBOARD_REFRESH"


ENV = DashboardEnv()
