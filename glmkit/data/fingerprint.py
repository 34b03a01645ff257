"""The data fingerprint a checkpoint records, and the resume check that compares it.

The fingerprint is the configured sources with their weights (and, for chat sources, their format,
train_on and long_conversations: what is trained), every input file's path, size and mtime, a hash of
the validation documents' contents, and each eval set's name, path and a hash of its documents'
contents. Resuming over a corpus whose fingerprint differs would train on other rows and re-draw the
validation split, and an edited eval set would be measured on other documents (so "best val loss"
would compare different sets): it is refused, naming the key (paths.data_path, eval.sets) and what
changed, unless the run is started with --allow-data-change, which continues deliberately, writes a
`data_changed` event, and picks the best adapter anew when the selection set is one that changed.
Adding or removing an eval set changes no earlier measurement and is not refused.
"""

from __future__ import annotations

import hashlib

from glmkit.config.schema import HELD_OUT_SET
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


def eval_set_entry(name: str, spec: str, documents: int, sha256: str, reading: str | None = None) -> dict:
    """One eval set in the fingerprint: its documents by content, so a rewritten file is seen whatever its mtime,
    and for a chat set what its loss counts (`reading`: another train_on measures other tokens)."""
    return {"name": name, "path": spec, "documents": documents, "sha256": sha256,
            **({"reading": reading} if reading else {})}


def _measured(entry: dict) -> tuple:
    return entry["sha256"], entry.get("reading", "text")


def eval_set_differences(saved: list | None, current: list) -> list[str]:
    """Eval sets present in both whose documents (or a chat set's reading) differ (a checkpoint from before eval sets
    were recorded: none)."""
    before = {entry["name"]: entry for entry in saved or []}
    changes = []
    for entry in current:
        old = before.get(entry["name"])
        if old is None or _measured(old) == _measured(entry):
            continue
        if old["sha256"] != entry["sha256"]:
            changes.append(f"eval set {entry['name']!r} ({entry['path']}) differs ({old['documents']} -> "
                           f"{entry['documents']} documents)")
        else:
            changes.append(f"eval set {entry['name']!r} read as {old.get('reading', 'text')} -> "
                           f"{entry.get('reading', 'text')}")
    return changes


def changed_sets(saved: dict | None, current: dict) -> list[str]:
    """The eval sets (`val`: the held-out split) whose documents differ: a best loss on one is not comparable."""
    if saved is None:
        return []
    names = [HELD_OUT_SET] if saved["val_sha256"] != current["val_sha256"] else []
    before = {entry["name"]: _measured(entry) for entry in saved.get("eval_sets") or []}
    return names + [e["name"] for e in current.get("eval_sets") or [] if before.get(e["name"], _measured(e)) != _measured(e)]


def differences(saved: dict, current: dict) -> list[str]:
    """What changed in the training data between two fingerprints, one short phrase each (empty: the same)."""
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


def reading_of(entry) -> str | None:
    """An eval.sets entry's reading, as a training source's (None: a text set)."""
    return _reading(entry) if entry.format == "chat" else None


def _weights(weights) -> str:
    return "[" + ", ".join(f"{w:g}" for w in weights) + "]"


def check_resume(checkpoint: str, saved: dict | None, current: dict, allow_change: bool, print_line,
                 select_by: str = HELD_OUT_SET) -> list[str]:
    """Refuse a resume over changed data unless allowed; the changes (to log) when it goes ahead anyway."""
    if saved is None:
        print_line(f"{checkpoint} records no data fingerprint (an older checkpoint): the data is not checked")
        return []
    training = differences(saved, current)
    evaluated = eval_set_differences(saved.get("eval_sets"), current.get("eval_sets") or [])
    changes = training + evaluated
    if not changes:
        return []
    shown = "; ".join(changes[:SHOWN_CHANGES]) + (f"; and {len(changes) - SHOWN_CHANGES} more"
                                                  if len(changes) > SHOWN_CHANGES else "")
    if not allow_change:
        what = " and ".join(key for key, changed in (("the data of paths.data_path", training),
                                                       ("eval.sets", evaluated)) if changed)
        consequence = ", ".join(part for part, changed in (
            ("the rows and the validation split change with it", training),
            ("the changed eval sets are measured on other documents", evaluated)) if changed)
        raise DataError(f"cannot resume {checkpoint}: {what} changed since it was saved: {shown}. Restore the "
                        f"data, start a new run in another paths.output_dir, or pass {OPT_IN_FLAG} to continue on "
                        f"the changed data deliberately ({consequence})")
    anew = (f"; the best adapter is picked anew by the changed set {select_by!r}"
            if select_by in changed_sets(saved, current) else "")
    print_line(f"resuming {checkpoint} on changed data ({OPT_IN_FLAG}): {shown}{anew}")
    return changes
