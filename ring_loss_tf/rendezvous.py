"""Waiting for the other workers of a TF_CONFIG cluster, before TensorFlow.

`MultiWorkerMirroredStrategy` starts inside one TensorFlow call that waits
for every task to register and holds the GIL while it waits: no Python
thread or signal handler runs, and the call first replaces the SIGTERM
handler with TensorFlow's own (its preemption notice), so a worker whose
peers never come would wait there forever, silent and deaf to SIGTERM. So
`train` waits here first, in Python: each worker listens on its own
TF_CONFIG port (its peers see that it has come) and connects to theirs
until all of them answer at once; then it closes the port, which
TensorFlow's server binds a moment later. A peer that answered and then
stops before TensorFlow's start-up reaches it still leaves the others
waiting inside TensorFlow: `strategy_deadline` ends them after the
start-up timeout from a separate process.

Imports no TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from ring_loss_tf import cluster
from ring_loss_tf.errors import StartupInterrupted
from ring_loss_tf.errors import WorkerMissingError

# Peers usually come within a few seconds of each other: say whom a worker
# waits for only when the wait is not one of those.
QUIET_SECONDS = 3.0
_POLL_SECONDS = 0.2
_CONNECT_SECONDS = 1.0


def wait_for_peers(
    timeout,
    *,
    model_dir=None,
    stop_on_signals=False,
    print_fn=print,
    quiet_seconds=QUIET_SECONDS,
):
    """Returns once every other task of TF_CONFIG answers at its address.

    Does nothing without a multi-worker TF_CONFIG. After `quiet_seconds`
    it prints whom it waits for (again when that changes).

    Args:
        timeout: seconds to wait at most; 0 waits forever.
        model_dir: named in the messages (nothing is written there).
        stop_on_signals: SIGINT / SIGTERM stop the wait at once with
            `StartupInterrupted` (needs the main thread); otherwise they
            keep their usual effect.

    Raises:
        WorkerMissingError: some task did not answer within `timeout`.
        StartupInterrupted: a signal came while waiting (`stop_on_signals`).
        ValueError: a bad TF_CONFIG, or this worker's port is taken.
    """
    peers, own_address = cluster.peer_tasks()
    if not peers:
        return
    targets = [
        (name, address, cluster.split_address(address))
        for name, address in peers
    ]
    start = time.monotonic()
    received = []
    reported = None
    missing = [(name, address) for name, address in peers]
    with _listening(own_address), _signals_noted(stop_on_signals, received):
        while True:
            if received:
                raise StartupInterrupted(
                    received[0],
                    f"Stopped by {received[0]} while waiting for "
                    f"{_names(missing)} to start; nothing was written"
                    f"{_in(model_dir)}.",
                )
            missing = [
                (name, address)
                for name, address, target in targets
                if not _answers(target)
            ]
            if not missing:
                return
            waited = time.monotonic() - start
            if timeout and waited >= timeout:
                names = _names(missing)
                raise WorkerMissingError(
                    f"{names[0].upper()}{names[1:]} did not start within "
                    f"startup_timeout={timeout:g} s (--startup_timeout); "
                    f"nothing was written{_in(model_dir)}. Start every "
                    "worker with the same TF_CONFIG cluster and its own "
                    "task index, or give them longer (0 waits forever)."
                )
            if waited >= quiet_seconds and missing != reported:
                reported = missing
                print_fn(waiting_line(missing, timeout, stop_on_signals))
            time.sleep(_POLL_SECONDS)


def waiting_line(missing, timeout, stop_on_signals):
    """What a worker prints while it waits for the `missing` tasks
    [(name, address)]."""
    until = (
        f"giving up after {timeout:g} s (startup_timeout)"
        if timeout
        else "no time limit (startup_timeout=0)"
    )
    stop = "; Ctrl-C or SIGTERM stops" if stop_on_signals else ""
    return (
        f"Waiting for {_names(missing)} to start (no answer there "
        f"yet); {until}{stop}."
    )


def _names(tasks):
    return ", ".join(f"{name} at {address}" for name, address in tasks)


def _in(model_dir):
    return f" to {model_dir}" if model_dir is not None else ""


def _answers(target):
    try:
        socket.create_connection(target, timeout=_CONNECT_SECONDS).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _listening(address):
    """Listens on the port of this worker's TF_CONFIG `address` (as
    TensorFlow's server will, on every interface); connections are never
    accepted: the kernel completes them, which is all a peer checks."""
    _, port = cluster.split_address(address)
    try:
        if socket.has_dualstack_ipv6():
            server = socket.create_server(
                ("", port), family=socket.AF_INET6, dualstack_ipv6=True
            )
        else:
            server = socket.create_server(("", port))
    except OSError as error:
        raise ValueError(
            f"This worker cannot listen on port {port} of its TF_CONFIG "
            f"address {address} ({error.strerror or error}): another "
            "process uses it. Stop that process, or give this task another "
            "port in every worker's TF_CONFIG."
        ) from None
    try:
        yield
    finally:
        server.close()


@contextlib.contextmanager
def _signals_noted(enabled, received):
    """SIGINT / SIGTERM append their name to `received` instead of their
    usual effect, while inside."""
    previous = {}
    if enabled and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(
                signum,
                lambda number, frame: received.append(
                    signal.Signals(number).name
                ),
            )
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler or signal.SIG_DFL)


# The watcher: stdlib only, run with -I, so it starts in a fraction of a
# second and nothing on PYTHONPATH shadows what it imports. Ctrl-C reaches
# the whole process group, so the watcher sees it while the worker cannot.
_WATCHER = """
import os, select, signal, sys
parent, timeout, late, stopped_by, while_waiting = sys.argv[1:6]

def end(message):
    sys.stderr.write(message + "\\n")
    sys.stderr.flush()
    os.kill(int(parent), signal.SIGKILL)
    sys.exit(0)

for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, lambda number, frame: end(
        stopped_by + signal.Signals(number).name + while_waiting))
if not select.select([sys.stdin], [], [], float(timeout) or None)[0]:
    end(late)
"""


@contextlib.contextmanager
def strategy_deadline(timeout, *, model_dir=None):
    """Around the strategy's start-up, after `wait_for_peers`: ends this
    process (SIGKILL, after one line on standard error) if the block inside
    has not finished `timeout` seconds after it began (0: no limit), or
    when SIGINT / SIGTERM reaches its process group (Ctrl-C) meanwhile.

    TensorFlow's start-up holds the GIL, so no Python thread or signal
    handler of this process could act: a small process started here does,
    and ends as soon as the block finishes (or this process ends).
    """
    peers, _ = cluster.peer_tasks()
    if not peers:
        yield
        return
    program = os.path.basename(sys.argv[0] or "python")
    written = f"nothing was written{_in(model_dir)}"
    late = (
        f"{program}: The workers met, but TensorFlow's start-up did not "
        f"finish within startup_timeout={timeout:g} s (--startup_timeout): "
        f"another worker ({_names(peers)}) stopped, or is not a worker of "
        f"this run; {written}. Start every worker again with the same "
        "TF_CONFIG cluster."
    )
    while_waiting = (
        " while TensorFlow's start-up waited for the other workers "
        f"({_names(peers)}); {written}."
    )
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-I",
            "-c",
            _WATCHER,
            str(os.getpid()),
            str(timeout),
            late,
            f"{program}: Stopped by ",
            while_waiting,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        watcher.stdin.close()
        watcher.wait()
