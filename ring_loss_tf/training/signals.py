"""Signals: SIGINT / SIGTERM as a request to stop after the current step."""

from __future__ import annotations

import os
import signal
import threading


class StopOnSignals:
    """Turns SIGINT / SIGTERM into a request to stop after the current step.

    Use as a context manager around the training loop and pass the instance
    as `stop_requested` (calling it returns the signal's name, or None). A
    second signal of the same kind acts at once (Ctrl-C twice: a
    KeyboardInterrupt; SIGTERM twice: the default termination); the
    checkpoints already written are intact either way. Outside the main
    thread, where Python cannot install handlers, it does nothing.

    Args:
        signals: the signals to catch.
        print_fn: told once when a stop is requested.
    """

    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM),
                 print_fn=print):
        self.signals = tuple(signals)
        self.print_fn = print_fn
        self.received = None
        self._previous = {}

    def __call__(self):
        return self.received

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None:
            signal.signal(signum, self._previous.get(signum) or signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.received = name
        self.print_fn(
            f"{name} received: stopping after this step with a checkpoint "
            f"(send {name} again to stop at once)."
        )

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in self.signals:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous or signal.SIG_DFL)
        self._previous = {}
        return False
