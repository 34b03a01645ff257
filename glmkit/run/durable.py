"""Writes that survive a power cut: data and folders on disk before a rename makes them visible.

After a power cut a file written without fsync can come back at its full size with zeros in it, or cut
short, and a rename can reach the disk before the data of the folder it renames. Every folder the kit
writes whole and then renames into place (a checkpoint, the best adapter, a token store, a rows folder)
goes through `fsync_tree` before the rename and `fsync_path` of the parent after it, so a folder that is
visible under its final name holds exactly what was written, and the rename itself is not lost.
(glmkit/run/swap.py does the same around its exchange; the checksums that prove a folder whole after
the fact are glmkit/run/manifest.py's and the token store's.)
"""

from __future__ import annotations

import os


def fsync_path(path: str) -> None:
    """Flush one file's data, or one folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: str) -> None:
    """Flush every file under `folder`, then every folder, deepest first (so each folder's entries name
    files that are already on disk)."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(root)


def fsync_parent(path: str) -> None:
    """Flush the folder holding `path`: makes a rename or a new entry in it durable."""
    fsync_path(os.path.dirname(os.path.abspath(path)))


def rename_durably(src: str, dst: str) -> None:
    """Rename a finished file or folder into place: its content on disk first, then the rename."""
    if os.path.isdir(src):
        fsync_tree(src)
    else:
        fsync_path(src)
    os.rename(src, dst)
    fsync_parent(dst)
    if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
        fsync_parent(src)
