"""Pre-emption signals (SIGTERM / SIGINT) as a request the training loop honours.

Standard library only, so that a program can install the guard before its heavy imports.
"""
from __future__ import annotations

import signal


class PreemptionGuard:
    """Turns the first SIGTERM / SIGINT into a request the loop honours after its current step
    (save, then exit); a second SIGINT interrupts at once."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
