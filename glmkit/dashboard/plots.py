"""Server-side PNG plots (Matplotlib, Agg), cached until their data changes.

Data is gathered (downsampled) under the monitor lock, but drawn outside it:
drawing takes ~100 ms, which must not delay /api/stats.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import math
import threading

import matplotlib

matplotlib.use("Agg")  # before any figure is made: the server has no display

import numpy as np  # noqa: E402
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from .evalsets import collect as collect_eval_sets  # noqa: E402
from .evalsets import collect_acceptance  # noqa: E402
from .monitor import RunMonitor  # noqa: E402
from .series import SmoothingCache, downsample_indices, ema  # noqa: E402

PLOT_POINTS = 1200
# Inches at 130 dpi; the page lays plots out two, three and one to a row.
FIGURE_SIZE = {"lr": (4.3, 3.0), "grad_norm": (4.3, 3.0), "throughput": (4.3, 3.0), "experts": (12.8, 3.6),
               "eval_sets": (12.8, 3.2), "mtp": (12.8, 3.2)}
INK, MUTED, GRID = "#1f2937", "#6b7280", "#e5e7eb"
BLUE, ORANGE, GREEN, PURPLE, RED = "#2563eb", "#ea580c", "#059669", "#7c3aed", "#dc2626"
SET_COLORS = (ORANGE, BLUE, PURPLE, RED, "#0891b2", "#ca8a04", "#db2777", "#4b5563")  # eval sets, in page order

# name -> the monitor data it depends on (for the cache key).  Also the
# allow-list for /api/plots/<name>.png.
PLOTS = {
    "loss": ("train", "eval", "events"),
    "lr": ("train",),
    "grad_norm": ("train",),
    "throughput": ("train",),
    "validation": ("eval", "events"),
    "eval_sets": ("eval",),
    "mtp": ("eval",),
    "experts": ("experts",),
}


def plot_versions(versions: dict[str, int]) -> dict[str, str]:
    """Per-plot data version; the page adds it to the URL to fetch only changed plots."""
    return {name: "-".join(str(versions[dep]) for dep in deps) for name, deps in PLOTS.items()}


def _xy(table, column: str, smoothing: float = 0.0, smoother: SmoothingCache | None = None) -> dict:
    x, y = table.column("step"), table.column(column)
    smooth = None
    if smoothing > 0:
        smooth = smoother.for_table(table, column, smoothing) if smoother else ema(y, smoothing)
    idx = downsample_indices(y, PLOT_POINTS)
    return {"x": x[idx].copy(), "y": y[idx].copy(), "smooth": smooth[idx] if smooth is not None else None}


def _event_steps(run: RunMonitor, kind: str) -> list[int]:
    key = "from_step" if kind == "resume" else "step"
    return [e[key] for e in run.events.records if e.get("event") == kind and isinstance(e.get(key), int)]


def collect(run: RunMonitor, name: str, smoothing: float, smoother: SmoothingCache | None = None) -> dict:
    """Copy what `name` needs out of the monitor (call with its lock held)."""
    train, evals = run.train.table, run.eval.table
    if name == "loss":
        return {**_xy(train, "loss", smoothing, smoother), "val": _xy(evals, "val_loss"),
                "checkpoints": _event_steps(run, "checkpoint_saved"), "resumes": _event_steps(run, "resume")}
    if name in ("lr", "grad_norm"):
        return _xy(train, name)
    if name == "throughput":
        return _xy(train, "tokens_per_sec", smoothing, smoother)
    if name == "validation":
        return {"val": _xy(evals, "val_loss"), "ppl": _xy(evals, "perplexity")}
    if name == "eval_sets":
        return collect_eval_sets(run.eval)
    if name == "mtp":
        return collect_acceptance(run.eval)
    return {"record": run.experts.current()}


def _figure(width: float = 6.4, height: float = 3.0) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), dpi=130, facecolor="white")
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("white")
    _style(ax)
    return fig, ax


def _title(ax, text: str) -> None:
    ax.set_title(text, loc="left", fontsize=10, color=INK, fontweight="bold", pad=8)


def _empty(ax, message: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    ax.text(0.5, 0.5, message, ha="center", va="center", color=MUTED, fontsize=10, transform=ax.transAxes)


def _legend(ax, *more_axes) -> None:
    handles, labels = ax.get_legend_handles_labels()
    for other in more_axes:
        more_handles, more_labels = other.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right", fontsize=7, frameon=False, labelcolor=MUTED, ncols=4)


def _draw_loss(ax, d: dict) -> None:
    _title(ax, "Training loss")
    if not len(d["x"]):
        return _empty(ax, "No training steps logged yet")
    ax.plot(d["x"], d["y"], color=BLUE, alpha=0.25, linewidth=0.8, label="loss")
    line = d["smooth"] if d["smooth"] is not None else d["y"]
    ax.plot(d["x"], line, color=BLUE, linewidth=1.6, label="smoothed" if d["smooth"] is not None else None)
    if len(d["val"]["x"]):
        ax.plot(d["val"]["x"], d["val"]["y"], "o-", color=ORANGE, markersize=3, linewidth=1, label="val")
    ckpt = [s for s in d["checkpoints"] if d["x"][0] <= s <= d["x"][-1]]
    if ckpt:
        ax.plot(ckpt, np.interp(ckpt, d["x"], np.nan_to_num(line, nan=np.nanmean(line))), "D",
                color=GREEN, markersize=5, label="checkpoint", zorder=3)
    for step in d["resumes"]:
        ax.axvline(step, color=PURPLE, linestyle=":", linewidth=1)
    ax.set_xlabel("step", fontsize=8, color=MUTED)
    _legend(ax)


def _compact(value: float, _pos=None) -> str:
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{unit}"
    return f"{value:.3g}"


def _scientific(value: float, _pos=None) -> str:
    return f"{value:.1e}".replace("e-0", "e-") if value else "0"


def _draw_line(ax, d: dict, title: str, color: str, ylabel: str, log_if_wide: bool = False,
               formatter=None) -> None:
    _title(ax, title)
    if not len(d["x"]):
        return _empty(ax, "No training steps logged yet")
    alpha = 0.3 if d["smooth"] is not None else 1.0
    ax.plot(d["x"], d["y"], color=color, linewidth=1.1, alpha=alpha)
    if d["smooth"] is not None:
        ax.plot(d["x"], d["smooth"], color=color, linewidth=1.6)
    finite = d["y"][np.isfinite(d["y"]) & (d["y"] > 0)]
    if log_if_wide and finite.size and finite.max() / finite.min() > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step", fontsize=8, color=MUTED)
    ax.set_ylabel(ylabel, fontsize=8, color=MUTED)
    if formatter is not None and ax.get_yscale() == "linear":
        ax.yaxis.set_major_formatter(FuncFormatter(formatter))


def _draw_validation(ax, d: dict) -> None:
    _title(ax, "Validation loss and perplexity")
    val, ppl = d["val"], d["ppl"]
    if not len(val["x"]):
        return _empty(ax, "No evaluation yet")
    ax.plot(val["x"], val["y"], "o-", color=ORANGE, markersize=3.5, linewidth=1.4, label="val loss")
    ax.set_ylabel("val loss", fontsize=8, color=ORANGE)
    ax.set_xlabel("step", fontsize=8, color=MUTED)
    # The best is an adapter's: step 0 (the base model, eval.at_start) is no candidate, as on the cards.
    candidates = np.flatnonzero(np.isfinite(val["y"]) & (val["x"] > 0))
    if candidates.size:
        i = int(candidates[np.argmin(val["y"][candidates])])
        ax.plot(val["x"][i], val["y"][i], "*", color=GREEN, markersize=12, label="best", zorder=3)
    twin = None
    if np.isfinite(ppl["y"]).any():
        twin = ax.twinx()
        twin.plot(ppl["x"], ppl["y"], "s--", color=PURPLE, markersize=2.5, linewidth=1, alpha=0.8, label="perplexity")
        twin.tick_params(colors=MUTED, labelsize=8, length=0)
        twin.set_ylabel("perplexity", fontsize=8, color=PURPLE)
        for side in twin.spines.values():
            side.set_visible(False)
    _legend(ax, *([twin] if twin else []))


def _style(ax) -> None:
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    for side in ("left", "bottom"):
        ax.spines[side].set_color(GRID)
    ax.tick_params(colors=MUTED, labelsize=8, length=0, pad=4)
    ax.grid(True, color=GRID, linewidth=0.7)
    ax.set_axisbelow(True)


def _draw_eval_sets(fig: Figure, ax, sets: dict) -> None:
    """Left: each set's loss, a star at its best step. Right: its change from step 0 (above 0: worse than the base)."""
    panels = _per_set_panels(fig, ax, sets, "Eval loss per set", "No evaluation yet",
                             "Change from step 0 (above 0: worse than the base model)")
    if panels is None:
        return
    ax, delta = panels
    any_baseline = False
    for (name, d), color in zip(sets.items(), itertools.cycle(SET_COLORS)):
        label = f"{name} (selects best)" if d["selected"] else name
        ax.plot(d["x"], d["y"], "o-", color=color, markersize=3, linewidth=1.4, label=label)
        if d["best_step"] is not None:
            i = int(np.flatnonzero(d["x"] == d["best_step"])[0])
            ax.plot(d["x"][i], d["y"][i], "*", color=color, markersize=11, markeredgecolor="white", zorder=3)
        if d["baseline"] is not None:
            any_baseline = True
            delta.plot(d["x"], d["y"] - d["baseline"], "o-", color=color, markersize=3, linewidth=1.4, label=name)
    ax.set_xlabel("step", fontsize=8, color=MUTED)
    ax.set_ylabel("loss", fontsize=8, color=MUTED)
    _legend(ax)
    _change_panel(delta, any_baseline, "loss − loss at step 0")  # colours as on the left


def _per_set_panels(fig: Figure, ax, sets: dict, title: str, nothing: str, change_title: str):
    """The two panels of a per-set figure, each set's values (left) and their change from step 0 (right); None,
    with both marked empty, when there is no set to draw."""
    fig.delaxes(ax)
    ax, delta = fig.subplots(1, 2)
    for each in (ax, delta):
        each.set_facecolor("white")
        _style(each)
    _title(ax, title)
    if not sets:
        _empty(delta, "")
        _empty(ax, nothing)
        return None
    _title(delta, change_title)
    return ax, delta


def _change_panel(delta, any_baseline: bool, ylabel: str) -> bool:
    """The change-from-step-0 panel's axes: a zero line and labels, or a note that there is no step 0."""
    if not any_baseline:
        _empty(delta, "No step-0 eval in this log (eval.at_start)")
        return False
    delta.axhline(0, color=MUTED, linewidth=1, linestyle="--")
    delta.set_xlabel("step", fontsize=8, color=MUTED)
    delta.set_ylabel(ylabel, fontsize=8, color=MUTED)
    return True


def _decimals_for(ax) -> int:
    """As many decimals (of a percentage) as the axis' tick spacing needs, so no two ticks read the same: an
    acceptance of 0.1% to 0.3% would otherwise be labelled 0%, 0%, 0%."""
    ticks = np.asarray(ax.get_yticks(), dtype=float) * 100
    spacing = np.diff(ticks).min() if ticks.size > 1 else 1.0
    return int(min(4, max(0, -math.floor(math.log10(spacing))))) if spacing > 0 else 0


def _percent_axis(ax) -> None:
    decimals = _decimals_for(ax)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _pos=None: f"{100 * value:.{decimals}f}%"))


def _points_axis(ax) -> None:
    decimals = _decimals_for(ax)
    ax.yaxis.set_major_formatter(FuncFormatter(
        lambda value, _pos=None: f"{100 * value:+.{decimals}f} pt" if round(100 * value, decimals) else "0"))


def _draw_acceptance(fig: Figure, ax, sets: dict) -> None:
    """Left: each set's MTP acceptance (drafts the servers' speculative decoding would accept). Right: its
    change from step 0, in points (below 0: fewer accepted than with the base model, serving slows)."""
    panels = _per_set_panels(fig, ax, sets, "MTP speculative acceptance per set",
                             "No MTP acceptance in this log (the model has no MTP layer)",
                             "Change from step 0 (below 0: fewer drafts accepted than at the start)")
    if panels is None:
        return
    ax, delta = panels
    any_baseline = False
    for (name, d), color in zip(sets.items(), itertools.cycle(SET_COLORS)):
        ax.plot(d["x"], d["y"], "o-", color=color, markersize=3, linewidth=1.4, label=name)
        if d["baseline"] is not None:
            any_baseline = True
            delta.plot(d["x"], d["y"] - d["baseline"], "o-", color=color, markersize=3, linewidth=1.4, label=name)
    ax.set_xlabel("step", fontsize=8, color=MUTED)
    ax.set_ylabel("drafts accepted", fontsize=8, color=MUTED)
    _percent_axis(ax)
    _legend(ax)
    if _change_panel(delta, any_baseline, "acceptance − acceptance at step 0"):
        _points_axis(delta)


def _draw_experts(fig: Figure, ax, d: dict) -> None:
    record = d["record"]
    layers = [layer for layer in (record or {}).get("layers", [])
              if isinstance(layer, dict) and isinstance(layer.get("counts"), list)]
    if not layers or len({len(layer["counts"]) for layer in layers}) != 1:
        _title(ax, "Expert load (layer x expert)")
        return _empty(ax, "No expert usage logged yet")
    _title(ax, f"Expert load at step {record.get('step')} (layer x expert)")
    counts = np.array([layer["counts"] for layer in layers], dtype=float)
    mean = counts.mean(axis=1, keepdims=True)
    ratio = np.log2(np.clip(counts / np.where(mean > 0, mean, 1), 1 / 8, 8))
    ax.grid(False)
    image = ax.imshow(ratio, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(0, -3, 3), interpolation="nearest")
    labels = [str(layer.get("layer", i)) for i, layer in enumerate(layers)]
    ticks = np.arange(0, len(labels), max(1, len(labels) // 12))
    ax.set_yticks(ticks, [labels[t] for t in ticks])
    ax.set_ylabel("layer", fontsize=8, color=MUTED)
    ax.set_xlabel("expert", fontsize=8, color=MUTED)
    bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01, ticks=[-3, -1, 0, 1, 3])
    bar.ax.set_yticklabels(["≤⅛×", "½×", "mean", "2×", "≥8×"], fontsize=7, color=MUTED)
    bar.outline.set_visible(False)


def render(name: str, data: dict) -> bytes:
    fig, ax = _figure(*FIGURE_SIZE.get(name, (6.4, 3.0)))
    if name == "loss":
        _draw_loss(ax, data)
    elif name == "lr":
        _draw_line(ax, data, "Learning rate", PURPLE, "lr", formatter=_scientific)
    elif name == "grad_norm":
        _draw_line(ax, data, "Gradient norm", RED, "grad norm", log_if_wide=True, formatter=_compact)
    elif name == "throughput":
        _draw_line(ax, data, "Throughput", GREEN, "tokens / s", formatter=_compact)
    elif name == "validation":
        _draw_validation(ax, data)
    elif name == "eval_sets":
        _draw_eval_sets(fig, ax, data)
    elif name == "mtp":
        _draw_acceptance(fig, ax, data)
    else:
        _draw_experts(fig, ax, data)
    fig.tight_layout(pad=0.6)
    out = io.BytesIO()
    FigureCanvasAgg(fig).print_png(out)
    return out.getvalue()


class PlotCache:
    """One PNG per (plot, smoothing), redrawn only when its inputs changed."""

    def __init__(self, smoother: SmoothingCache | None = None):
        self.smoother = smoother
        self._lock = threading.Lock()  # also serialises Matplotlib, which is not thread-safe
        self._png: dict[tuple[str, float], tuple[str, bytes]] = {}

    def get(self, run: RunMonitor, name: str, smoothing: float) -> tuple[str, bytes]:
        with run.locked():
            key = f"{name}:{smoothing}:{plot_versions(run.versions())[name]}"
            etag = hashlib.sha1(key.encode()).hexdigest()[:20]
            cached = self._png.get((name, smoothing))
            if cached and cached[0] == etag:
                return cached
            data = collect(run, name, smoothing, self.smoother)
        with self._lock:
            png = render(name, data)
            if len(self._png) > 64:  # many smoothing values: drop them all, cheap to redo
                self._png.clear()
            self._png[(name, smoothing)] = (etag, png)
        return etag, png
