"""A dropped SSH session: the terminal hangs up, SIGHUP arrives, and the terminal is gone.

The shell sends SIGHUP to the foreground job when its terminal hangs up (the usual end of a run started in
the foreground over SSH). Python's default is to die at once, losing every step since the last checkpoint;
the trainer and the launcher treat it as the preemption signal instead (glmkit/train/preemption.py,
glmkit/launch/accelerate.py). But a process that lives on after the hangup must stop writing to the
terminal: every write to a hung-up terminal fails with EIO, and the first progress-bar update would end
the run with an exception. So `terminal_fds` notes, at start, which of stdout and stderr are a terminal
(after the hangup a terminal no longer says it is one), and `detach_from_terminal` points those at
/dev/null when SIGHUP comes. The run's JSON-lines logs (and the dashboard) still record everything.
"""

from __future__ import annotations

import contextlib
import os


def terminal_fds() -> tuple[int, ...]:
    """Which of stdout (1) and stderr (2) are a terminal now."""
    found = []
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            if os.isatty(fd):
                found.append(fd)
    return tuple(found)


def detach_from_terminal(fds: tuple[int, ...]) -> None:
    """Point `fds` (noted by terminal_fds while the terminal was there) at /dev/null; safe in a signal handler."""
    if not fds:
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(null, fd)
    finally:
        os.close(null)
