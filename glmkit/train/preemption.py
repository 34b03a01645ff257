"""Preemption: a scheduler's SIGTERM, a Ctrl-C's SIGINT or a hung-up terminal's SIGHUP becomes a checkpoint at
the next step boundary, on every process together (glmkit/run/hangup.py says why SIGHUP needs more)."""

from __future__ import annotations

import signal

from glmkit.run.hangup import detach_from_terminal, terminal_fds
from glmkit.train.consensus import any_process

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Preemption:
    """Installed before run_start is logged: a signal from then on stops the run at the next step boundary."""

    def __init__(self):
        self.signal_name = None
        self._terminal = terminal_fds()  # noted now: after a hangup the terminal no longer says it is one
        for sig in SIGNALS:
            # An ignored SIGHUP was ignored on purpose (`nohup`): the run outlives the terminal. (A background
            # job's ignored SIGINT is not a request: a `kill -INT` still means stop.)
            if sig != signal.SIGHUP or signal.getsignal(sig) is not signal.SIG_IGN:
                signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGHUP:  # the terminal is gone: writing to it would fail with EIO from here on
            detach_from_terminal(self._terminal)
        self.signal_name = self.signal_name or signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """True on every process if any process was signalled (so all of them save together)."""
        return any_process(accelerator, self.signal_name is not None)
