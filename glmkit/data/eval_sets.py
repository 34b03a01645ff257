"""Named eval sets (`eval.sets`): documents the run is evaluated on and never trained on.

Each set's files are tokenized into the same per-file token stores as the training data
(glmkit/data/prepare.py does that, under its lock, in one pass with the training files) and
laid out into rows the way validation rows are: every document in file order, packed with the
run's max_seq_length and kept apart by segment boundaries, so a document's loss does not depend
on its neighbours. The layout is cached in `rows/<key>/` beside the training rows, keyed by the
set's token stores and the training rows it was checked against.

A set that shares documents with the training data (same content hash as a document trained
on) would measure memorisation, not generalisation or forgetting: it is refused with the
overlap count. The held-out split of the training data is the eval set named `val`.

A set of `format: chat` is read and masked like a chat training source (glmkit/data/chat.py): its
loss is over the trained tokens only (by its own `train_on`), what the assistant says.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np

from glmkit.data.chat import COUNTS
from glmkit.data.rows import Rows, load_layout, pack_layout, save_layout
from glmkit.data.sources import DataError
from glmkit.run.durable import rename_durably

EVAL_ROWS_VERSION = 3  # 2: chat documents kept whole; chat counts. 3: summary.json holds the documents' content hash
LAYOUT = "eval"


@dataclass
class EvalSetData:
    name: str
    spec: str       # the configured path, file, folder or glob
    rows: Rows
    summary: dict   # rows, docs, tokens, overlap (documents also trained on), files
    reading: str | None = None  # a chat set's: what its loss counts (glmkit/data/fingerprint.py); None: text


def rows_key(name: str, store_dirs: list[str], training_rows_dir: str, max_seq_length: int, packing: bool) -> str:
    """The cache folder name of one set's rows: its stores, the training rows it is checked against, the layout."""
    key = json.dumps([EVAL_ROWS_VERSION, name, [os.path.basename(d) for d in store_dirs],
                      os.path.basename(training_rows_dir), max_seq_length, packing])
    return "eval-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def write_rows(rows_dir: str, spec: str, stores, training_digests: np.ndarray, max_seq_length: int,
               packing: bool) -> None:
    """Lay out one set's rows from its token stores and count the documents it shares with training."""
    lengths = np.concatenate([s.lengths() for s in stores] or [np.zeros(0, np.uint32)]).astype(np.int64)
    digests = np.concatenate([s.digests() for s in stores] or [np.zeros((0, 16), np.uint8)])
    if len(lengths) == 0:
        raise DataError(f"eval set {spec}: no usable documents; give each line a non-empty text field "
                        f"(a chat set: a conversation with an assistant turn that fits training.max_seq_length)")
    starts = np.cumsum(lengths) - lengths
    whole = np.concatenate([np.full(s.meta["docs"], "chat" in s.meta) for s in stores])
    layout = pack_layout(starts, lengths, max_seq_length, packing, whole)
    as_keys = lambda d: np.ascontiguousarray(d).view("V16").ravel()  # noqa: E731 - one 16-byte key per document
    overlap = int(np.isin(as_keys(digests), as_keys(training_digests)).sum())
    tmp = f"{rows_dir}.tmp-{os.uname().nodename}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_layout(tmp, LAYOUT, layout)
    summary = {"version": EVAL_ROWS_VERSION, "path": spec, "rows": len(layout[0]) - 1, "docs": int(len(lengths)),
               "tokens": int(lengths.sum()), "overlap": overlap,
               "sha256": hashlib.sha256(np.ascontiguousarray(digests).tobytes()).hexdigest(),  # in file order
               "files": [{k: s.meta[k] for k in ("path", "docs", "tokens", "bad_lines", "bad_examples")}
                         for s in stores]}
    if any("chat" in s.meta for s in stores):
        summary["chat"] = {key: sum(int(s.meta["chat"][key]) for s in stores if "chat" in s.meta)
                           for key in COUNTS}
    with open(os.path.join(tmp, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    if os.path.isdir(rows_dir):
        shutil.rmtree(tmp)
    else:
        rename_durably(tmp, rows_dir)  # on disk before it is visible (a power cut)


def load(name: str, spec: str, rows_dir: str, token_arrays, max_seq_length: int, pad: int, packing: bool,
         index: int, trained_bits=None, reading: str | None = None) -> EvalSetData:
    """One prepared set, refused (one line, with the count) if it shares documents with the training data."""
    with open(os.path.join(rows_dir, "summary.json"), encoding="utf-8") as fh:
        summary = json.load(fh)
    if summary["overlap"]:
        raise DataError(f"eval.sets[{index}] {name!r} ({spec}): {summary['overlap']} of its {summary['docs']} "
                        f"documents are also training documents in paths.data_path; remove them from the eval "
                        f"set (or from the training data): an eval set must be held out to measure anything")
    rows = Rows(token_arrays, load_layout(rows_dir, LAYOUT), max_seq_length, pad, packing, trained_bits)
    return EvalSetData(name, spec, rows, summary, reading)


def resolve(index: int, name: str, path: str, text_field: str, entry=None):
    """The set's files (a glmkit.data.sources.Source, read as `entry`, its EvalSetSource, says); a missing or
    unusable path is one line naming its key."""
    import glob
    import types

    from glmkit.data import sources

    where = f"eval.sets[{index}].path"
    if not glob.has_magic(path) and not os.path.exists(path):
        raise DataError(f"{where}: {path} does not exist (eval set {name!r}); fix the path or remove the set")
    try:
        spec = types.SimpleNamespace(path=path, weight=1.0, format=getattr(entry, "format", "text"),
                                     train_on=getattr(entry, "train_on", "assistant"),
                                     long_conversations=getattr(entry, "long_conversations", "split"))
        return sources.resolve_sources([spec], text_field)[0]
    except DataError as exc:
        raise DataError(f"{where} (eval set {name!r}): {str(exc).replace('paths.data_path', where)}") from None
