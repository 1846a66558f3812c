"""SIGTERM / SIGINT: a run stops so that it can be retried, and the retry resumes.

Outside the training loop a signal stops the run at once (RunInterrupted). Inside it
(`Interruption.deferring()`), the signal only sets a flag; the loop's callback makes every rank
agree at the end of a step, save a checkpoint together and stop (see loop.RunCallback).
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType


class RunInterrupted(BaseException):
    """A signal stopped the run; it is to be retried (and resumes from its checkpoint)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class Interruption:
    """SIGTERM / SIGINT handling. While `deferring()` (the training loop) a signal only sets
    `requested`, and the loop stops at a step boundary; otherwise, or at a second SIGINT, it
    raises RunInterrupted."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.requested: int | None = None
        self._deferring = False

    def install(self) -> None:
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        again = self.requested is not None
        if not again:
            self.requested = signum
        # Ctrl-C pressed twice does not wait for the step to end. A repeated SIGTERM does: it
        # may come from several senders at once (the executor and the parent-death signal),
        # and stopping halfway through writing the checkpoint would lose it; what is stuck is
        # SIGKILLed at the end of the grace period anyway.
        if not self._deferring or (again and signum == signal.SIGINT):
            raise RunInterrupted(signum)

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False
        if self.requested is not None:
            raise RunInterrupted(self.requested)
