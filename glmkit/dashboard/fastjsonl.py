"""Vectorised fast path for JSON-lines blocks whose lines all share one shape.

The trainer writes one flat record of numbers per optimizer step, always with
the same keys in the same order.  Parsing a million such lines with ``json``
costs several seconds; here numpy slices the numbers out of the raw bytes.
``parse_uniform_block`` proves the block is uniform first and returns ``None``
whenever it cannot, and the caller then falls back to ``json``, so the fast
path never changes *what* is read, only how quickly.
"""

from __future__ import annotations

import json
from typing import Iterable

import numpy as np

# Characters that may appear inside a JSON number (and NaN/Infinity/-Infinity,
# which Python's json module writes, and null).  Deleting them leaves a line's
# "skeleton": keys, quotes, separators.  Equal skeletons mean equal shapes.
_NUMBER_CHARS = b"0123456789.eE+-NaInfitynul"
_QUOTE = ord('"')
_MAX_NUMBER_WIDTH = 40


def _template(first_line: bytes) -> list[str] | None:
    """Keys of the first line, or None if it is not a flat dict of numbers."""
    if b"\\" in first_line:
        return None  # escaped keys would break the quote arithmetic below
    try:
        record = json.loads(first_line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not record:
        return None
    for value in record.values():
        if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
            return None
    return list(record)


def _value_bounds(line: bytes, n_keys: int) -> list[tuple[int, int]]:
    """(prefix, suffix) byte counts around each value in the template line.

    Between a key's closing quote and its value sit ``:`` and blanks; after the
    value sit ``,`` / ``}`` and blanks.  The skeleton check guarantees every
    line has exactly the same separators, so the counts hold for all lines.
    """
    quotes = [i for i, c in enumerate(line) if c == _QUOTE]
    bounds = []
    for j in range(n_keys):
        start = quotes[2 * j + 1] + 1
        stop = quotes[2 * j + 2] if j + 1 < n_keys else len(line)
        span = line[start:stop]
        prefix = len(span) - len(span.lstrip(b": \t"))
        suffix = len(span) - len(span.rstrip(b",} \t\r"))
        bounds.append((prefix, suffix))
    return bounds


def _gather_numbers(buf: np.ndarray, start: np.ndarray, stop: np.ndarray) -> np.ndarray | None:
    """Parse buf[start[i]:stop[i]] for every i as float64, all at once."""
    widths = stop - start
    if widths.size == 0:
        return np.empty(0)
    width = int(widths.max())
    if width <= 0 or width > _MAX_NUMBER_WIDTH or int(widths.min()) <= 0:
        return None
    cols = np.arange(width)
    chars = buf[np.minimum(start[:, None] + cols, buf.size - 1)]
    chars[cols >= widths[:, None]] = 0  # NUL padding is ignored by the S dtype
    text = chars.view(f"S{width}").ravel()
    nulls = text == b"null"
    if nulls.any():
        text = text.copy()
        text[nulls] = b"nan"
    try:
        return text.astype(np.float64)
    except ValueError:
        return None


def _keys_match(buf: np.ndarray, opening: np.ndarray, closing: np.ndarray, key: str) -> bool:
    """True if the key between each pair of quotes is `key`.

    The skeleton check already proved the characters it keeps, so only the
    length and the characters it deletes (e.g. the "e" in "time") are left
    to compare; that keeps this check cheap.
    """
    raw = key.encode()
    if not (closing - opening == len(raw) + 1).all():
        return False
    for offset, char in enumerate(raw):
        if char in _NUMBER_CHARS and not (buf[opening + 1 + offset] == char).all():
            return False
    return True


def parse_uniform_block(block: bytes, wanted: Iterable[str]) -> dict[str, np.ndarray] | None:
    """Columns for `wanted` keys from a block of complete, same-shaped lines.

    `block` must end with a newline.  Returns None (caller falls back to json)
    unless every line is provably the same flat numeric record; keys that the
    records lack come back as all-NaN columns.
    """
    n_lines = block.count(b"\n")
    if n_lines == 0 or not block.endswith(b"\n"):
        return None
    first = block[: block.index(b"\n") + 1]
    keys = _template(first)
    if keys is None:
        return None
    if block.translate(None, _NUMBER_CHARS) != first.translate(None, _NUMBER_CHARS) * n_lines:
        return None

    buf = np.frombuffer(block, dtype=np.uint8)
    quotes = np.flatnonzero(buf == _QUOTE).reshape(n_lines, 2 * len(keys))
    line_ends = np.flatnonzero(buf == ord("\n"))
    bounds = _value_bounds(first, len(keys))
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        if name not in keys:
            out[name] = np.full(n_lines, np.nan)
            continue
        j = keys.index(name)
        if not _keys_match(buf, quotes[:, 2 * j], quotes[:, 2 * j + 1], name):
            return None
        prefix, suffix = bounds[j]
        start = quotes[:, 2 * j + 1] + 1 + prefix
        stop = (quotes[:, 2 * j + 2] if j + 1 < len(keys) else line_ends + 1) - suffix
        values = _gather_numbers(buf, start, stop)
        if values is None:
            return None
        out[name] = values
    return out
