"""Signals: outside the training loop they stop the run at once; inside it they wait for the
end of the step (where the ranks agree, save a checkpoint and stop), except Ctrl-C twice."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from xstilts.trainer.interrupt import Interruption, RunInterrupted


@pytest.fixture
def interruption() -> Iterator[Interruption]:
    previous = {s: signal.getsignal(s) for s in Interruption.SIGNALS}
    handler = Interruption()
    handler.install()
    yield handler
    for s, h in previous.items():
        signal.signal(s, h)


def test_outside_the_loop_a_signal_stops_at_once(interruption: Interruption) -> None:
    with pytest.raises(RunInterrupted, match="stopped by SIGTERM"):
        os.kill(os.getpid(), signal.SIGTERM)


def test_inside_the_loop_signals_wait_for_the_step_end(interruption: Interruption) -> None:
    steps = 0
    with pytest.raises(RunInterrupted) as stopped, interruption.deferring():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # a second sender: still waits
        steps += 1  # the loop carries on to the end of its step
        assert interruption.requested == signal.SIGTERM
    assert steps == 1 and stopped.value.signum == signal.SIGTERM


def test_ctrl_c_twice_does_not_wait(interruption: Interruption) -> None:
    with pytest.raises(RunInterrupted), interruption.deferring():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("the second Ctrl-C should have stopped the run here")
