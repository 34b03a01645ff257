"""One trainer per output folder: an exclusive lock on `<paths.output_dir>/.trainer.lock`.

The lock is an flock, so the kernel releases it when its process dies for any reason (SIGKILL,
OOM, a preempted node): a killed run never blocks its own `--resume`. The file says who holds
it, for the refusal message; it is left in place, since removing a lock file races a waiting
taker. Only the main process of a multi-process run takes it.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

LOCK_NAME = ".trainer.lock"


class RunLocked(RuntimeError):
    pass


class RunLock:
    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_NAME)
        self._fh = None

    def acquire(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            try:
                holder = json.loads(fh.read() or "{}")
            except ValueError:
                holder = {}
            fh.close()
            raise RunLocked(f"paths.output_dir {os.path.dirname(self.path)} is in use by another trainer (pid "
                            f"{holder.get('pid', '?')} on {holder.get('host', '?')}); wait for it to finish, stop "
                            f"it, or set paths.output_dir to another folder") from None
        holder = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n"
        try:  # who holds it is only for the refusal message: a full disk must not stop the run here
            os.ftruncate(fh.fileno(), 0)
            os.pwrite(fh.fileno(), holder.encode(), 0)
        except OSError:
            pass
        self._fh = fh

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None
