"""Preemption: a scheduler's SIGTERM/SIGINT becomes a checkpoint at the next step boundary."""

from __future__ import annotations

import signal

from glmkit.train.consensus import any_process


class Preemption:
    def __init__(self):
        self.signal_name = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name

    def requested(self, accelerator) -> bool:
        """True on every process if any process was signalled (so all of them save together)."""
        return any_process(accelerator, self.signal_name is not None)
