"""Can the kit write where the config says? Checked before anything starts, one line per folder.

Validation (`glmkit.config.validate`) looks only at the paths' shapes, because the dashboard
and `--plan` load the same config without writing anything. The commands that do write call
`unwritable_problems` first, so an unwritable, read-only, looping or misplaced folder is one line
naming the key instead of a PermissionError traceback from wherever the first file is opened.
"""

from __future__ import annotations

import errno
import os


def why_unwritable(folder: str) -> str | None:
    """Why files can't be created in `folder` (created on demand), in a few words; None: they can."""
    path = folder
    while True:
        try:
            os.stat(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return f"{path} is a symlink loop (a link that leads back to itself)"
            if exc.errno == errno.ENOTDIR:
                return f"a part of {path} is a file, not a folder"
            if exc.errno != errno.ENOENT:
                return f"{path} cannot be read ({exc.strerror})"
            if os.path.islink(path):
                return f"{path} is a symlink to nothing"
            parent = os.path.dirname(path)
            if parent == path:
                return f"{path} does not exist"
            path = parent  # not there yet: the kit creates it inside the nearest folder that is
            continue
        break
    if not os.path.isdir(path):
        return f"{path} is a file, not a folder"
    if not os.access(path, os.W_OK | os.X_OK):
        # os.access answers for the real user, and EROFS for a read-only mount even for root.
        probe = "is on a read-only filesystem" if _read_only(path) else "is not writable by this user"
        return f"{path} {probe}"
    return None


def _read_only(path: str) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def unwritable_problems(cfg, keys: tuple[str, ...]) -> list[str]:
    """'paths.KEY: cannot write in FOLDER: why; fix' for each of `keys` (PathsSection fields) the kit can't write."""
    problems = []
    for key in keys:
        folder = getattr(cfg.paths, key)
        if key == "best_adapter_dir":  # replaced by renames beside it: its parent must be writable too
            folder = os.path.dirname(folder)
        reason = why_unwritable(folder) if folder else None
        if reason is None and key == "output_dir" and os.path.lexists(cfg.logs_dir):
            folder = cfg.logs_dir  # a run folder of one's own can still hold another user's logs/
            reason = why_unwritable(folder)
        if reason:
            where = folder if folder == cfg.logs_dir else getattr(cfg.paths, key)
            problems.append(f"paths.{key}: cannot write in {where}: {reason}; fix the "
                            f"permissions or set paths.{key} to a folder you can write")
    return problems
