"""Keeping the tokenized-data cache honest: verify what is reused, drop what can never be reused.

The cache (`<paths.scratch_dir>/tokenized/`, laid out in glmkit/data/prepare.py) is only ever read
back by key, so a damaged file would otherwise be trusted forever: a truncated `tokens.u32` was
"warm", and training crashed later with an IndexError. Before reusing anything the preparer (holding
the cache lock) checks each token store (`token_store.damage`) and the run's rows (`rows_damage`);
whatever fails is removed with a one-line note and rebuilt. Only folders the kit wrote are touched.

Stores are keyed by their file's path, size and mtime, so a store whose file changed or vanished can
never be reused: after a successful preparation those stores, and the rows laid out over them, are
removed (`remove_unreachable`). Stores of files that are still there (for another tokenizer, another
text field, another run's config) are kept.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np

from glmkit.data import token_store
from glmkit.data.rows import load_layout
from glmkit.data.sources import DataError

CHECK_BLOCK = 1 << 22  # pieces checked at once (48 MiB of temporaries)


def rows_damage(rows_dir: str, store_tokens: list[int]) -> str | None:
    """Why the rows folder can't be trusted (None: its layouts agree with summary.json and the stores).

    `store_tokens` are the token counts of the run's stores, in order: every piece must lie inside them.
    """
    try:
        with open(os.path.join(rows_dir, "summary.json"), encoding="utf-8") as fh:
            summary = json.load(fh)
        if len(summary["files"]) != len(store_tokens):
            return f"summary.json lists {len(summary['files'])} token store(s), the run has {len(store_tokens)}"
        total = int(sum(store_tokens))
        for name in ("train", "val"):
            row_ptr, piece_start, piece_len = load_layout(rows_dir, name)
            if len(row_ptr) != summary[name]["rows"] + 1 or len(piece_start) != len(piece_len) \
                    or int(row_ptr[-1]) != len(piece_start):
                return f"the {name} layout does not match the row count in summary.json"
            if int(piece_len.sum(dtype=np.int64)) != summary[name]["tokens"]:
                return f"the {name} layout does not add up to the token count in summary.json"
            for lo in range(0, len(piece_start), CHECK_BLOCK):  # blockwise: the layouts may be large
                starts = piece_start[lo:lo + CHECK_BLOCK]
                if int(starts.min()) < 0 or int((starts + piece_len[lo:lo + CHECK_BLOCK]).max()) > total:
                    return f"the {name} layout points outside the token stores"
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"unreadable: {exc.__class__.__name__}: {str(exc)[:80]}"
    return None


def discard(path: str, what: str, reason: str) -> None:
    """Remove a damaged cache folder, saying so; refuse in one line when it can't be removed."""
    print(f"data: {what} {path} is damaged ({reason}); rebuilding it", file=sys.stderr, flush=True)
    try:
        shutil.rmtree(path)
    except OSError as exc:
        raise DataError(f"{path}: damaged {what} ({reason}) that could not be removed ({exc.strerror or exc}); "
                        f"delete that folder and rerun") from None


def _identity_changed(meta: dict) -> bool:
    try:
        info = os.stat(meta["path"])
    except FileNotFoundError:
        return True
    except OSError:  # unreadable now (permissions, a dead mount): not proof it changed
        return False
    return (info.st_size, info.st_mtime_ns) != (meta["size"], meta["mtime_ns"])


def remove_unreachable(root: str, in_use: set[str]) -> tuple[int, int]:
    """Remove token stores whose input file changed or is gone (never `in_use`), and rows that used them.

    Returns (stores removed, bytes freed). Call it holding the cache lock, after a successful preparation.
    """
    files_dir, rows_root = os.path.join(root, "files"), os.path.join(root, "rows")
    removed, freed = set(), 0
    for name in sorted(os.listdir(files_dir)) if os.path.isdir(files_dir) else []:
        path = os.path.join(files_dir, name)
        if ".tmp-" in name or path in in_use or not os.path.isdir(path):
            continue
        try:
            store = token_store.Store.open(path)
            unreachable = _identity_changed(store.meta)
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a store this version can read: leave it alone
        if unreachable:
            size = store.nbytes()
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                removed.add(path)
                freed += size
    for name in sorted(os.listdir(rows_root)) if removed and os.path.isdir(rows_root) else []:
        path = os.path.join(rows_root, name)
        try:
            with open(os.path.join(path, "summary.json"), encoding="utf-8") as fh:
                stores = {f["store"] for f in json.load(fh)["files"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if stores & removed:
            freed += sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path))
            shutil.rmtree(path, ignore_errors=True)
    return len(removed), freed
