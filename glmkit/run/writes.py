"""The one write path: any failure to write what the kit writes becomes one `WriteFailed` line.

Checkpoints, the best adapter, the data cache, merge output and the run logs all write through
`guarded_write`. Whatever the library underneath raises when the disk fills (`OSError` errno 28 from
plain writes, `RuntimeError: basic_ios::clear` / `unexpected pos` from torch.save, `SafetensorError:
... No space left on device`, numpy's `OSError: N requested and M written`), the user reads one line:

    could not write <what> <path>: no space left on device; <what is intact>; <how to continue>

and the trainer (or CLI) exits 2. The partial folder the write was filling is removed first, so a
failed write leaves nothing half-done behind. The rule lives here so that every writer says the same.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys

NO_SPACE = "no space left on device"
# Below this many free bytes the filesystem counts as full: torch.save and numpy's short writes do not
# say why they failed, and a disk this full is the reason.
FULL_BELOW_BYTES = 1 << 20
QUOTED_CHARS = 200


class WriteFailed(RuntimeError):
    """A write the kit makes failed; the message is the whole story (path, cause, what is intact, the fix)."""


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_bytes(path: str) -> int | None:
    """Free bytes on the filesystem `path` is (or would be) on; None when nothing of it can be stat'ed."""
    path = os.path.abspath(path)
    while path and not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def cause_of(exc: BaseException, path: str) -> str:
    """What really went wrong, in a few words: "no space left on device", "permission denied", ..."""
    for link in _chain(exc):
        if isinstance(link, OSError) and link.errno in (errno.ENOSPC, errno.EDQUOT):
            return NO_SPACE if link.errno == errno.ENOSPC else "disk quota exceeded"
        if "no space left" in str(link).lower():
            return NO_SPACE
    free = free_bytes(path)
    if free is not None and free < FULL_BELOW_BYTES:
        return NO_SPACE
    for link in _chain(exc):
        if isinstance(link, OSError) and link.strerror:
            return link.strerror.lower()
    first = (str(exc).strip().splitlines() or [""])[0]
    text = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return text if len(text) <= QUOTED_CHARS else text[:QUOTED_CHARS] + "..."


def remove_partial(path: str | None) -> None:
    """Remove a temporary file or folder the failed write was filling (only ever one the kit named)."""
    if not path or not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


def describe_failure(what: str, path: str, cause: str, intact: str, fix: str) -> str:
    if cause == NO_SPACE:
        fix = f"free space on the disk holding {path}" + (f", then {fix}" if fix else "")
    elif fix:
        fix = f"fix that, then {fix}"
    return "; ".join(part for part in (f"could not write {what} {path}: {cause}", intact, fix) if part)


@contextlib.contextmanager
def guarded_write(what: str, path: str, *, partial: str | None = None, intact="", fix: str = "",
                  passes: tuple[type[BaseException], ...] = ()):
    """Run the body (a write of `what` to `path`); on any failure remove `partial` and raise WriteFailed.

    `intact` says what the failure did not touch; it may be a callable, evaluated after the partial
    folder is gone (e.g. "the latest complete checkpoint, X, is intact"). KeyboardInterrupt and
    SystemExit pass through untouched, and so do the `passes` types (the writer's own one-line errors,
    such as "no training documents"), after the partial folder is removed.
    """
    try:
        yield
    except (WriteFailed, *passes):
        remove_partial(partial)
        raise
    except Exception as exc:
        cause = cause_of(exc, partial or path)  # before the partial folder goes: removing it frees space
        remove_partial(partial)
        says = intact() if callable(intact) else intact
        raise WriteFailed(describe_failure(what, path, cause, says, fix)) from exc


def note_on_stderr(message: str) -> None:
    """Last resort when even the error log cannot be written: never raise from here."""
    with contextlib.suppress(Exception):
        print(message, file=sys.stderr, flush=True)
