"""Tail JSON-lines files by byte offset and turn new lines into records.

Each poll reads only the bytes appended since the previous one; a last line
without its newline is held back until the writer finishes it.  A file that
shrank, changed inode or changed its first bytes was truncated or replaced,
which means a new run: its consumer is reset and reading starts over.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import Protocol

import numpy as np

from .fastjsonl import parse_uniform_block
from .tables import StepTable

CHUNK_BYTES = 8 << 20  # bounds memory while catching up on a large file
HEAD_BYTES = 256  # fingerprint that catches a rewrite which grew past our offset


class Sink(Protocol):
    def reset(self) -> None: ...

    def feed(self, block: bytes) -> int:
        """Consume complete lines; return how many were malformed."""


class JsonlTail:
    """Byte-offset reader of one append-only JSONL file."""

    def __init__(self, path: str, sink: Sink, chunk_bytes: int = CHUNK_BYTES, max_backlog: int | None = None):
        self.path = path
        self.sink = sink
        self.chunk_bytes = chunk_bytes
        # With max_backlog, a larger unread backlog is skipped but for its last
        # max_backlog bytes: for logs where only recent records matter.
        self.max_backlog = max_backlog
        self.skipped_bytes = 0
        self.offset = 0
        self.bad_lines = 0
        self.mtime: float | None = None
        self.problem: str | None = None  # why the file cannot be read, when it exists but is unusable
        self._identity: tuple[int, int] | None = None
        self._head = b""

    def poll(self) -> bool:
        """Read what was appended; True if anything changed."""
        try:
            # O_NOFOLLOW: a symlink planted under a fixed log name is not read;
            # O_NONBLOCK: nor does a FIFO there hang the server.
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError as exc:
            self.problem = _open_problem(exc)
            return self._start_over() if self._identity is not None else False
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # checked before fdopen, which raises on a directory
            os.close(fd)
            self.problem = "is a directory, not a log file" if stat.S_ISDIR(st.st_mode) else "is not a regular file"
            return self._start_over() if self._identity is not None else False
        self.problem = None
        with os.fdopen(fd, "rb", buffering=0) as f:
            changed = False
            if self._identity is not None and self._replaced(st, fd):
                changed = self._start_over()
            self._identity = (st.st_dev, st.st_ino)
            self.mtime = st.st_mtime
            if self.max_backlog and st.st_size - self.offset > self.max_backlog:
                self._skip_to_line_after(fd, st.st_size - self.max_backlog)
            if st.st_size > self.offset:
                changed = self._read_from(f) or changed
            if len(self._head) < HEAD_BYTES and self.offset > len(self._head):
                self._head = os.pread(fd, min(self.offset, HEAD_BYTES), 0)
        return changed

    def _replaced(self, st: os.stat_result, fd: int) -> bool:
        if (st.st_dev, st.st_ino) != self._identity or st.st_size < self.offset:
            return True
        return bool(self._head) and os.pread(fd, len(self._head), 0) != self._head

    def _skip_to_line_after(self, fd: int, position: int) -> None:
        """Move the offset to the first line start at or after `position`."""
        while position > self.offset:
            data = os.pread(fd, 1 << 16, position - 1)
            newline = data.find(b"\n")
            if newline >= 0:
                self.skipped_bytes += position + newline - self.offset
                self.offset = position + newline
                return
            if len(data) < (1 << 16):
                return  # only an unfinished last line is left
            position += len(data)

    def _start_over(self) -> bool:
        self.offset, self.bad_lines, self._head, self.skipped_bytes = 0, 0, b"", 0
        self._identity, self.mtime = None, None
        self.sink.reset()
        return True

    def _read_from(self, f) -> bool:
        fed = False
        while True:
            f.seek(self.offset)  # re-read an unfinished line rather than copy it around
            data = f.read(self.chunk_bytes)
            cut = data.rfind(b"\n") + 1
            if not cut:
                if len(data) < self.chunk_bytes:
                    return fed  # nothing new, or an unfinished last line: hold it back
                data = self._read_long_line(f, data)
                cut = data.rfind(b"\n") + 1
                if not cut:
                    return fed
            self.bad_lines += self.sink.feed(data if cut == len(data) else data[:cut])
            self.offset += cut
            fed = True

    def _read_long_line(self, f, data: bytes) -> bytes:
        """A line longer than a chunk: read on until its newline (or EOF)."""
        parts = [data]
        while b"\n" not in parts[-1]:
            more = f.read(self.chunk_bytes)
            if not more:
                break
            parts.append(more)
        return b"".join(parts)


def _open_problem(exc: OSError) -> str | None:
    if exc.errno == errno.ENOENT:
        return None  # not written yet: the normal state before a run starts
    if exc.errno == errno.ELOOP:
        return "is a symbolic link, which is not followed"
    return f"cannot be opened ({exc.strerror or exc})"


def parse_lines(block: bytes) -> tuple[list, int]:
    """json-decode each non-blank line; (values, count of undecodable lines)."""
    lines = [line for line in block.split(b"\n") if line.strip()]
    try:
        # One decode of the whole block is much faster than one per line;
        # the length check catches lines like "1, 2" that would split.
        values = json.loads(b"[" + b",".join(lines) + b"]")
        if len(values) == len(lines):
            return values, 0
    except ValueError:
        pass
    values, bad = [], 0
    for line in lines:
        try:
            values.append(json.loads(line))
        except ValueError:
            bad += 1
    return values, bad


def is_step_record(value) -> bool:
    """A record of a step the trainer writes: `step` an integer >= 0. A lower step would count as a resume
    from before the first step and supersede every row (one stray `"step": -5` line wiped a loss curve)."""
    step = value.get("step") if isinstance(value, dict) else None
    return isinstance(step, int) and not isinstance(step, bool) and step >= 0


def _number(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return float("nan")
    return float(value)


def columns_from_records(records: list[dict], fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {name: np.array([_number(r.get(name)) for r in records]) for name in fields}


class TableSink:
    """Feeds numeric per-step fields into a StepTable; keeps the newest record.

    `lazy` fields are stored as text and parsed on first read (see tables.py).
    """

    def __init__(self, fields: tuple[str, ...], lazy: tuple[str, ...] = ()):
        self.table = StepTable(fields)
        self.lazy = lazy
        self.latest: dict | None = None

    def reset(self) -> None:
        self.table.clear()
        self.latest = None

    def feed(self, block: bytes) -> int:
        columns = parse_uniform_block(block, self.table.fields, integers=("step",), coarse=("time",), lazy=self.lazy)
        if columns is not None and not (columns["step"] < 0).any():  # a negative step: the careful path drops it
            self._note_latest(block)
            self.table.append(columns)
            return 0
        values, bad = parse_lines(block)
        records = [v for v in values if is_step_record(v)]
        bad += len(values) - len(records)
        if records:
            self.latest = records[-1]
            self.table.append(columns_from_records(records, self.table.fields))
        return bad

    def _note_latest(self, block: bytes) -> None:
        start = block.rfind(b"\n", 0, len(block) - 1) + 1
        self.latest = json.loads(block[start:])  # proven valid by the fast path

    def current(self) -> dict | None:
        """The newest record, unless a resume has since superseded it."""
        if self.latest is None or self.latest.get("step") != self.table.last("step"):
            return None
        return self.latest


class RecordSink:
    """Keeps whole records (events, errors) in file order, newest `limit`."""

    def __init__(self, limit: int = 10_000):
        self.records: list[dict] = []
        self.limit = limit
        self.version = 0
        self.resets = 0
        self.total = 0  # records ever added since the last reset

    def reset(self) -> None:
        self.records = []
        self.total = 0
        self.version += 1
        self.resets += 1

    def added_since(self, total: int) -> list[dict]:
        new = self.total - total
        return self.records[-new:] if new > 0 else []

    def feed(self, block: bytes) -> int:
        values, bad = parse_lines(block)
        records = [v for v in values if isinstance(v, dict)]
        self.records.extend(records)
        self.total += len(records)
        del self.records[: -self.limit]
        self.version += 1
        return bad + len(values) - len(records)
