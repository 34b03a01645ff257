"""The Flask application factory.  It knows nothing of the YAML config: the
command line resolves that and passes plain folders in."""

from __future__ import annotations

import os
from pathlib import Path

from flask import Flask, abort, jsonify, request
from werkzeug.exceptions import HTTPException

from .accesslog import redact_server_logs
from .api import api
from .auth import install_token_auth
from .checkpoints import CheckpointScanner
from .defaults import DEFAULTS
from .exposure import host_header_name, host_header_names
from .gpu import GpuProbe
from .monitor import RunMonitor
from .pages import pages
from .plots import PlotCache
from .series import SmoothingCache
from .state import EXTENSION, DashboardState

REPO_ROOT = Path(__file__).resolve().parents[2]

SECURITY_HEADERS = {
    # Everything is served from here; nothing may be framed or fetched elsewhere.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; "
    "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",  # a ?token= URL must not leak through Referer
}


def create_app(
    logs_dir: str,
    output_dir: str | None = None,
    token: str | None = None,
    *,
    bind_host: str = DEFAULTS.host,
    smoothing: float = DEFAULTS.smoothing,
    stall_seconds: float = DEFAULTS.stall_seconds,
    refresh_seconds: float = DEFAULTS.refresh_seconds,
    min_poll_interval: float = DEFAULTS.min_poll_interval,
    title: str | None = None,
    template_folder: str | os.PathLike | None = None,
    static_folder: str | os.PathLike | None = None,
) -> Flask:
    """Build the dashboard for the run whose logs are in `logs_dir`.

    output_dir: where checkpoints live (default: the parent of logs_dir).
    token: if set, every request must carry it (see auth.py); it never appears in the server's logs.
    bind_host: the address the server binds; on a loopback address the Host header must name a
        loopback address too (see exposure.py). Deciding whether a bind needs a token is the caller's
        job: cli.py and app_from_env apply exposure.decide().
    smoothing: default EMA weight for the loss card and plots.
    stall_seconds: silence after which a run without run_end is "stalled".
    refresh_seconds: the page's default auto-refresh interval.
    min_poll_interval: the log files are re-read at most this often.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError("smoothing must be in [0, 1)")
    logs_dir = os.path.abspath(logs_dir)
    output_dir = os.path.abspath(output_dir) if output_dir else os.path.dirname(logs_dir)
    app = Flask(
        __name__,
        template_folder=str(template_folder or REPO_ROOT / "templates"),
        static_folder=str(static_folder or REPO_ROOT / "static"),
        static_url_path="/static",
    )
    app.config.update(DEBUG=False, TESTING=False)
    app.json.sort_keys = False
    smoother = SmoothingCache()
    app.extensions[EXTENSION] = DashboardState(
        monitor=RunMonitor(logs_dir, min_interval=min_poll_interval),
        checkpoints=CheckpointScanner(output_dir),
        gpu=GpuProbe(),
        plots=PlotCache(smoother),
        smoother=smoother,
        output_dir=output_dir,
        smoothing=smoothing,
        stall_seconds=stall_seconds,
        refresh_seconds=refresh_seconds,
        title=title or os.path.basename(output_dir.rstrip(os.sep)) or "training run",
    )
    redact_server_logs(token, (app.logger,))
    allowed_hosts = host_header_names(bind_host)
    if allowed_hosts is not None:
        app.before_request(_host_check(allowed_hosts))  # before the token check: no oracle for a rebound page
    if token:
        install_token_auth(app, token)
    app.register_blueprint(pages)
    app.register_blueprint(api)
    app.after_request(_secure_headers)
    app.register_error_handler(HTTPException, _http_error)
    return app


def _host_check(allowed: tuple[str, ...]):
    """Refuse requests whose Host header names anything but this machine (DNS rebinding)."""
    names = ", ".join(allowed)

    def check_host():
        if host_header_name(request.headers.get("Host")) not in allowed:
            abort(400, f"this dashboard is bound to a loopback address and answers only to the host names {names}; "
                       "open it as http://127.0.0.1:<port>/ (or through an SSH tunnel to it)")

    return check_host


def _secure_headers(response):
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    if request.path.startswith("/api/") and response.mimetype == "application/json":
        response.headers["Cache-Control"] = "no-store"
    return response


def _http_error(exc: HTTPException):
    """JSON errors for the API, Werkzeug's plain pages elsewhere."""
    if not request.path.startswith("/api/"):
        return exc
    response = jsonify(error=exc.name, detail=exc.description, status=exc.code)
    response.status_code = exc.code or 500
    return response
