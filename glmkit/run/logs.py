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

from glmkit.run.writes import WriteFailed, cause_of, guarded_write, note_on_stderr

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
        # The first failed write (a full disk): nothing more is appended, so no record is ever half a line
        # glued to the next; the trainer stops every process at the next step boundary (train_qlora.py).
        self.failed: WriteFailed | None = None
        if enabled:
            with guarded_write("the run logs", logs_dir, intact="nothing was trained yet",
                               fix="point paths.output_dir at a folder this user can write"):
                os.makedirs(logs_dir, exist_ok=True)
                for kind, name in LOG_FILES.items():
                    self._files[kind] = open(os.path.join(logs_dir, name), "a", encoding="utf-8")

    def write(self, kind: str, step: int, **fields) -> None:
        if not self.enabled or self.failed is not None:
            return
        self.last_step = step
        record = {"step": step, "time": time.time(), **_clean(fields)}
        fh = self._files[kind]
        try:
            with guarded_write("the run log", fh.name, intact="checkpoints already written are intact",
                               fix="resume with --resume"):
                fh.write(json.dumps(record) + "\n")
                fh.flush()
        except WriteFailed as exc:
            self.failed = exc
            return
        if self.trackers is not None:
            self.trackers.forward(kind, record)

    def event(self, event: str, step: int, **fields) -> None:
        self.write("events", step, event=event, **fields)

    def error(self, exc: BaseException, step: int | None, rank: int) -> None:
        """Log a fatal error; every rank may call this, since a crash can start anywhere."""
        record = {"step": self.last_step if step is None else step, "time": time.time(), "rank": rank, "type": type(exc).__name__,
                  "message": str(exc), "traceback": "".join(traceback.format_exception(exc))}
        path = os.path.join(self.logs_dir, LOG_FILES["errors"])
        try:
            os.makedirs(self.logs_dir, exist_ok=True)
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
        except Exception as write_exc:  # the error itself is printed by the caller; say why it is not logged
            note_on_stderr(f"note: the error record could not be written to {path} "
                           f"({cause_of(write_exc, path)}); the dashboard will not show this error")

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers, trackers = None, self.trackers
            trackers.finish()
        for fh in self._files.values():
            try:
                fh.close()
            except OSError:  # what a full disk left in the buffer; the failure was reported when it happened
                pass
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
