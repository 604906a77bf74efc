"""The first Ctrl-C or SIGTERM asks for a stop at the next boundary; the second stops at once."""

import os
import signal

import pytest

from selfee_fast.stopping import Interrupted, stop_here, stop_requested, stop_requests


def test_first_signal_asks_second_stops_at_once():
    # What was there before, not Python's default: a process started in the background inherits SIGINT ignored.
    before = signal.getsignal(signal.SIGINT)
    with stop_requests():
        stop_here("before any signal")  # nothing asked: no stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop_requested()
        with pytest.raises(Interrupted, match="stopped on SIGTERM after step 3"):
            stop_here("after step 3")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0.1)  # give the handler a chance to run
    assert not stop_requested(), "the request ends with the run"
    assert signal.getsignal(signal.SIGINT) is before, "the previous handler is back"


def test_under_an_agreement_a_signal_after_it_waits_for_the_next_one():
    """Training's ranks compare requests, then write the checkpoint, then stop where they agreed: a
    signal that lands in between must not stop this process alone (the others would go on)."""
    with stop_requests():
        os.kill(os.getpid(), signal.SIGTERM)  # arrives after the comparison said "go on"
        assert stop_requested()
        stop_here("after step 3", agreed=False)  # no stop: the other ranks were told to continue
        with pytest.raises(Interrupted, match="stopped on SIGTERM after step 4"):
            stop_here("after step 4", agreed=True)  # the next comparison includes it
    with stop_requests():
        with pytest.raises(Interrupted, match="stopped with the run's other processes after step 2"):
            stop_here("after step 2", agreed=True)  # another rank asked
