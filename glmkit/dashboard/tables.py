"""Columnar, append-only storage of per-step records with the resume rule.

A million training steps must fit in a few tens of MB and be sliceable
without copying, so each field is a growable float64 numpy array rather than
a list of dicts.
"""

from __future__ import annotations

import numpy as np

from .fastjsonl import parse_numbers


class GrowableColumn:
    """A float64 array with amortised O(1) appends and O(1) truncation.

    It also accepts number *text* (fixed-width bytes from the fast parser),
    parsed only when the values are first read: a column nobody plots costs
    no float parsing, which is most of the cost of loading a long log.
    """

    def __init__(self, capacity: int = 1024):
        self._data = np.empty(capacity)
        self._parsed = 0  # rows in _data
        self._texts: list[np.ndarray] = []  # unparsed rows, after the parsed ones
        self._text_rows = 0

    @property
    def size(self) -> int:
        return self._parsed + self._text_rows

    def values(self) -> np.ndarray:
        self._parse_pending()
        return self._data[: self._parsed]  # a view: callers must not keep it across writes

    def last(self) -> float | None:
        tail = self.tail(1)
        return float(tail[0]) if len(tail) else None

    def tail(self, k: int) -> np.ndarray:
        """The last k values, parsing only the text they need."""
        parts, need = [], k
        for text in reversed(self._texts):
            if need <= 0:
                break
            parts.append(parse_numbers(text[-need:]))
            need -= len(parts[-1])
        if need > 0 and self._parsed:
            parts.append(self._data[max(0, self._parsed - need) : self._parsed])
        return np.concatenate(parts[::-1]) if parts else np.empty(0)

    def extend(self, values: np.ndarray) -> None:
        if values.dtype.kind == "S":
            if len(values):
                self._texts.append(values)
                self._text_rows += len(values)
            return
        self._parse_pending()
        self._append(values)

    def keep(self, mask: np.ndarray) -> None:
        kept = self.values()[mask]
        self._data[: len(kept)] = kept
        self._parsed = len(kept)

    def truncate(self, size: int) -> None:
        if size >= self.size:
            return
        if size <= self._parsed:
            self._texts, self._text_rows = [], 0  # dropped unparsed: no need to parse them
        else:
            self._parse_pending()
        self._parsed = size

    def _parse_pending(self) -> None:
        texts, self._texts, self._text_rows = self._texts, [], 0
        for text in texts:
            self._append(parse_numbers(text))

    def _append(self, values: np.ndarray) -> None:
        needed = self._parsed + len(values)
        if needed > len(self._data):
            grown = np.empty(max(needed, 2 * len(self._data)))
            grown[: self._parsed] = self._data[: self._parsed]
            self._data = grown
        self._data[self._parsed : needed] = values
        self._parsed = needed


def _superseded_within(steps: np.ndarray) -> np.ndarray:
    """Mask of rows that survive later rows of the same batch.

    A row is superseded by any later row whose step is not greater: that later
    row is either a rewrite of the same step or a restart from an earlier one.
    """
    later_min = np.minimum.accumulate(steps[::-1])[::-1]
    survives = np.ones(len(steps), dtype=bool)
    survives[:-1] = steps[:-1] < later_min[1:]
    return survives


class StepTable:
    """Per-step columns, strictly increasing in `step`.

    `version` changes on every modification (the cache key of plots);
    `generation` only when rows are removed, which tells incremental
    consumers (SmoothingCache) to start over.
    """

    def __init__(self, fields: tuple[str, ...]):
        self.fields = ("step", "time") + tuple(f for f in fields if f not in ("step", "time"))
        self._cols = {name: GrowableColumn() for name in self.fields}
        self.version = 0
        self.generation = 0

    def __len__(self) -> int:
        return self._cols["step"].size

    def column(self, name: str) -> np.ndarray:
        return self._cols[name].values()

    def last(self, name: str) -> float | None:
        return self._cols[name].last()

    def tail(self, name: str, k: int) -> np.ndarray:
        return self._cols[name].tail(k)

    def clear(self) -> None:
        for col in self._cols.values():
            col.truncate(0)
        self._changed(removed=True)

    def append(self, columns: dict[str, np.ndarray]) -> None:
        """Add rows in file order, applying 'for a given step the latest wins'."""
        steps = columns["step"]
        if len(steps) == 0:
            return
        keep = _superseded_within(steps)
        first_new = steps[keep].min()
        cut = int(np.searchsorted(self.column("step"), first_new, side="left"))
        removed = cut < len(self)
        for name, col in self._cols.items():
            col.truncate(cut)
            values = columns.get(name)
            col.extend(values[keep] if values is not None else np.full(int(keep.sum()), np.nan))
        self._changed(removed)

    def supersede(self, after_step: int, before_time: float) -> None:
        """Drop rows a killed attempt wrote past the step a resume restarted from."""
        start = int(np.searchsorted(self.column("step"), after_step, side="right"))
        stale = self.column("time")[start:] < before_time
        if not stale.any():
            return
        mask = np.ones(len(self), dtype=bool)
        mask[start:] = ~stale
        for col in self._cols.values():
            col.keep(mask)
        self._changed(removed=True)

    def _changed(self, removed: bool) -> None:
        self.version += 1
        self.generation += removed
