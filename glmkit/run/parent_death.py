"""A process that should not outlive its parent: the kernel signals it when the parent dies (Linux).

torch elastic starts every rank in a session of its own, and a pool worker waits on its parent's pipes:
when the parent is SIGKILLed, neither learns of it by itself. `PR_SET_PDEATHSIG` makes the kernel send
the chosen signal at the parent's death; checking the parent right after closes the race with a parent
that died first.
"""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1


def signal_on_parent_death(sig: int = signal.SIGTERM) -> bool:
    """Ask for `sig` when the parent dies; False where the kernel has no such request (not Linux)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)
    return True
