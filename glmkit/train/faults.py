"""Fault injection for the crash tests.

GLMKIT_FAULT_KILL_AT=<point>:<step>[:<SIGNAL>] sends this process SIGKILL (or the signal named, e.g.
SIGINT: a Ctrl-C at a precise moment) there; GLMKIT_FAULT_DISK_FULL_AT=
checkpoint_write:<step> makes that checkpoint's write fail with ENOSPC (kept for the resume-after-failure
test on machines where no tmpfs can be mounted; tests/test_real_faults.py fills a real disk instead);
GLMKIT_FAULT_UNSHARED_OUTPUT=1 shows every process but the main one a private output folder,
as node-local disks on a multi-node job would.

Points: `mid_step` (between two micro-batches), `after_eval`, `checkpoint_write` (the Accelerate
state is on disk but the folder is not finalised). A real SIGKILL at a precise point makes
the kill/resume tests exact instead of racing a timer. Unset in normal runs: a no-op.
"""

import errno
import os
import signal


def maybe_kill(point: str, step: int) -> None:
    spec = os.environ.get("GLMKIT_FAULT_KILL_AT", "")
    at, _, name = spec.partition(f"{point}:{step}")
    if spec and not at and name in ("", *(f":{s.name}" for s in signal.Signals)):
        os.kill(os.getpid(), signal.Signals[name[1:]] if name else signal.SIGKILL)


def maybe_fail_write(point: str, step: int, path: str) -> None:
    if os.environ.get("GLMKIT_FAULT_DISK_FULL_AT") == f"{point}:{step}":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def unshared_view(path: str, process_index: int) -> str:
    if process_index and os.environ.get("GLMKIT_FAULT_UNSHARED_OUTPUT") == "1":
        return os.path.join(os.path.dirname(path), f"private-{process_index}", os.path.basename(path))
    return path


def injected_nan(step: int, loss: float) -> float:
    """GLMKIT_FAULT_NAN_STEPS=3,4 makes those steps' loss NaN, as a diverging run would."""
    steps = os.environ.get("GLMKIT_FAULT_NAN_STEPS", "")
    return float("nan") if str(step) in steps.split(",") else loss
