"""Everything a request needs, hung on the Flask app as one extension."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from flask import current_app

from .checkpoints import CheckpointScanner
from .gpu import GpuProbe
from .monitor import RunMonitor
from .plots import PlotCache
from .series import SmoothingCache
from .stats import TokensSeenEstimate

EXTENSION = "glmkit_dashboard"


@dataclass
class DashboardState:
    monitor: RunMonitor
    checkpoints: CheckpointScanner
    gpu: GpuProbe
    plots: PlotCache
    smoother: SmoothingCache
    output_dir: str | None
    smoothing: float
    stall_seconds: float
    refresh_seconds: float
    title: str
    tokens_estimate: TokensSeenEstimate = field(default_factory=TokensSeenEstimate)


def dashboard() -> DashboardState:
    return current_app.extensions[EXTENSION]


def clean(value):
    """Make log-derived values valid JSON: NaN and infinities become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    return value
