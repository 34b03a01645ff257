"""Replacing a whole folder so that a kill at any instant leaves the old or the new one in place.

Used for the best adapter and for a rewritten `checkpoint-N` (glmkit/train/checkpoint.py). On Linux the
two folders trade places in one `renameat2(RENAME_EXCHANGE)` call: there is no moment without the target.
Where the filesystem cannot exchange (EINVAL/ENOSYS: some network filesystems, other kernels), it falls
back to two renames, target -> old then new -> target; a kill between them leaves no target but both
folders whole, and `recover` (run before the next write) puts the newest whole one back.

A power cut is the other way to lose a folder: a rename can reach the disk before the files it makes
visible. So `swap_in` flushes every file of the new folder and the folder itself before it renames
anything, and the parent folder after (glmkit/run/durable.py): once `swap_in` returns, the new folder is
on disk under its name, whole.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from collections.abc import Callable

from glmkit.run.durable import fsync_parent, fsync_tree

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2
_libc = None


def exchange(a: str, b: str) -> bool:
    """Atomically swap two existing paths; False when this system or filesystem cannot."""
    global _libc
    if not hasattr(os, "uname") or os.uname().sysname != "Linux":
        return False
    try:
        _libc = _libc or ctypes.CDLL(None, use_errno=True)
        renameat2 = _libc.renameat2
    except (OSError, AttributeError):  # a libc without renameat2 (glibc < 2.28)
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), a, None, b)


def swap_in(new: str, target: str, old: str | None = None) -> None:
    """Put folder `new` at `target`, replacing what is there; afterwards `new` no longer exists.

    Durable: `new`'s files and the folder are flushed before the rename, the parent folder after it."""
    old = old or f"{target}.old"
    fsync_tree(new)
    if not os.path.lexists(target):
        os.rename(new, target)
        fsync_parent(target)
        return
    if exchange(new, target):  # `new` now names the previous folder
        fsync_parent(target)
        shutil.rmtree(new, ignore_errors=True)
        return
    if os.path.lexists(old):
        shutil.rmtree(old)
    os.rename(target, old)
    os.rename(new, target)
    fsync_parent(target)
    shutil.rmtree(old, ignore_errors=True)


def recover(target: str, new: str, old: str, is_whole: Callable[[str], bool]) -> str | None:
    """After a kill inside `swap_in`: if `target` is missing, promote the whole `new`, else the whole `old`.

    Returns the folder promoted (None if nothing needed doing). Leftovers beside an existing target
    are not touched here: the caller knows whether they are its own to remove.
    """
    if os.path.lexists(target):
        return None
    for candidate in (new, old):
        if os.path.isdir(candidate) and not os.path.islink(candidate) and is_whole(candidate):
            os.rename(candidate, target)
            fsync_parent(target)
            return candidate
    return None
