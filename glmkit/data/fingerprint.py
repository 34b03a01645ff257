"""The data fingerprint a checkpoint records, and the resume check that compares it.

The fingerprint is the configured sources with their weights (and, for chat sources, their format,
train_on and long_conversations: what is trained), every input file's path, size and
mtime, and a hash of the validation documents' contents. Resuming over a corpus whose
fingerprint differs would train on other rows and re-draw the validation split (so "best val
loss" would compare different sets): it is refused, naming paths.data_path and what changed,
unless the run is started with --allow-data-change, which continues deliberately and writes
a `data_changed` event.
"""

from __future__ import annotations

import hashlib

from glmkit.data.sources import DataError

SHOWN_CHANGES = 8
OPT_IN_FLAG = "--allow-data-change"


def fingerprint(configured_sources, val_documents: int, sorted_val_digests: bytes) -> dict:
    return {
        "sources": [{"path": s.spec, "weight": s.weight, "files": [f.identity() for f in s.files],
                     **({"reading": _reading(s)} if s.format == "chat" else {})}
                    for s in configured_sources],
        "val_documents": val_documents,
        "val_sha256": hashlib.sha256(sorted_val_digests).hexdigest(),
    }


def differences(saved: dict, current: dict) -> list[str]:
    """What changed between two fingerprints, one short phrase each (empty: the same data)."""
    changes = []
    # Sources are compared by weight and files, not by how they are spelled: a glob that matches the same
    # files as the folder it replaces is the same data.
    weights_before = [s["weight"] for s in saved["sources"]]
    weights_after = [s["weight"] for s in current["sources"]]
    if weights_before != weights_after:
        changes.append(f"source weights {_weights(weights_before)} -> {_weights(weights_after)}")
    reading_before = [s.get("reading", "text") for s in saved["sources"]]
    reading_after = [s.get("reading", "text") for s in current["sources"]]
    if reading_before != reading_after:  # a chat source's format or mask changed: other tokens are trained
        changes += [f"paths.data_path[{i}] read as {a} -> {b}" for i, (a, b)
                    in enumerate(zip(reading_before, reading_after)) if a != b] or \
                   [f"sources read as {', '.join(reading_before)} -> {', '.join(reading_after)}"]
    old = {path: (size, mtime) for s in saved["sources"] for path, size, mtime in s["files"]}
    new = {path: (size, mtime) for s in current["sources"] for path, size, mtime in s["files"]}
    changes += [f"{path} added" for path in new if path not in old]
    changes += [f"{path} removed" for path in old if path not in new]
    for path in (p for p in new if p in old and new[p] != old[p]):
        size0, size1 = old[path][0], new[path][0]
        changes.append(f"{path} size {size0} -> {size1} bytes" if size0 != size1 else f"{path} modified (mtime)")
    grouping = lambda fp: [[f[0] for f in s["files"]] for s in fp["sources"]]  # noqa: E731
    if not changes and grouping(saved) != grouping(current):
        changes.append("the same files, in another order or grouping of sources")
    if saved["val_sha256"] != current["val_sha256"]:
        changes.append(f"validation documents differ ({saved['val_documents']} -> {current['val_documents']})")
    return changes


def _reading(source) -> str:
    """How a chat source is read, in a few words (text sources have no such key: older fingerprints match)."""
    return f"chat (train_on {source.train_on}, long_conversations {source.long_conversations})"


def _weights(weights) -> str:
    return "[" + ", ".join(f"{w:g}" for w in weights) + "]"


def check_resume(checkpoint: str, saved: dict | None, current: dict, allow_change: bool, print_line) -> list[str]:
    """Refuse a resume over changed data unless allowed; the changes (to log) when it goes ahead anyway."""
    if saved is None:
        print_line(f"{checkpoint} records no data fingerprint (an older checkpoint): the data is not checked")
        return []
    changes = differences(saved, current)
    if not changes:
        return []
    shown = "; ".join(changes[:SHOWN_CHANGES]) + (f"; and {len(changes) - SHOWN_CHANGES} more"
                                                  if len(changes) > SHOWN_CHANGES else "")
    if not allow_change:
        raise DataError(f"cannot resume {checkpoint}: the data of paths.data_path changed since it was saved: "
                        f"{shown}. Restore the data, start a new run in another paths.output_dir, or pass "
                        f"{OPT_IN_FLAG} to continue on the changed data deliberately (the rows and the "
                        f"validation split change with it)")
    print_line(f"resuming {checkpoint} on changed data ({OPT_IN_FLAG}): {shown}")
    return changes
