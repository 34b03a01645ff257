"""Checkpoints on disk, joined with what the events say about them.

Only direct children of the output folder whose names the trainer writes
(``checkpoint-<step>``, ``final-checkpoint-<step>``: glmkit.run.checkpoint_names)
are looked at, never through a symlink, so nothing outside the output folder
is ever read.  Temporary folders that are still being written
(``.tmp-checkpoint-*``) do not match.  A folder that vanishes mid-scan (the
trainer's retention deleting it) or an unreadable meta file is skipped.
"""

from __future__ import annotations

import json
import os
import stat

from glmkit.run.checkpoint_names import COMPLETE, META, parse_checkpoint_name

MAX_META_BYTES = 1 << 20


def _read_meta(folder: str) -> dict:
    try:
        fd = os.open(os.path.join(folder, META), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return {}
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # a directory would make fdopen raise
            return {}
        meta = json.loads(os.read(fd, MAX_META_BYTES))
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    return meta if isinstance(meta, dict) else {}


def _size_on_disk(folder: str) -> int:
    """Bytes of every file below `folder`, without following symlinks."""
    total = 0
    stack = [folder]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            elif stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


class CheckpointScanner:
    """Caches per-folder work by mtime; a finished checkpoint never changes."""

    def __init__(self, output_dir: str | None):
        self.output_dir = os.path.abspath(output_dir) if output_dir else None
        self._cache: dict[str, tuple[int, dict]] = {}

    def scan(self) -> list[dict]:
        if not self.output_dir:
            return []
        try:
            entries = [(e, parsed) for e in os.scandir(self.output_dir) if (parsed := parse_checkpoint_name(e.name))]
        except OSError:
            return []
        found = []
        for entry, (step, final) in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    found.append(self._describe(entry, step, final))
            except OSError:
                continue  # deleted while we looked
        self._cache = {e["name"]: self._cache[e["name"]] for e in found if e["name"] in self._cache}
        return sorted(found, key=lambda c: (c["step"], c["final"]))

    def _describe(self, entry: os.DirEntry, step: int, final: bool) -> dict:
        mtime = entry.stat(follow_symlinks=False).st_mtime_ns
        complete = os.path.lexists(os.path.join(entry.path, COMPLETE))
        key = mtime + int(complete)
        cached = self._cache.get(entry.name)
        if cached and cached[0] == key:
            return dict(cached[1])
        meta = _read_meta(entry.path)
        info = {
            "name": entry.name,
            "step": step,
            "final": final,
            "complete": complete,
            "val_loss": _number(meta.get("val_loss")),
            "epoch": _number(meta.get("epoch")),
            "size_bytes": _size_on_disk(entry.path),
            "time": mtime / 1e9,
        }
        self._cache[entry.name] = (key, info)
        return dict(info)


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


def _basename(path) -> str | None:
    return os.path.basename(str(path).rstrip("/")) if path else None


def merge_with_events(checkpoints: list[dict], events: list[dict]) -> dict:
    """Fill gaps from the events and mark the best checkpoint."""
    saved, best, deleted = {}, None, []
    for e in events:
        kind, name = e.get("event"), _basename(e.get("path"))
        if kind == "checkpoint_saved" and name:
            saved[name] = e
        elif kind == "best_updated":
            best = e
        elif kind == "checkpoint_deleted" and name:
            deleted.append({"name": name, "step": e.get("step"), "reason": e.get("reason"), "time": e.get("time")})
    for c in checkpoints:
        event = saved.get(c["name"], {})
        if c["val_loss"] is None:
            c["val_loss"] = _number(event.get("val_loss"))
        c["time"] = _number(event.get("time")) or c["time"]
        if not c["size_bytes"]:
            c["size_bytes"] = int(_number(event.get("size_bytes")) or 0)
    best_name = _best_name(checkpoints, best)
    for c in checkpoints:
        c["best"] = c["name"] == best_name
    return {"checkpoints": checkpoints, "best": next((c for c in checkpoints if c["best"]), None),
            "deleted": deleted[-50:]}


def _best_name(checkpoints: list[dict], event: dict | None) -> str | None:
    """The newest best_updated event's checkpoint, else the lowest val loss."""
    if event is not None:
        named = _basename(event.get("checkpoint") or event.get("path"))
        # The checkpoint of the best step may have been saved as final-checkpoint-<step>.
        for c in sorted(checkpoints, key=lambda c: c["name"] != named):
            if c["name"] == named or c["step"] == event.get("step"):
                return c["name"]
    scored = [c for c in checkpoints if c["val_loss"] is not None]
    return min(scored, key=lambda c: c["val_loss"])["name"] if scored else None
