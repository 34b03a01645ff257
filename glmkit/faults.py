"""Fault injection for the crash tests.

GLMKIT_FAULT_KILL_AT=<point>:<step> SIGKILLs this process there; GLMKIT_FAULT_DISK_FULL_AT=
checkpoint_write:<step> makes that checkpoint's write fail with ENOSPC, as a full disk would.

Points: `mid_step` (between two micro-batches), `after_eval`, `checkpoint_write` (the Accelerate
state is on disk but the folder is not finalised). A real SIGKILL at a precise point makes
the kill/resume tests exact instead of racing a timer. Unset in normal runs: a no-op.
"""

import errno
import os
import signal


def maybe_kill(point: str, step: int) -> None:
    spec = os.environ.get("GLMKIT_FAULT_KILL_AT")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_fail_write(point: str, step: int, path: str) -> None:
    if os.environ.get("GLMKIT_FAULT_DISK_FULL_AT") == f"{point}:{step}":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
