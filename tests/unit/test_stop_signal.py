"""SIGTERM and SIGUSR1 (what Slurm sends before a time limit or preemption) and SIGINT ask the loop to stop;
only SIGTERM/SIGUSR1 requeue a Slurm job."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from mmer_dist.train import stop as stop_module
from mmer_dist.train.stop import STOP_SIGNALS, StopRequest, handlers_restored, requeue_if_slurm


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_stop_request_catches_stop_signals(sig):
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with handlers_restored():
        stop = StopRequest()
        stop.install()
        assert not stop.agreed(torch.device("cpu"))
        os.kill(os.getpid(), sig)
        assert stop.signum == sig and stop.name == signal.Signals(sig).name
        assert stop.agreed(torch.device("cpu"))
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before      # the caller's handlers are back


@pytest.mark.parametrize("sig, requeued", [(signal.SIGTERM, True), (signal.SIGINT, False)])
def test_only_a_slurm_stop_requeues(monkeypatch, sig, requeued):
    calls = []
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setattr(stop_module.subprocess, "run", lambda cmd, **kw: calls.append(cmd))
    requeue_if_slurm(True, sig)
    assert calls == ([["scontrol", "requeue", "42"]] if requeued else [])


def test_a_signal_while_waiting_for_data_gives_the_fetch_a_grace_then_stops_the_wait():
    """A batch that arrives within the grace finishes its step (the stop is noted, the run checkpoints as
    usual at the step's end); a wait that outlasts the grace is interrupted (a stall)."""
    import time

    with handlers_restored():
        stop = StopRequest()
        stop.grace = 0.5
        stop.install()
        with stop.waiting():                    # an ordinary fetch: the batch comes 0.2 s after the signal
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.2)
        assert stop.signum == signal.SIGTERM and signal.getitimer(signal.ITIMER_REAL)[0] == 0
        t0 = time.monotonic()
        with pytest.raises(stop_module.StoppedWaiting), stop.waiting():    # a stall: nothing comes
            time.sleep(30)
        assert time.monotonic() - t0 < 5
