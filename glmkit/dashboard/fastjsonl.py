"""Vectorised fast path for JSON-lines blocks whose lines all share one shape.

The trainer writes one flat record of numbers per optimizer step, always with
the same keys in the same order.  Parsing a million such lines with ``json``
costs several seconds; here numpy slices the numbers out of the raw bytes.
``parse_uniform_block`` proves the block is uniform first and returns ``None``
whenever it cannot, and the caller then falls back to ``json``, so the fast
path does not change what is read, only how quickly.  Two deliberate
exceptions: timestamps are kept to the millisecond, and a number that is
malformed inside an otherwise well-formed line of a lazily parsed column
reads as NaN instead of making the line count as bad.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# Characters that may appear inside a JSON number (and NaN/Infinity/-Infinity,
# which Python's json module writes, and null).  Deleting them leaves a line's
# "skeleton": keys, quotes, separators.  Equal skeletons mean equal shapes.
_NUMBER_CHARS = b"0123456789.eE+-NaInfitynul"
_QUOTE = ord('"')
_MAX_NUMBER_WIDTH = 40
_PAD = _MAX_NUMBER_WIDTH + 8  # spare bytes so a window never runs off the end
# Unix times have 10 integer digits; 14 characters keep milliseconds.  Text
# with 15 or fewer digits takes the fast path of float parsing (~3x faster).
_COARSE_WIDTH = 14


def _template(first_line: bytes) -> list[str] | None:
    """Keys of the first line, or None if it is not a flat dict of numbers."""
    if b"\\" in first_line:
        return None  # escaped keys would break the quote arithmetic below
    try:
        record = json.loads(first_line)
    except ValueError:
        return None
    if not isinstance(record, dict) or not record or first_line.count(b'"') != 2 * len(record):
        return None  # not a dict, or duplicate keys: the quotes would not pair up with keys
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
        suffix = len(span) - len(span.rstrip(b",} \t\r\n"))
        bounds.append((prefix, suffix))
    return bounds


def _texts(buf: np.ndarray, start: np.ndarray, stop: np.ndarray, coarse: bool) -> np.ndarray | None:
    """buf[start[i]:stop[i]] for every i, as one fixed-width bytes array.

    Each row is copied whole out of a sliding-window view, which is much
    cheaper than indexing byte by byte.  `buf` must have _PAD spare bytes.
    A `coarse` column keeps only _COARSE_WIDTH characters of plain decimals.
    """
    widths = stop - start
    width = int(widths.max())
    if width > _MAX_NUMBER_WIDTH or int(widths.min()) <= 0:
        return None
    chars = sliding_window_view(buf, width)[start]
    chars[np.arange(width) >= widths[:, None]] = 0  # NUL padding is ignored by the S dtype
    if coarse and width > _COARSE_WIDTH and _plain_decimals(chars[:, :_COARSE_WIDTH]):
        width = _COARSE_WIDTH
        chars = np.ascontiguousarray(chars[:, :width])
    return chars.view(f"S{width}").ravel()


def _plain_decimals(head: np.ndarray) -> bool:
    """Every row has its decimal point within `head` and no exponent at all."""
    return bool((head == ord(".")).any(axis=1).all()) and not ((head | 0x20) == ord("e")).any()


def _strict_numbers(text: np.ndarray, integer: bool) -> np.ndarray | None:
    if integer:
        try:
            return text.astype(np.int64).astype(np.float64)  # integers parse ~3x faster
        except ValueError:
            return None
    try:
        return _with_nulls_as_nan(text).astype(np.float64)
    except ValueError:
        return None


def _with_nulls_as_nan(text: np.ndarray) -> np.ndarray:
    nulls = text == b"null"
    if nulls.any():
        text = text.copy()
        text[nulls] = b"nan"
    return text


def parse_numbers(text: np.ndarray) -> np.ndarray:
    """Parse a fixed-width bytes array of JSON numbers; null and junk give NaN."""
    try:
        return _with_nulls_as_nan(text).astype(np.float64)
    except ValueError:
        return np.array([_number_or_nan(t) for t in text.tolist()])


def _number_or_nan(text: bytes) -> float:
    try:
        return float(text)
    except ValueError:
        return float("nan")


def _line_ends(quotes: np.ndarray, first: bytes, size: int) -> np.ndarray:
    """Position of each line's newline, from where the next line's first quote is."""
    lead = first.index(b'"')  # bytes before the first quote; the same on every line
    return np.append(quotes[1:, 0] - lead - 1, size - 1)


def _keys_match(buf: np.ndarray, quotes: np.ndarray, keys: list[str], wanted: list[str]) -> bool:
    """True if every line has the template's key at each wanted position.

    The skeleton check already proved the characters it keeps, so what is
    left is each key's length and the characters it deletes (the "e" of
    "time"): one gather for all of them keeps this cheap.
    """
    offsets, expected = [], []
    for name in wanted:
        j = keys.index(name)
        if not (quotes[:, 2 * j + 1] - quotes[:, 2 * j] == len(name.encode()) + 1).all():
            return False
        for k, char in enumerate(name.encode()):
            if char in _NUMBER_CHARS:
                offsets.append((2 * j, k + 1))
                expected.append(char)
    if not offsets:
        return True
    columns, shifts = np.array(offsets).T
    found = buf[quotes[:, columns] + shifts]
    return bool((found == np.array(expected, dtype=np.uint8)).all())


def parse_uniform_block(
    block: bytes,
    wanted: Iterable[str],
    integers: Iterable[str] = (),
    coarse: Iterable[str] = (),
    lazy: Iterable[str] = (),
) -> dict[str, np.ndarray] | None:
    """Columns for `wanted` keys from a block of complete, same-shaped lines.

    `block` must end with a newline.  Returns None (caller falls back to json)
    unless every line is provably the same flat numeric record; keys that the
    records lack come back as all-NaN columns.  `integers` must be integers;
    `coarse` columns (timestamps) are parsed to about 14 significant digits;
    `lazy` columns come back unparsed, as fixed-width bytes for
    `parse_numbers`: float parsing is most of the cost, and a column nobody
    looks at need never pay it.
    """
    if not block.endswith(b"\n"):
        return None
    first = block[: block.index(b"\n") + 1]
    keys = _template(first)
    if keys is None:
        return None
    skeleton = block.translate(None, _NUMBER_CHARS)
    n_lines = skeleton.count(b"\n")
    if skeleton != first.translate(None, _NUMBER_CHARS) * n_lines:
        return None
    buf = np.frombuffer(block + bytes(_PAD), dtype=np.uint8)
    quotes = np.flatnonzero(buf == _QUOTE).reshape(n_lines, 2 * len(keys))
    bounds = _value_bounds(first, len(keys))
    present = [name for name in wanted if name in keys]
    if not _keys_match(buf, quotes, keys, present):
        return None
    out: dict[str, np.ndarray] = {}
    for name in wanted:
        if name not in keys:
            out[name] = np.full(n_lines, np.nan)
            continue
        j = keys.index(name)
        prefix, suffix = bounds[j]
        start = quotes[:, 2 * j + 1] + 1 + prefix
        stop = (quotes[:, 2 * j + 2] if j + 1 < len(keys) else _line_ends(quotes, first, len(block)) + 1) - suffix
        text = _texts(buf, start, stop, name in coarse)
        if text is None:
            return None
        values = text if name in lazy else _strict_numbers(text, name in integers)
        if values is None:
            return None
        out[name] = values
    return out
