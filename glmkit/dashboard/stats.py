"""The numbers on the cards: progress, training, validation, run status."""

from __future__ import annotations

import math

import numpy as np

from .evalsets import eval_sets_stats
from .monitor import RunMonitor
from .series import ema_last, ema_memory

LIFECYCLE = ("run_start", "resume", "preempted", "run_end")
# A run is "stalled" when nothing was written for max(stall_seconds,
# STALL_STEPS x the recent time per step): slow steps are not a stall.
STALL_STEPS = 10


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _last_lifecycle(run: RunMonitor) -> dict | None:
    for event in reversed(run.events.records):
        if event.get("event") in LIFECYCLE:
            return event
    return None


def seconds_per_step(run: RunMonitor, window: int = 50) -> float | None:
    table = run.train.table
    steps, times = table.tail("step", window), table.tail("time", window)
    ok = np.isfinite(times)
    if ok.sum() < 2:
        return None
    d_step, d_time = np.diff(steps[ok]), np.diff(times[ok])
    rates = d_time[d_step > 0] / d_step[d_step > 0]
    return float(np.median(rates)) if rates.size else None


def run_status(run: RunMonitor, now: float, stall_seconds: float) -> str:
    """waiting | running | finished | preempted | crashed | stalled."""
    if not run.has_data():
        return "waiting"
    last = _last_lifecycle(run)
    if last is not None and last.get("event") == "run_end":
        return "preempted" if last.get("status") == "preempted" else "finished"
    started = _finite(last.get("time")) if last else None
    errors = run.errors.records
    if errors and (started is None or (_finite(errors[-1].get("time")) or math.inf) >= started):
        return "crashed"
    if last is not None and last.get("event") == "preempted":
        return "preempted"
    written = run.last_write_time()
    per_step = seconds_per_step(run) or 0.0
    if written is not None and now - written > max(stall_seconds, STALL_STEPS * per_step):
        return "stalled"
    return "running"


def _run_start(run: RunMonitor) -> dict | None:
    for event in reversed(run.events.records):
        if event.get("event") == "run_start":
            return event
    return None


class TokensSeenEstimate:
    """For logs written before the trainer recorded `tokens_seen`: the running sum of each logged step's
    `tokens` times the steps since the record before it (exact with log_interval 1), under the resume rule.

    Extended by the rows appended since the last call, restarted when rows were removed (a resume, a
    new run), so a long log costs one pass, not one per request.
    """

    def __init__(self):
        self._generation, self._rows, self._last_step, self._total, self._seen_any = None, 0, 0.0, 0.0, False

    def value(self, table) -> float | None:
        if table.generation != self._generation or len(table) < self._rows:
            self.__init__()
            self._generation = table.generation
        new = len(table) - self._rows
        if new > 0:
            tokens, steps = table.tail("tokens", new), table.tail("step", new)
            covered = np.diff(steps, prepend=self._last_step)
            finite = np.isfinite(tokens)
            self._total += float((tokens[finite] * covered[finite]).sum())
            self._seen_any = self._seen_any or bool(finite.any())
            self._rows, self._last_step = len(table), float(steps[-1])
        return self._total if self._seen_any else None


def tokens_seen(table, latest: dict, estimate: TokensSeenEstimate) -> tuple[float | None, bool]:
    """(cumulative non-pad input tokens, estimated?) as of the newest training record.

    The trainer writes `tokens_seen` in every record, continued across resumes; a log that predates it
    gets the estimate, flagged as such.
    """
    if not latest:
        return None, False
    if "tokens_seen" in latest:
        return _finite(latest["tokens_seen"]), False
    value = estimate.value(table)
    return value, value is not None


def progress_stats(run: RunMonitor, status: str, estimate: TokensSeenEstimate) -> dict:
    table, latest = run.train.table, run.train.current() or {}
    start = _run_start(run) or {}
    step = table.last("step")
    total = _finite(latest.get("total_steps")) or _finite(start.get("total_steps"))
    progress = min(1.0, step / total) if step is not None and total else None
    eta = _finite(latest.get("eta_seconds"))
    seen, estimated = tokens_seen(table, latest, estimate)
    if status == "finished":
        progress, eta = (1.0 if total else progress), 0.0
    return {
        "step": int(step) if step is not None else None,
        "total_steps": int(total) if total else None,
        "progress": progress,
        "elapsed_seconds": _finite(latest.get("elapsed_seconds")),
        "eta_seconds": eta,
        "epoch": _finite(latest.get("epoch")),
        "tokens": _finite(latest.get("tokens")),  # this step's
        "tokens_seen": seen,
        "tokens_seen_estimated": estimated,
        # of those, the loss targets (chat data trains on the assistant's tokens only); logs before it: None
        "trained_tokens_seen": _finite(latest.get("trained_tokens_seen")),
    }


def _smoothed_loss(table, smoothing: float) -> float | None:
    # The tail decides the EMA; the full (lazily parsed) column is read only
    # when the debiasing needs the exact count of finite values.
    tail = table.tail("loss", 2 * ema_memory(smoothing))  # 2x: room for a few NaNs
    value = ema_last(tail, smoothing, more_before=len(table) > len(tail))
    if value is None and len(table):
        value = ema_last(table.column("loss"), smoothing)
    return _finite(value)


def training_stats(run: RunMonitor, smoothing: float) -> dict:
    table, latest = run.train.table, run.train.current() or {}
    return {
        "loss": _finite(table.last("loss")),
        "loss_smoothed": _smoothed_loss(table, smoothing),
        "smoothing": smoothing,
        "lr": _finite(table.last("lr")),
        "grad_norm": _finite(table.last("grad_norm")),
        "tokens_per_sec": _finite(table.last("tokens_per_sec")),
        "steps_per_sec": _finite(latest.get("steps_per_sec")),
        "gpu_mem_allocated": _finite(latest.get("gpu_mem_allocated")),
        "gpu_mem_reserved": _finite(latest.get("gpu_mem_reserved")),
        "gpu_mem_peak": _finite(latest.get("gpu_mem_peak")),
    }


def validation_stats(run: RunMonitor) -> dict:
    table = run.eval.table
    steps, losses, ppl = table.column("step"), table.column("val_loss"), table.column("perplexity")
    finite = np.flatnonzero(np.isfinite(losses))
    if finite.size == 0:
        return {"evals": 0, "best_val_loss": None, "best_val_step": None, "val_loss": None,
                "val_step": None, "perplexity": None, "val_trend": None}
    trained = finite[steps[finite] > 0]  # step 0 is the base model's baseline, never the best adapter
    best = trained[np.argmin(losses[trained])] if trained.size else None
    last = finite[-1]
    trend = float(losses[last] - losses[finite[-2]]) if finite.size > 1 else None
    return {
        "evals": int(finite.size),
        "best_val_loss": float(losses[best]) if best is not None else None,
        "best_val_step": int(steps[best]) if best is not None else None,
        "val_loss": float(losses[last]),
        "val_step": int(steps[last]),
        "perplexity": _finite(ppl[last]) or _finite(math.exp(min(losses[last], 700.0))),
        "val_trend": trend,  # latest minus previous: negative is improving
    }


def compute_stats(run: RunMonitor, now: float, smoothing: float, stall_seconds: float,
                  tokens_estimate: TokensSeenEstimate | None = None) -> dict:
    status = run_status(run, now, stall_seconds)
    written = run.last_write_time()
    bad = run.bad_lines()
    return {
        **progress_stats(run, status, tokens_estimate or TokensSeenEstimate()),
        **training_stats(run, smoothing),
        **validation_stats(run),
        **eval_sets_stats(run.eval),
        "status": status,
        "last_write_time": written,
        "seconds_since_write": (now - written) if written is not None else None,
        "seconds_per_step": seconds_per_step(run),
        "bad_lines": sum(bad.values()),
        "bad_lines_by_file": bad,
        "log_problems": run.problems(),
        "errors": len(run.errors.records),
        "versions": run.versions(),
    }
