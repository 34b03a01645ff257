"""Fault injection for the crash tests: GLMKIT_FAULT_KILL_AT=<point>:<step> SIGKILLs this process there.

Points: `mid_step` (between two micro-batches), `after_eval`, `checkpoint_write` (the Accelerate
state is on disk but the folder is not finalised). A real SIGKILL at a precise point makes
the kill/resume tests exact instead of racing a timer. Unset in normal runs: a no-op.
"""

import os
import signal


def maybe_kill(point: str, step: int) -> None:
    spec = os.environ.get("GLMKIT_FAULT_KILL_AT")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
