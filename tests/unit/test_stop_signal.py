"""SIGTERM and SIGUSR1 (what Slurm sends before a time limit or preemption) ask the loop to stop."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from mmer_dist.train.stop import StopRequest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_request_catches_slurm_signals(sig):
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        stop = StopRequest()
        stop.install()
        assert not stop.agreed(torch.device("cpu"))
        os.kill(os.getpid(), sig)
        assert stop.signum == sig
        assert stop.agreed(torch.device("cpu"))
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
