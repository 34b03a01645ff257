"""The dashboard's view of one run: the five log files and what they hold.

The files and their kinds are the trainer's own (glmkit.run.logs.LOG_FILES); each
kind has a sink here under the same name (`run.train`, `run.eval`, ...).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from glmkit.run.logs import LOG_FILES

from .evalsets import EvalSink
from .experts import ExpertSink
from .logreader import JsonlTail, RecordSink, TableSink, is_step_record

# Events are read first: a resume event must be seen no later than the records
# the resumed run writes after it.
READ_ORDER = ("events", *(kind for kind in LOG_FILES if kind != "events"))
# Expert records are large (layers x experts counts) and only the newest one
# and a short history are shown, so a long backlog is skipped, not parsed.
MAX_BACKLOG = {"experts": 32 << 20}
# `tokens` (per step) backs the "tokens seen" card for logs written before `tokens_seen` existed.
TRAINING_FIELDS = ("loss", "lr", "grad_norm", "tokens_per_sec", "tokens")
# Parsed on first use (all but `step`): /api/stats needs only their last values.
LAZY_TRAINING_FIELDS = ("time", *TRAINING_FIELDS)


class RunMonitor:
    """Owns the tails; every reader goes through `locked()` so data is consistent.

    Refreshes are throttled to `min_interval` seconds: a page load fires a
    dozen requests at once and one read of the files serves them all.
    """

    def __init__(self, logs_dir: str, min_interval: float = 0.25):
        self.logs_dir = os.path.abspath(logs_dir)
        self.min_interval = min_interval
        self.train = TableSink(TRAINING_FIELDS, lazy=LAZY_TRAINING_FIELDS)
        self.eval = EvalSink()  # the selection set's columns, and a table per eval set
        self.experts = ExpertSink()
        self.events = RecordSink()
        self.errors = RecordSink()
        self.tails = {
            kind: JsonlTail(os.path.join(self.logs_dir, LOG_FILES[kind]), getattr(self, kind),
                            max_backlog=MAX_BACKLOG.get(kind))
            for kind in READ_ORDER
        }
        self._lock = threading.Lock()
        self._last_refresh = float("-inf")
        self._resumes_applied = 0
        self._events_resets = 0

    @contextmanager
    def locked(self) -> Iterator[RunMonitor]:
        with self._lock:
            self._refresh()
            yield self

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self._last_refresh < self.min_interval:
            return
        self._last_refresh = now
        for tail in self.tails.values():
            tail.poll()
        self._apply_resumes()

    def _apply_resumes(self) -> None:
        if self.events.resets != self._events_resets:
            self._events_resets, self._resumes_applied = self.events.resets, 0
        new = self.events.added_since(self._resumes_applied)
        self._resumes_applied = self.events.total
        for event in new:
            if event.get("event") != "resume":
                continue
            from_step, when = event.get("from_step"), event.get("time")
            if is_step_record({"step": from_step}) and isinstance(when, (int, float)):
                for table in (self.train.table, *self.eval.tables(), self.experts.table):
                    table.supersede(from_step, when)

    # -- facts derived from the files themselves ---------------------------

    def last_write_time(self) -> float | None:
        times = [t.mtime for t in self.tails.values() if t.mtime is not None]
        return max(times) if times else None

    def bad_lines(self) -> dict[str, int]:
        return {LOG_FILES[kind]: tail.bad_lines for kind, tail in self.tails.items()}

    def problems(self) -> dict[str, str]:
        """Log files that exist but cannot be read (a directory, a symlink, no permission), and why."""
        return {LOG_FILES[kind]: tail.problem for kind, tail in self.tails.items() if tail.problem}

    def has_data(self) -> bool:
        return any(t.offset for t in self.tails.values())

    def versions(self) -> dict[str, int]:
        """Change counters, used as cache keys and plot cache-busters."""
        return {
            "train": self.train.table.version,
            "eval": self.eval.table.version,
            "experts": self.experts.table.version,
            "events": self.events.version,
            "errors": self.errors.version,
        }
