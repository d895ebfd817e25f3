"""Tests of ring_loss_tf.rendezvous: a worker waits, in Python, for the
other workers of TF_CONFIG, says whom it waits for, gives up after the
start-up timeout and stops at once on a signal.

Real sockets on 127.0.0.1 stand for the other workers. train.py's side
(its lines and exit statuses, with real worker processes) is tested in
test_faults.py.
"""

import json
import os
import re
import signal
import pathlib
import socket
import subprocess
import sys
import threading
import time

import pytest

from ring_loss_tf import cluster
from ring_loss_tf import rendezvous
from ring_loss_tf.errors import StartupInterrupted
from ring_loss_tf.errors import WorkerMissingError

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def worker_0(monkeypatch):
    """This process is worker 0 of two; returns both (host, port)."""
    tf_config = cluster.loopback_tf_configs(2)[0]
    monkeypatch.setenv("TF_CONFIG", tf_config)
    workers = json.loads(tf_config)["cluster"]["worker"]
    return [cluster.split_address(w) for w in workers]


def _answers(address):
    try:
        socket.create_connection(address, timeout=1).close()
        return True
    except OSError:
        return False


def test_waits_until_the_other_worker_listens(worker_0):
    own, other = worker_0
    seen = {}

    def other_worker_comes():
        time.sleep(0.5)
        # It sees worker 0 before it listens itself, as a peer does.
        seen["worker 0"] = _answers(own)
        server = socket.create_server(other)
        seen["server"] = server

    lines = []
    thread = threading.Thread(target=other_worker_comes)
    thread.start()
    start = time.monotonic()
    try:
        rendezvous.wait_for_peers(20, print_fn=lines.append, quiet_seconds=0.2)
    finally:
        thread.join()
        seen["server"].close()
    assert time.monotonic() - start < 10
    assert seen["worker 0"]
    assert lines == [
        f"Waiting for worker 1 at 127.0.0.1:{other[1]} to start (no answer "
        "there yet); giving up after 20 s (startup_timeout)."
    ]
    # Worker 0's port is free again, for TensorFlow's server.
    assert not _answers(own)
    socket.create_server(own).close()


def test_the_timeout_names_the_missing_worker_and_the_flag(worker_0):
    _, other = worker_0
    lines = []
    start = time.monotonic()
    with pytest.raises(WorkerMissingError) as caught:
        rendezvous.wait_for_peers(
            1, model_dir="runs/x", print_fn=lines.append, quiet_seconds=0
        )
    assert 1 <= time.monotonic() - start < 5
    assert str(caught.value) == (
        f"Worker 1 at 127.0.0.1:{other[1]} did not start within "
        "startup_timeout=1 s (--startup_timeout); nothing was written to "
        "runs/x. Start every worker with the same TF_CONFIG cluster and its "
        "own task index, or give them longer (0 waits forever)."
    )
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"Waiting for worker 1 at 127.0.0.1:{other[1]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_wait_at_once(worker_0, signum):
    _, other = worker_0
    # Were the signal not caught, this records it instead of ending pytest.
    before = []

    def recorder(*args):
        before.append(args)

    previous = signal.signal(signum, recorder)
    lines = []
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signum))
    try:
        timer.start()
        start = time.monotonic()
        with pytest.raises(StartupInterrupted) as caught:
            # A limit, so that a signal not caught fails instead of hanging.
            rendezvous.wait_for_peers(
                10,
                model_dir="runs/x",
                stop_on_signals=True,
                print_fn=lines.append,
                quiet_seconds=0,
            )
        elapsed = time.monotonic() - start
        restored = signal.getsignal(signum)
    finally:
        timer.cancel()
        signal.signal(signum, previous)
    assert elapsed < 3
    name = signal.Signals(signum).name
    assert caught.value.reason == name
    assert str(caught.value) == (
        f"Stopped by {name} while waiting for worker 1 at "
        f"127.0.0.1:{other[1]} to start; nothing was written to runs/x."
    )
    assert lines == [
        f"Waiting for worker 1 at 127.0.0.1:{other[1]} to start (no answer "
        "there yet); giving up after 10 s (startup_timeout); Ctrl-C or "
        "SIGTERM stops."
    ]
    assert not before
    assert restored is recorder


def test_a_taken_port_is_one_error(worker_0):
    own, _ = worker_0
    with socket.create_server(own):
        with pytest.raises(
            ValueError,
            match=(
                rf"^This worker cannot listen on port {own[1]} of its "
                rf"TF_CONFIG address 127\.0\.0\.1:{own[1]} \(.+\): another "
                r"process uses it\. Stop that process, or give this task "
                r"another port in every worker's TF_CONFIG\.$"
            ),
        ):
            rendezvous.wait_for_peers(5)


def test_without_a_cluster_it_returns_at_once(monkeypatch):
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps(
            {
                "cluster": {"worker": ["127.0.0.1:1"]},
                "task": {"type": "worker", "index": 0},
            }
        ),
    )
    start = time.monotonic()
    rendezvous.wait_for_peers(5, print_fn=pytest.fail)
    monkeypatch.delenv("TF_CONFIG")
    rendezvous.wait_for_peers(5, print_fn=pytest.fail)
    assert time.monotonic() - start < 1


def test_a_bad_address_is_one_error(monkeypatch):
    monkeypatch.setenv(
        "TF_CONFIG",
        json.dumps(
            {
                "cluster": {"worker": ["127.0.0.1:1", "other-host"]},
                "task": {"type": "worker", "index": 0},
            }
        ),
    )
    with pytest.raises(
        ValueError,
        match=re.escape("TF_CONFIG address 'other-host' is not host:port"),
    ):
        rendezvous.wait_for_peers(5)


def test_the_waiting_line_names_every_missing_task_and_the_limit():
    missing = [("chief 0", "c:0"), ("worker 2", "10.0.0.2:2222")]
    assert rendezvous.waiting_line(missing, 0, False) == (
        "Waiting for chief 0 at c:0, worker 2 at 10.0.0.2:2222 to start (no "
        "answer there yet); no time limit (startup_timeout=0)."
    )
    assert rendezvous.waiting_line(missing[1:], 600, True) == (
        "Waiting for worker 2 at 10.0.0.2:2222 to start (no answer there "
        "yet); giving up after 600 s (startup_timeout); Ctrl-C or SIGTERM "
        "stops."
    )


def test_a_deadline_that_is_met_ends_its_watcher_quietly(worker_0, capfd):
    start = time.monotonic()
    with rendezvous.strategy_deadline(30, model_dir="runs/x"):
        time.sleep(0.2)
    assert time.monotonic() - start < 5
    assert capfd.readouterr().err == ""


_HOLDS_THE_GIL = """
import ctypes, sys, types
# The package without its __init__ (which loads Keras and TensorFlow):
# the module and what it imports need neither.
package = types.ModuleType("ring_loss_tf")
package.__path__ = [sys.argv[1] + "/ring_loss_tf"]
sys.modules["ring_loss_tf"] = package
from ring_loss_tf import rendezvous
assert "tensorflow" not in sys.modules
with rendezvous.strategy_deadline(2, model_dir="runs/x"):
    # libc's sleep through PyDLL keeps the GIL, as TensorFlow's start-up
    # does: no Python thread or signal handler runs meanwhile.
    ctypes.PyDLL(None).sleep(60)
print("not ended")
"""


def test_a_missed_deadline_ends_a_process_that_holds_the_gil(worker_0):
    _, other = worker_0
    process = subprocess.run(
        [sys.executable, "-c", _HOLDS_THE_GIL, str(REPO)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"),
    )
    assert process.returncode == -signal.SIGKILL, process.stderr[-3000:]
    assert "not ended" not in process.stdout
    assert process.stderr.splitlines()[-1] == (
        "-c: The workers met, but TensorFlow's start-up did not finish "
        "within startup_timeout=2 s (--startup_timeout): another worker "
        f"(worker 1 at 127.0.0.1:{other[1]}) stopped, or is not a worker of "
        "this run; nothing was written to runs/x. Start every worker again "
        "with the same TF_CONFIG cluster."
    )


def test_ctrl_c_during_a_start_up_that_holds_the_gil_ends_it(worker_0):
    _, other = worker_0
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLDS_THE_GIL.replace("(2,", "(0,"), str(REPO)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        time.sleep(2)  # the watcher has started
        os.killpg(process.pid, signal.SIGINT)  # as Ctrl-C in a terminal
        sent = time.monotonic()
        out, err = process.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == -signal.SIGKILL, err[-3000:]
    assert took < 5
    assert "not ended" not in out
    assert err.splitlines() == [
        "-c: Stopped by SIGINT while TensorFlow's start-up waited for the "
        f"other workers (worker 1 at 127.0.0.1:{other[1]}); nothing was "
        "written to runs/x."
    ]
