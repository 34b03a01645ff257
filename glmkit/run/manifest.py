"""Proving a folder whole after the fact: every file's size and sha256, in the marker written last.

A checkpoint's `COMPLETE` marker and the best adapter's `best.json` list every other file of their
folder with its size and sha256 (`file_manifest`). A file written without a flush can come back from a
power cut at its full size with zeros in it, or cut short; the folders are flushed before they are
renamed into place (glmkit/run/swap.py), and whatever reads one checks it first (`manifest_problem`):
`--resume` takes the newest checkpoint that verifies, and use_adapter.py refuses a damaged adapter in
one line (`adapter_folder_problem`) instead of merging damaged weights or stopping on a SafetensorError.
"""

from __future__ import annotations

import hashlib
import json
import os

from glmkit.run.checkpoint_names import BEST_ADAPTER_MARKER, COMPLETE


def sha256_of(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def file_manifest(folder: str) -> dict[str, dict]:
    """{path relative to folder: {"size", "sha256"}} of every file under `folder`."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            full = os.path.join(root, name)
            files[os.path.relpath(full, folder)] = {"size": os.path.getsize(full), "sha256": sha256_of(full)}
    return files


def manifest_problem(folder: str, listed: dict[str, dict]) -> str | None:
    """None if every listed file is there with its size and sha256; else the first that is not, in a few words."""
    for name, expected in listed.items():
        full = os.path.join(folder, name)
        if not os.path.isfile(full):
            return f"{name} is missing"
        size = os.path.getsize(full)
        if size != expected["size"]:
            return f"{name} has {size:,} bytes, {expected['size']:,} were written"
        if sha256_of(full) != expected["sha256"]:
            return f"{name} does not match its checksum (its content changed after it was written)"
    return None


def adapter_folder_problem(folder: str) -> str | None:
    """What is wrong with an adapter folder the kit wrote (the best adapter or a checkpoint), by its marker's
    list; None when it verifies, or when it is not the kit's (no marker) or older than the list."""
    for marker in (BEST_ADAPTER_MARKER, COMPLETE):
        path = os.path.join(folder, marker)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                listed = json.load(fh).get("files")
        except (OSError, ValueError, AttributeError):
            return f"its {marker} marker is unreadable"
        return manifest_problem(folder, listed) if isinstance(listed, dict) else None
    return None
