"""Series maths: TensorBoard's debiased EMA, min/max downsampling, export."""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from .tables import GrowableColumn

# name -> (monitor sink, column).  Also the allow-list for /api/series/<name>.
SERIES = {
    "loss": ("train", "loss"),
    "lr": ("train", "lr"),
    "grad_norm": ("train", "grad_norm"),
    "tokens_per_sec": ("train", "tokens_per_sec"),
    "val_loss": ("eval", "val_loss"),
    "perplexity": ("eval", "perplexity"),
}
DEFAULT_MAX_POINTS = 1500

# The running sum is rescaled by w**-j inside a block; capping the exponent at
# e**200 keeps it far from float overflow whatever the weight.
_MAX_BLOCK_LOG = 200.0


def ema(values: np.ndarray, weight: float) -> np.ndarray:
    """Debiased exponential moving average, exactly as TensorBoard smooths.

    s_t = w*s_{t-1} + (1-w)*y_t from s_0 = 0, reported as s_t / (1 - w**t),
    where t counts finite values only; non-finite values pass through
    unchanged and do not move the average.
    """
    return _ema_from(np.array(values, dtype=np.float64), weight, 0.0, 0)[0]


def _ema_from(values: np.ndarray, w: float, state: float, count: int) -> tuple[np.ndarray, float, int]:
    """Continue an EMA over `values` (modified in place) from (state, count).

    Returns (smoothed values, new state, new count of finite values seen).
    """
    finite = np.isfinite(values)
    if w <= 0 or not finite.any():
        return values, state, count
    states = _ema_states(values[finite], w, state)
    last_state = float(states[-1])
    t = count + np.arange(1.0, len(states) + 1)
    # 1 - w**t is 1.0 in floating point once w**t < 1e-17; skip those.
    debias = t < 40.0 / -math.log(w)
    states[debias] /= 1.0 - w ** t[debias]
    values[finite] = states
    return values, last_state, count + len(states)


def _ema_states(y: np.ndarray, w: float, start: float) -> np.ndarray:
    """Undebiased states w*s + (1-w)*y from s = `start`, vectorised by blocks."""
    n = len(y)
    block = max(1, min(n, int(_MAX_BLOCK_LOG / -math.log(w))))
    rows = -(-n // block)
    padded = np.zeros(rows * block)
    padded[:n] = y
    grid = padded.reshape(rows, block)
    j = np.arange(block)
    grow, decay = w ** -(j + 1.0), w ** (j + 1.0)
    # Each block's EMA as if it started from zero, all blocks at once ...
    local = np.cumsum(grid * ((1 - w) * grow), axis=1) * decay
    # ... then the state carried in from the previous blocks, one scalar each.
    carry = np.zeros(rows)
    state, w_block = start, w**block
    for k, end in enumerate(local[:, -1].tolist()):
        carry[k] = state
        state = state * w_block + end
    return (local + carry[:, None] * decay).ravel()[:n]


class SmoothingCache:
    """Smoothed copies of growing series, extended in O(new points).

    The live page re-reads the smoothed loss every few seconds while a
    handful of steps were appended; redoing the EMA over a million points
    each time would cost tens of milliseconds.  An entry is rebuilt when its
    table's `generation` says rows were removed or replaced.
    """

    MAX_ENTRIES = 6

    def __init__(self):
        self._entries: dict[tuple, dict] = {}

    def for_table(self, table, column: str, weight: float) -> np.ndarray:
        """ema(table.column(column), weight), reusing the work of earlier calls."""
        # Tables live as long as the app (a new run clears them in place).
        return self.smoothed((id(table), column, weight), table.generation, table.column(column), weight)

    def smoothed(self, key: tuple, generation: int, values: np.ndarray, weight: float) -> np.ndarray:
        entry = self._entries.pop(key, None)
        if entry is None or entry["generation"] != generation or entry["rows"] > len(values):
            entry = {"generation": generation, "rows": 0, "state": 0.0, "count": 0, "out": GrowableColumn()}
        new, entry["state"], entry["count"] = _ema_from(
            np.array(values[entry["rows"] :], dtype=np.float64), weight, entry["state"], entry["count"])
        entry["out"].extend(new)
        entry["rows"] = len(values)
        self._entries[key] = entry  # most recently used last
        while len(self._entries) > self.MAX_ENTRIES:
            self._entries.pop(next(iter(self._entries)))
        return entry["out"].values()


def ema_memory(weight: float) -> int:
    """How many recent values decide an EMA: older ones weigh < 1e-17."""
    return int(40.0 / -math.log(weight)) + 1 if weight > 0 else 1


def ema_last(values: np.ndarray, weight: float, more_before: bool = False) -> float | None:
    """Last value of `ema(values, weight)` from the tail alone (O(1) in length).

    Terms older than ~40/-ln(w) steps weigh less than 1e-17, so they cannot
    change the result; the count of finite values matters only while it is
    smaller than that.  With `more_before`, `values` is the tail of a longer
    series: None means the tail was not enough, pass the whole series.
    """
    if len(values) == 0:
        return None
    if not math.isfinite(values[-1]) or weight <= 0:
        return float(values[-1])
    window = ema_memory(weight)
    count = int(np.isfinite(values).sum())
    if more_before and count < window:
        return None
    tail = values[-window:]
    tail = tail[np.isfinite(tail)]
    powers = weight ** np.arange(len(tail) - 1, -1, -1.0)
    return float((1 - weight) * np.dot(powers, tail) / (1 - weight**count))


def downsample_indices(values: np.ndarray, max_points: int) -> np.ndarray:
    """Indices of at most `max_points` points that keep every spike visible.

    The first and last points are always kept; the rest is cut into buckets
    and each contributes its minimum and its maximum.
    """
    n = len(values)
    if n <= max_points:
        return np.arange(n)
    buckets = (max_points - 2) // 2
    if buckets < 1:
        return np.array([0, n - 1])
    inner = values[1:-1]
    size = -(-len(inner) // buckets)
    rows = -(-len(inner) // size)
    finite = np.isfinite(inner)
    lows = _padded(np.where(finite, inner, np.inf), rows * size, np.inf).reshape(rows, size)
    highs = _padded(np.where(finite, inner, -np.inf), rows * size, -np.inf).reshape(rows, size)
    base = np.arange(rows) * size + 1
    picked = np.concatenate([base + lows.argmin(axis=1), base + highs.argmax(axis=1)])
    picked = np.unique(np.minimum(picked, n - 2))
    return np.concatenate([[0], picked, [n - 1]])


def _padded(values: np.ndarray, length: int, fill: float) -> np.ndarray:
    out = np.full(length, fill)
    out[: len(values)] = values
    return out


def json_floats(values: np.ndarray) -> list:
    """NaN/inf are not JSON; they become null."""
    return [v if math.isfinite(v) else None for v in values.tolist()]


def build_series(name: str, x: np.ndarray, y: np.ndarray, smoothing: float, max_points: int | None,
                 smoothed: np.ndarray | None = None) -> dict:
    """The /api/series payload; `smoothed` is ema(y, smoothing) if already known."""
    if smoothing > 0 and smoothed is None:
        smoothed = ema(y, smoothing)
    shown = smoothed if smoothing > 0 else y
    idx = downsample_indices(shown, max_points) if max_points else np.arange(len(y))
    payload = {
        "name": name,
        "x": x[idx].astype(np.int64).tolist(),
        "y": json_floats(shown[idx]),
        "smoothing": smoothing,
        "points": int(len(idx)),
        "total_points": int(len(y)),
    }
    if smoothing > 0:
        payload["raw"] = json_floats(y[idx])
    return payload


def series_csv(series: dict) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    smoothed = "raw" in series
    header = ["step", series["name"]] + ([f"{series['name']}_smoothed"] if smoothed else [])
    writer.writerow(header)
    raw = series["raw"] if smoothed else series["y"]
    for i, step in enumerate(series["x"]):
        row = [step, _cell(raw[i])] + ([_cell(series["y"][i])] if smoothed else [])
        writer.writerow(row)
    return out.getvalue()


def _cell(value) -> str:
    return "" if value is None else repr(value)
