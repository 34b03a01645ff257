"""JSON API blueprint.  Every name taken from a URL is checked against a fixed
allow-list before use; none of them ever reaches the file system."""

from __future__ import annotations

import time

from flask import Blueprint, Response, abort, jsonify, request

from .checkpoints import merge_with_events
from .events import timeline_entry
from .experts import latest_expert_state
from .plots import PLOTS, plot_versions
from .series import DEFAULT_MAX_POINTS, SERIES, build_series, series_csv
from .state import clean, dashboard
from .stats import compute_stats

api = Blueprint("api", __name__, url_prefix="/api")

MAX_POINTS_LIMIT = 1_000_000
MAX_LIST_LIMIT = 10_000


def _smoothing(default: float) -> float:
    raw = request.args.get("smoothing")
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        abort(400, "smoothing must be a number in [0, 1)")
    if not 0.0 <= value < 1.0:
        abort(400, "smoothing must be a number in [0, 1)")
    return value


def _int_arg(name: str, default: int | None, low: int, high: int) -> int | None:
    raw = request.args.get(name)
    if raw is None:
        return default
    # The length check comes first: int() refuses 4,301+ digits with a ValueError.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= len(str(high))) or not low <= int(raw) <= high:
        abort(400, f"{name} must be an integer in [{low}, {high}]")
    return int(raw)


@api.get("/stats")
def stats():
    state = dashboard()
    smoothing = _smoothing(state.smoothing)
    with state.monitor.locked() as run:
        payload = compute_stats(run, time.time(), smoothing, state.stall_seconds, state.tokens_estimate)
    payload["plot_versions"] = plot_versions(payload["versions"])
    return jsonify(clean(payload))


@api.get("/series/<name>")
def series(name: str):
    if name not in SERIES:
        abort(404)
    fmt = request.args.get("format", "json")
    if fmt not in ("json", "csv"):
        abort(400, "format must be json or csv")
    smoothing = _smoothing(0.0)
    # An export is the full series unless a limit is asked for.
    default_points = None if fmt == "csv" else DEFAULT_MAX_POINTS
    max_points = _int_arg("max_points", default_points, 2, MAX_POINTS_LIMIT)
    sink, column = SERIES[name]
    state = dashboard()
    with state.monitor.locked() as run:
        table = getattr(run, sink).table
        smoothed = state.smoother.for_table(table, column, smoothing) if smoothing > 0 else None
        payload = build_series(name, table.column("step"), table.column(column), smoothing, max_points, smoothed)
    if fmt == "csv":
        return Response(series_csv(payload), mimetype="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}.csv"'})
    return jsonify(payload)


@api.get("/plots/<name>.png")
def plot(name: str):
    if name not in PLOTS:
        abort(404)
    state = dashboard()
    etag, png = state.plots.get(state.monitor, name, _smoothing(state.smoothing))
    response = Response(png, mimetype="image/png")
    response.set_etag(etag)
    response.headers["Cache-Control"] = "no-cache"  # revalidate: the ETag makes that a cheap 304
    return response.make_conditional(request)


@api.get("/checkpoints")
def checkpoints():
    state = dashboard()
    with state.monitor.locked() as run:
        events = list(run.events.records)
    return jsonify(clean(merge_with_events(state.checkpoints.scan(), events)))


@api.get("/events")
def events():
    records, total = _newest_records("events", default_limit=500)
    return jsonify(clean({"events": [timeline_entry(e) for e in records], "total": total}))


@api.get("/run")
def run_info():
    """The newest run_start event in full: config, world size, model audit."""
    with dashboard().monitor.locked() as run:
        start = next((e for e in reversed(run.events.records) if e.get("event") == "run_start"), None)
    return jsonify(clean({"run_start": start}))


@api.get("/experts")
def experts():
    with dashboard().monitor.locked() as run:
        record = run.experts.current()
        table = run.experts.table
        history = {"step": table.column("step")[-200:].astype(int).tolist(),
                   **{k: table.column(k)[-200:].tolist() for k in ("mean_entropy", "max_over_mean")}}
        start = next((e for e in reversed(run.events.records) if e.get("event") == "run_start"), None) or {}
    payload = latest_expert_state(record, demo_model=bool(start.get("demo_model")))
    payload["history"] = history
    return jsonify(clean(payload))


@api.get("/gpu")
def gpu():
    return jsonify(clean(dashboard().gpu.read()))


@api.get("/errors")
def errors():
    records, total = _newest_records("errors", default_limit=100)
    return jsonify(clean({"errors": records, "total": total}))


def _newest_records(log: str, default_limit: int) -> tuple[list[dict], int]:
    """The newest ?limit= records of the run's events or errors log, and how many it holds."""
    limit = _int_arg("limit", default_limit, 1, MAX_LIST_LIMIT)
    with dashboard().monitor.locked() as run:
        source = getattr(run, log)
        return source.records[-limit:], source.total
