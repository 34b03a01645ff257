"""The HTML page and the liveness probe."""

from __future__ import annotations

import os

from flask import Blueprint, jsonify, render_template

from .state import dashboard

pages = Blueprint("pages", __name__)


@pages.get("/")
def index():
    state = dashboard()
    return render_template(
        "dashboard_enhanced.html",
        title=state.title,
        logs_dir=state.monitor.logs_dir,
        output_dir=state.output_dir or "",
        refresh_seconds=state.refresh_seconds,
        smoothing=state.smoothing,
    )


@pages.get("/health")
def health():
    state = dashboard()
    return jsonify(
        status="ok",
        logs_dir=state.monitor.logs_dir,
        logs_dir_exists=os.path.isdir(state.monitor.logs_dir),
        output_dir=state.output_dir,
    )
