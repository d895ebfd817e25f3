"""Faults during training and export: nothing already written is lost.

Each test runs train.py (or the export CLI) as a user would, in a
subprocess, on the tiny embedded set of `kill_resume.tiny_flags`:

- SIGKILL at random moments, 3 times, then resume: every checkpoint left
  behind loads and the final state equals an uninterrupted run
  (`python tests/kill_resume.py` is the 10-kill version);
- SIGTERM / SIGINT: a checkpoint of the current step, one line saying how
  to resume, exit status 128 + the signal number; resuming ends where an
  uninterrupted run ends;
- resuming with another head, backbone or class count: one line naming
  the mismatch, every file in model_dir unchanged (also when config.json
  is missing: nothing is written before the checkpoint is restored);
- a checkpoint with damaged bytes: one line, nothing changed, and the
  earlier checkpoint the message points to resumes;
- no room to write (`RLIMIT_FSIZE`, what `ulimit -f` sets): one line
  saying so, the previous checkpoint and export unchanged;
- a worker whose peers never come: it says whom it waits for, and SIGTERM
  or --startup_timeout stops it with one line, having written nothing.
"""

import hashlib
import json
import pathlib
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from ring_loss_tf import cluster
from tests import kill_resume


def _digests(directory):
    """{relative path: sha256} of every file under `directory`."""
    directory = pathlib.Path(directory)
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).digest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _error_lines(stderr):
    return [l for l in stderr.splitlines()
            if l.startswith(("train.py:", "python -m ring_loss_tf.export:"))]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """An uninterrupted tiny run of 12 steps (module-wide reference)."""
    workdir = tmp_path_factory.mktemp("faults")
    model_dir = workdir / "uninterrupted"
    code, stderr, timings = kill_resume.timed_run(
        kill_resume.tiny_flags(workdir, model_dir, steps=12)
    )
    assert code == 0, stderr[-3000:]
    # For the kill soak, which would otherwise time a run of its own.
    (workdir / "timings.json").write_text(json.dumps(timings))
    return workdir, model_dir


def test_sigkill_three_times_then_resume_equals_uninterrupted(finished):
    # The module's uninterrupted run is the reference: the same flags.
    workdir, reference_dir = finished
    lines = []
    result = kill_resume.run(workdir, kills=3, seed=0, steps=12,
                             print_fn=lines.append,
                             reference_dir=reference_dir,
                             timings=json.loads(
                                 (workdir / "timings.json").read_text()))
    kinds = [k.kind for k in result["kills"]]
    assert kinds == list(kill_resume.KINDS), lines
    assert result["differ"] == [], lines
    # Weights and R (the optimizer's trainable variables), the momentum
    # slots, the A-Softmax counter and the step were all compared.
    compared = result["compared"]
    for prefix in ("optimizer/_trainable_variables/", "optimizer/_variables/",
                   "model/_operations/", "step/"):
        assert any(n.startswith(prefix) for n in compared), compared
    assert any(n.endswith("/iterations/.ATTRIBUTES/VARIABLE_VALUE")
               and n.startswith("model/") for n in compared), compared


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_the_current_step_and_says_how_to_resume(
    finished, tmp_path, signum
):
    workdir, reference_dir = finished
    model_dir = tmp_path / "run"
    flags = kill_resume.tiny_flags(workdir, model_dir, steps=12)
    process = kill_resume.start_train(flags)
    for line in process.stdout:
        if line.startswith("step  5/"):
            process.send_signal(signum)
            break
    out, err = process.communicate(timeout=300)
    assert process.returncode == 128 + signum, err[-3000:]
    name = signal.Signals(signum).name
    assert f"{name} received: stopping after this step" in out, out
    (message,) = _error_lines(err)
    match = re.fullmatch(
        rf"train\.py: Stopped by {name} after step (\d+); checkpoint "
        rf"(\S+) holds it\. Resume with: python \S*train\.py (.*)",
        message,
    )
    assert match, message
    step, checkpoint = int(match.group(1)), match.group(2)
    # The step the signal arrived in was finished and saved (5 or 6).
    assert step in (5, 6)
    assert checkpoint == str(model_dir / f"ckpt-{step}")
    assert kill_resume.checkpoint_paths(model_dir)[-1] == checkpoint
    assert match.group(3).split() == flags
    # Resuming with the printed command ends where the reference ended.
    resumed = kill_resume.run_train(flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {checkpoint}" in resumed.stdout
    differ, compared = kill_resume.compare_checkpoints(
        kill_resume.checkpoint_paths(reference_dir)[-1],
        kill_resume.checkpoint_paths(model_dir)[-1],
    )
    assert differ == [] and compared


@pytest.mark.parametrize(
    "flag, mismatch",
    [
        # ArcFace's default embedding block differs too: both are named, in
        # the order of `config.ModelConfig`.
        ("--head=arcface", r"head='asoftmax' \(now 'arcface'\), "
                           r"embedding_block='fc' \(now 'bn'\)"),
        ("--backbone=sphereface4", r"backbone='small_cnn' \(now "
                                   r"'sphereface4'\), embedding_dim=128 "
                                   r"\(now 512\)"),
        ("--num_train_identities=10", r"num_classes=12 \(now 10\)"),
    ],
)
def test_resume_with_another_model_names_it_and_overwrites_nothing(
    finished, flag, mismatch
):
    workdir, model_dir = finished
    before = _digests(model_dir)
    result = kill_resume.run_train(
        kill_resume.tiny_flags(workdir, model_dir, steps=20) + [flag]
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (message,) = _error_lines(result.stderr)
    assert re.match(
        rf"train\.py: error: {re.escape(str(model_dir))} holds a checkpoint "
        rf"of another model: {mismatch}\. Use a new model_dir, or the "
        r"settings of that run to resume it\.$",
        message,
    ), message
    assert _digests(model_dir) == before


def _file_size_limit(limit_bytes):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_no_room_for_a_checkpoint_keeps_the_previous_one(finished, tmp_path):
    workdir, reference_dir = finished
    model_dir = tmp_path / "run"
    flags = kill_resume.tiny_flags(workdir, model_dir, steps=4)
    first = kill_resume.run_train(flags[:-1] + ["--export"])
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digests(model_dir)
    largest = max(p.stat().st_size for p in model_dir.rglob("*.data-*"))
    # Room for logs and the config, not for a checkpoint's data file.
    more = [f for f in flags if not f.startswith("--steps")] + [
        "--steps=8", "--export"
    ]
    result = kill_resume.run_train(
        more, preexec_fn=_file_size_limit(largest // 2)
    )
    assert result.returncode == 1, result.stderr[-3000:]
    (message,) = _error_lines(result.stderr)
    assert re.fullmatch(
        rf"train\.py: Could not write the checkpoint of step 5 to "
        rf"{re.escape(str(model_dir))} \(.*File too large.*\); the previous "
        rf"checkpoint {re.escape(str(model_dir / 'ckpt-4'))} is intact\. "
        r"Free disk space \(or raise the file size limit, `ulimit -f`\) and "
        r"rerun the same command to resume\.",
        message,
    ), message
    after = _digests(model_dir)
    # The checkpoint, its index, the config and the export are unchanged
    # (only TensorBoard's event files and partial ckpt-5 files are new).
    for name, digest in before.items():
        if not name.startswith("train/"):
            assert after.get(name) == digest, name
    assert kill_resume.checkpoint_paths(model_dir)[-1].endswith("ckpt-4")
    kill_resume.check_left_behind(model_dir)
    # With room again, the same command resumes and finishes.
    again = kill_resume.run_train(more)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Resuming from {model_dir / 'ckpt-4'}" in again.stdout


def test_no_room_for_an_export_keeps_the_previous_one(finished, tmp_path):
    workdir, model_dir = finished
    output = tmp_path / "export"
    command = [sys.executable, "-m", "ring_loss_tf.export",
               f"--model_dir={model_dir}", f"--output={output}"]
    env = kill_resume.environment()
    first = subprocess.run(command, env=env, capture_output=True, text=True,
                           timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _digests(output)
    result = subprocess.run(
        command + ["--overwrite"], env=env, capture_output=True, text=True,
        timeout=600, preexec_fn=_file_size_limit(4096),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    (message,) = _error_lines(result.stderr)
    assert re.fullmatch(
        r"python -m ring_loss_tf\.export: error: "
        rf"Could not write the export to {re.escape(str(output))} "
        r"\(.*File too large.*\); the previous export there is intact\. "
        r"Free disk space \(or raise the file size limit, `ulimit -f`\) and "
        r"export again\.",
        message,
    ), message
    assert _digests(output) == before
    # No staging directory is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def _start_two_workers(flags):
    """Two train.py processes with `flags`, as a MultiWorkerMirroredStrategy
    cluster on 127.0.0.1: (chief, other)."""
    return [
        kill_resume.start_train(
            flags, env=dict(kill_resume.environment(), TF_CONFIG=tf_config)
        )
        for tf_config in cluster.loopback_tf_configs(2)
    ]


def test_signal_to_one_worker_stops_both_at_the_same_step(finished, tmp_path):
    """Two train.py workers (MultiWorkerMirroredStrategy on 127.0.0.1):
    SIGTERM to the non-chief alone checkpoints both at one step."""
    workdir, _ = finished
    model_dir = tmp_path / "run"
    flags = kill_resume.tiny_flags(workdir, model_dir, steps=40)
    processes = _start_two_workers(flags)
    chief, other = processes
    try:
        for line in chief.stdout:
            if line.startswith("step  5/"):
                other.send_signal(signal.SIGTERM)
                break
        chief_out, chief_err = chief.communicate(timeout=300)
        _, other_err = other.communicate(timeout=300)
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    assert other.returncode == 128 + signal.SIGTERM, other_err[-3000:]
    assert chief.returncode == 128 + signal.SIGTERM, chief_err[-3000:]
    (chief_line,) = _error_lines(chief_err)
    (other_line,) = _error_lines(other_err)
    step = int(re.search(r"after step (\d+);", chief_line).group(1))
    assert chief_line.startswith(
        f"train.py: Stopped by another worker after step {step}; "
        f"checkpoint {model_dir / f'ckpt-{step}'} holds it. Resume with:"
    ), chief_line
    assert other_line.startswith(
        f"train.py: Stopped by SIGTERM after step {step}; the chief worker "
        "wrote its checkpoint."
    ), other_line
    assert kill_resume.checkpoint_paths(model_dir)[-1].endswith(
        f"ckpt-{step}")
    kill_resume.check_left_behind(model_dir)


def test_a_worker_that_dies_stops_the_other_and_a_restart_resumes(tmp_path):
    """SIGKILL to the non-chief: the chief stops with one line within
    TensorFlow's heartbeat timeout, its checkpoints intact; both started
    again resume from the latest and finish. On a fresh cache, so both
    workers also generate the embedded set (which once hung: its children
    were forked after the strategy's gRPC threads started)."""
    model_dir = tmp_path / "run"
    # Enough steps that the chief is still training when its peer dies
    # (it cannot pass the next collective without it).
    flags = kill_resume.tiny_flags(tmp_path, model_dir, steps=40)
    chief, other = _start_two_workers(flags)
    try:
        for line in chief.stdout:
            if line.startswith("step  5/"):
                other.send_signal(signal.SIGKILL)
                killed = time.monotonic()
                break
        _, chief_err = chief.communicate(timeout=300)
        noticed = time.monotonic() - killed
        other.communicate(timeout=60)
    finally:
        for p in (chief, other):
            if p.poll() is None:
                p.kill()
    assert chief.returncode == 1, chief_err[-3000:]
    assert noticed < 60  # not hanging at the next collective
    (line,) = _error_lines(chief_err)
    latest = kill_resume.checkpoint_paths(model_dir)[-1]
    assert re.fullmatch(
        r"train.py: Lost contact with another worker at step \d+ \(.*"
        r"/job:worker/replica:0/task:1\); the checkpoints in "
        + re.escape(f"{model_dir} are intact (latest: {latest}; the steps "
                    "after it are lost). Start every worker again with the "
                    "same command and TF_CONFIG to resume from the latest "
                    "checkpoint."),
        line,
    ), line
    kill_resume.check_left_behind(model_dir)
    chief, other = _start_two_workers(flags)
    chief_out, chief_err = chief.communicate(timeout=300)
    _, other_err = other.communicate(timeout=60)
    assert chief.returncode == 0, chief_err[-3000:]
    assert other.returncode == 0, other_err[-3000:]
    first = chief_out.splitlines()[0]
    assert first.startswith(f"Resuming from {latest}:"), first
    assert kill_resume.checkpoint_paths(model_dir)[-1].endswith("ckpt-40")


def _copy_run(model_dir, target):
    shutil.copytree(model_dir, target)
    return target


def test_a_failed_resume_writes_nothing_in_the_run_directory(
    finished, tmp_path
):
    """config.json deleted, then resumed with another head: refused in one
    line, and no new config.json is left to refuse the right command."""
    workdir, reference_dir = finished
    model_dir = _copy_run(reference_dir, tmp_path / "run")
    (model_dir / "config.json").unlink()
    before = _digests(model_dir)
    result = kill_resume.run_train(
        kill_resume.tiny_flags(workdir, model_dir, steps=20)
        + ["--head=cosface"]
    )
    assert result.returncode == 2, result.stderr[-3000:]
    (message,) = _error_lines(result.stderr)
    assert re.fullmatch(
        rf"train\.py: error: Checkpoint {re.escape(str(model_dir))}/ckpt-12 "
        r"does not fit the model these settings build \(another backbone, "
        r"head, embedding size or class count; "
        rf"{re.escape(str(model_dir))}/config\.json is missing\); the "
        rf"checkpoints in {re.escape(str(model_dir))} are unchanged\. Give "
        r"the settings of the run that wrote it, or use a new model_dir\.",
        message,
    ), message
    assert _digests(model_dir) == before  # no config.json either
    # The original command still resumes, and writes config.json once the
    # run starts.
    resumed = kill_resume.run_train(
        kill_resume.tiny_flags(workdir, model_dir, steps=13)
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {model_dir}/ckpt-12" in resumed.stdout
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["model"]["head"] == "asoftmax"


def test_a_damaged_checkpoint_is_one_line_and_an_earlier_one_resumes(
    finished, tmp_path
):
    workdir, reference_dir = finished
    model_dir = _copy_run(reference_dir, tmp_path / "run")
    data = model_dir / "ckpt-12.data-00000-of-00001"
    damaged = bytearray(data.read_bytes())
    for offset in range(len(damaged) // 4, len(damaged), len(damaged) // 4):
        damaged[offset] ^= 0xFF
    data.write_bytes(bytes(damaged))
    before = _digests(model_dir)
    flags = kill_resume.tiny_flags(workdir, model_dir, steps=13)
    result = kill_resume.run_train(flags)
    assert result.returncode == 2, result.stderr[-3000:]
    (message,) = _error_lines(result.stderr)
    index = model_dir / "checkpoint"
    assert re.fullmatch(
        rf"train\.py: error: Checkpoint {re.escape(str(model_dir))}/ckpt-12 "
        r"cannot be read \(.*Checksum does not match.*\); the checkpoints in "
        rf"{re.escape(str(model_dir))} are unchanged\. To resume from an "
        r"earlier checkpoint there, name it in the model_checkpoint_path "
        r"line of "
        rf"{re.escape(str(index))}; or use a new model_dir\.",
        message,
    ), message
    assert _digests(model_dir) == before
    # The fix the message gives.
    text = index.read_text()
    assert 'model_checkpoint_path: "ckpt-12"' in text
    index.write_text(text.replace('model_checkpoint_path: "ckpt-12"',
                                  'model_checkpoint_path: "ckpt-11"', 1))
    resumed = kill_resume.run_train(flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming from {model_dir}/ckpt-11" in resumed.stdout


def test_a_worker_that_fails_at_start_stops_the_other_with_one_line(
    tmp_path
):
    """The non-chief fails as it starts (its --worker_scratch_dir is a
    file): it says so in one line, and the chief stops with the one-line
    lost-worker message, not TensorFlow's traceback."""
    model_dir = tmp_path / "run"
    scratch = tmp_path / "not_a_directory"
    scratch.write_text("")
    flags = kill_resume.tiny_flags(tmp_path, model_dir, steps=4)
    chief_config, other_config = cluster.loopback_tf_configs(2)
    environment = kill_resume.environment()
    chief = kill_resume.start_train(
        flags, env=dict(environment, TF_CONFIG=chief_config)
    )
    other = kill_resume.start_train(
        flags + [f"--worker_scratch_dir={scratch}"],
        env=dict(environment, TF_CONFIG=other_config),
    )
    try:
        _, other_err = other.communicate(timeout=300)
        _, chief_err = chief.communicate(timeout=120)
    finally:
        for p in (chief, other):
            if p.poll() is None:
                p.kill()
    assert other.returncode == 2, other_err[-3000:]
    (other_line,) = _error_lines(other_err)
    assert other_line == (
        f"train.py: error: --worker_scratch_dir={scratch}: cannot make a "
        f"directory there ([Errno 17] File exists: '{scratch}'); give a "
        "writable directory, or omit it to use the system's temporary "
        "directory"
    ), other_line
    assert chief.returncode == 1, chief_err[-3000:]
    (chief_line,) = _error_lines(chief_err)
    assert re.fullmatch(
        r"train\.py: Lost contact with another worker while starting"
        r"(, before step 1)? \(.*\); the chief's checkpoints are intact\. "
        r"Start every worker again with the same command and TF_CONFIG to "
        r"resume from the latest checkpoint\.",
        chief_line,
    ), chief_line
    assert "Traceback" not in chief_err, chief_err[-3000:]


def _lone_worker(tmp_path, index, extra=()):
    """train.py as worker `index` of a two-worker TF_CONFIG whose other
    worker never starts; returns it once it prints whom it waits for,
    with that line, the other's address and the model_dir."""
    model_dir = tmp_path / "run"
    tf_config = cluster.loopback_tf_configs(2)[index]
    other = json.loads(tf_config)["cluster"]["worker"][1 - index]
    process = kill_resume.start_train(
        kill_resume.tiny_flags(tmp_path, model_dir, steps=4) + list(extra),
        env=dict(kill_resume.environment(), TF_CONFIG=tf_config),
    )
    # A worker that never says it waits (or hangs) fails instead of hanging.
    deadline = threading.Timer(300, process.kill)
    deadline.start()
    try:
        for line in process.stdout:
            if line.startswith("Waiting for"):
                return process, line.rstrip("\n"), other, model_dir
    except BaseException:
        process.kill()
        raise
    finally:
        deadline.cancel()
    process.kill()
    pytest.fail("no waiting line: " + process.communicate()[1][-3000:])


def test_a_worker_alone_says_whom_it_waits_for_and_stops_at_the_timeout(
    tmp_path
):
    """Worker 0 of two, worker 1 never started: it names worker 1 and its
    address, and after --startup_timeout stops with one line naming them
    and the flag, having written nothing."""
    process, waiting, other, model_dir = _lone_worker(
        tmp_path, 0, ["--startup_timeout=8"]
    )
    try:
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert waiting == (
        f"Waiting for worker 1 at {other} to start (no answer there yet); "
        "giving up after 8 s (startup_timeout); Ctrl-C or SIGTERM stops."
    )
    assert process.returncode == 1, err[-3000:]
    assert _error_lines(err) == [
        f"train.py: Worker 1 at {other} did not start within "
        "startup_timeout=8 s (--startup_timeout); nothing was written to "
        f"{model_dir}. Start every worker with the same TF_CONFIG cluster "
        "and its own task index, or give them longer (0 waits forever)."
    ], err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert not model_dir.exists()


@pytest.mark.parametrize("index", [0, 1])
def test_sigterm_while_waiting_for_a_worker_stops_at_once(tmp_path, index):
    """SIGTERM to a worker waiting for the other (which never starts):
    one line, exit status 128 + SIGTERM within seconds, nothing written.
    TensorFlow's own start-up would ignore it (it catches SIGTERM)."""
    process, waiting, other, model_dir = _lone_worker(tmp_path, index)
    try:
        process.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        _, err = process.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
    assert waiting.startswith(
        f"Waiting for worker {1 - index} at {other} to start"
    ), waiting
    assert process.returncode == 128 + signal.SIGTERM, err[-3000:]
    # Python's shutdown after TensorFlow: about 4 s on 2 busy cores.
    assert took < 20, took
    assert _error_lines(err) == [
        f"train.py: Stopped by SIGTERM while waiting for worker {1 - index} "
        f"at {other} to start; nothing was written to {model_dir}."
    ], err[-3000:]
    assert not model_dir.exists()


def test_a_peer_that_answers_but_never_joins_is_ended_at_the_timeout(
    tmp_path
):
    """Worker 1's port answers (a plain socket), but no TensorFlow worker
    is behind it: worker 0 passes the wait and then waits inside
    TensorFlow's start-up, which Python cannot interrupt; after
    --startup_timeout a separate process prints one line and ends it."""
    model_dir = tmp_path / "run"
    tf_config = cluster.loopback_tf_configs(2)[0]
    other = json.loads(tf_config)["cluster"]["worker"][1]
    with socket.create_server(cluster.split_address(other)):
        process = kill_resume.start_train(
            kill_resume.tiny_flags(tmp_path, model_dir, steps=4)
            + ["--startup_timeout=10"],
            env=dict(kill_resume.environment(), TF_CONFIG=tf_config),
        )
        try:
            out, err = process.communicate(timeout=300)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == -signal.SIGKILL, err[-3000:]
    assert "Waiting for" not in out
    assert _error_lines(err) == [
        "train.py: The workers met, but TensorFlow's start-up did not "
        "finish within startup_timeout=10 s (--startup_timeout): another "
        f"worker (worker 1 at {other}) stopped, or is not a worker of this "
        f"run; nothing was written to {model_dir}. Start every worker again "
        "with the same TF_CONFIG cluster."
    ], err[-3000:]
    assert not model_dir.exists()
