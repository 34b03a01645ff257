"""JSON-lines run logs: one file per kind, one record per line, flushed as written.

Every record carries `step` and `time` (unix seconds). Only the main process writes.
Resume rule for readers: for a given step, the latest record wins. Each record written is also
handed to the experiment trackers (glmkit/run/trackers.py), so they cannot drift from the files.
"""

from __future__ import annotations

import json
import math
import os
import time
import traceback

LOG_FILES = {
    "train": "training_log.jsonl",
    "eval": "eval_log.jsonl",
    "experts": "expert_usage_log.jsonl",
    "events": "events_log.jsonl",
    "errors": "error_log.jsonl",
}


def _clean(value):
    """JSON has no NaN/Infinity; write them as null so every reader can parse the line."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class RunLogs:
    def __init__(self, logs_dir: str, enabled: bool = True):
        self.logs_dir = logs_dir
        self.enabled = enabled
        self._files = {}
        self.last_step = None  # the step of the latest record, for an error that has no step of its own
        self.trackers = None  # glmkit.run.trackers.Trackers on the main process when logging.report_to is set
        if enabled:
            os.makedirs(logs_dir, exist_ok=True)
            for kind, name in LOG_FILES.items():
                self._files[kind] = open(os.path.join(logs_dir, name), "a", encoding="utf-8")

    def write(self, kind: str, step: int, **fields) -> None:
        if not self.enabled:
            return
        self.last_step = step
        record = {"step": step, "time": time.time(), **_clean(fields)}
        fh = self._files[kind]
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        if self.trackers is not None:
            self.trackers.forward(kind, record)

    def event(self, event: str, step: int, **fields) -> None:
        self.write("events", step, event=event, **fields)

    def error(self, exc: BaseException, step: int | None, rank: int) -> None:
        """Log a fatal error; every rank may call this, since a crash can start anywhere."""
        record = {"step": self.last_step if step is None else step, "time": time.time(), "rank": rank, "type": type(exc).__name__,
                  "message": str(exc), "traceback": "".join(traceback.format_exception(exc))}
        os.makedirs(self.logs_dir, exist_ok=True)
        with open(os.path.join(self.logs_dir, LOG_FILES["errors"]), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers, trackers = None, self.trackers
            trackers.finish()
        for fh in self._files.values():
            fh.close()
        self._files = {}


def read_jsonl(path: str) -> list[dict]:
    """All complete, parseable records of a log (for tests and tools; the dashboard tails instead)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.endswith("\n"):
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
    return records


def latest_per_step(records: list[dict]) -> list[dict]:
    """Apply the resume rule: for each step keep the last record written, in step order."""
    by_step = {}
    for record in records:
        by_step[record["step"]] = record
    return [by_step[s] for s in sorted(by_step)]
