"""train.py under a real SLURM: docs/train.sbatch submitted to a one-node
cluster on loopback (tests/slurm_cluster.py; Debian's slurm-wlm and munge,
installed here if missing) as two tasks of one srun step.

- The two tasks train as one MultiWorkerMirroredStrategy: the chief's last
  checkpoint equals one process with `--cpu_replicas=2` (within 1e-5).
- `scancel` mid-run: both tasks stop after the same step with exit status
  143 and a checkpoint that loads; submitting the same script again resumes
  and ends where the uninterrupted job ended.

If SLURM cannot be installed or started, the tests fail with one line
saying so: a missing cluster is never a skip.
"""

import pathlib
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import kill_resume
from tests import slurm_cluster

REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "docs" / "train.sbatch"
STEPS = 20
# One node, two tasks, no GPUs: the script's other settings stay.
SBATCH_OPTIONS = ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-task=0",
                  "--cpus-per-task=1"]
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = slurm_cluster.Slurm(tmp_path_factory.mktemp("slurm"))
    try:
        slurm_cluster.install()
        cluster.start()
    except slurm_cluster.SlurmUnavailable as error:
        cluster.stop()
        pytest.fail(f"no SLURM cluster to test on: {error}", pytrace=False)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm_runs")


def _flags(workdir):
    """The tiny run's flags without --model_dir (the script sets it)."""
    return [f for f in kill_resume.tiny_flags(workdir, "", steps=STEPS)
            if not f.startswith("--model_dir=")]


def _submit(slurm, workdir, model_dir, name, wait):
    """docs/train.sbatch with the tiny flags; returns (job id or sbatch's
    result, output file)."""
    output = workdir / f"{name}.out"
    env = dict(slurm.env, REPO=str(REPO), MODEL_DIR=str(model_dir),
               VENV=str(pathlib.Path(sys.executable).parents[1]),
               TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.pop("PYTHONPATH", None)  # the script's cd REPO picks the package
    command = ["sbatch", "--parsable", *SBATCH_OPTIONS, f"--job-name={name}",
               f"--output={output}", *(["--wait"] if wait else []),
               str(SCRIPT), *_flags(workdir)]
    result = subprocess.run(command, env=env, capture_output=True,
                            text=True, timeout=600)
    if wait:
        return result, output
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0], output


def _max_difference(a, b):
    """The largest absolute difference between two checkpoints' tensors
    (which must have the same names and shapes)."""
    ta, tb = (
        {k: v for k, v in kill_resume.read_checkpoint(p).items()
         if not k.startswith(kill_resume.NOT_COMPARED)}
        for p in (a, b)
    )
    assert sorted(ta) == sorted(tb)
    worst = 0.0
    for name in ta:
        x, y = np.asarray(ta[name]), np.asarray(tb[name])
        assert x.shape == y.shape, name
        if x.dtype.kind in "fiu" and x.size:
            worst = max(worst, float(np.max(np.abs(
                x.astype(np.float64) - y.astype(np.float64)))))
        else:
            assert np.array_equal(x, y), name
    return worst


@pytest.fixture(scope="module")
def one_process(workdir):
    """The reference: one process, two logical CPU replicas (it also makes
    the embedded set's cache the jobs read)."""
    model_dir = workdir / "one_process"
    result = kill_resume.run_train(
        [f"--model_dir={model_dir}", *_flags(workdir), "--cpu_replicas=2"])
    assert result.returncode == 0, result.stderr[-3000:]
    return model_dir


@pytest.fixture(scope="module")
def uninterrupted(slurm, workdir, one_process):
    model_dir = workdir / "uninterrupted"
    result, output = _submit(slurm, workdir, model_dir, "whole", wait=True)
    text = output.read_text() if output.exists() else ""
    assert result.returncode == 0, (result.stderr, text[-3000:])
    return model_dir, text


def test_two_srun_tasks_train_as_one_process_with_two_replicas(
        uninterrupted, one_process):
    model_dir, text = uninterrupted
    assert re.search(r"^Training: .* on 2 replica\(s\), steps 0→20, .*"
                     r"cluster slurm, worker 0 of 2, 0 GPU\(s\) per task$",
                     text, re.M), text[-3000:]
    assert "Worker 1 of 2 (slurm) started at step 0" in text, text[-3000:]
    assert "Exited with exit code" not in text, text[-3000:]
    final = kill_resume.checkpoint_paths(model_dir)[-1]
    assert final.endswith(f"ckpt-{STEPS}")
    reference = kill_resume.checkpoint_paths(one_process)[-1]
    difference = _max_difference(final, reference)
    print(f"srun -N1 -n2 vs --cpu_replicas=2: max |difference| "
          f"{difference:.3g}")
    assert difference <= TOLERANCE


def _wait_for(job, slurm, timeout=300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job], env=slurm.env,
                                capture_output=True, text=True).stdout
        if not queued.strip():
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job} still queued after {timeout} s")


def test_scancel_stops_both_tasks_at_one_step_and_resubmitting_resumes(
        slurm, workdir, uninterrupted):
    reference_dir, _ = uninterrupted
    model_dir = workdir / "cancelled"
    job, output = _submit(slurm, workdir, model_dir, "cancelled", wait=False)
    deadline = time.monotonic() + 300
    while not re.search(r"^step  3/", output.read_text()
                        if output.exists() else "", re.M):
        assert time.monotonic() < deadline, "the job never reached step 3"
        time.sleep(0.2)
    subprocess.run(["scancel", job], env=slurm.env, check=True)
    _wait_for(job, slurm)
    text = output.read_text()
    # srun reports the tasks together or one by one.
    exits = re.findall(r"^srun: error: \S+: tasks? ([0-9-]+): Exited with "
                       r"exit code (\d+)$", text, re.M)
    assert sorted(exits) in ([("0-1", "143")],
                             [("0", "143"), ("1", "143")]), text[-3000:]
    # A task may see the other's stop request before its own SIGTERM.
    chief = re.findall(r"^train\.py: Stopped by (?:SIGTERM|another worker) "
                       r"after step (\d+); checkpoint (\S+) holds it\. "
                       r"Resume with: srun -N1 -n2 python train\.py ",
                       text, re.M)
    other = re.findall(r"^train\.py: Stopped by (?:SIGTERM|another worker) "
                       r"after step (\d+); the chief worker wrote its "
                       r"checkpoint\.", text, re.M)
    assert len(chief) == 1 and len(other) == 1, text[-3000:]
    step, checkpoint = int(chief[0][0]), chief[0][1]
    assert int(other[0]) == step and 3 <= step < STEPS
    assert checkpoint == str(model_dir / f"ckpt-{step}")
    assert kill_resume.checkpoint_paths(model_dir)[-1] == checkpoint
    assert kill_resume.read_checkpoint(checkpoint)
    kill_resume.check_left_behind(model_dir)

    result, output = _submit(slurm, workdir, model_dir, "resumed", wait=True)
    text = output.read_text() if output.exists() else ""
    assert result.returncode == 0, (result.stderr, text[-3000:])
    assert f"Resuming from {checkpoint}: " in text, text[-3000:]
    assert f"Worker 1 of 2 (slurm) started at step {step}" in text
    difference = _max_difference(
        kill_resume.checkpoint_paths(model_dir)[-1],
        kill_resume.checkpoint_paths(reference_dir)[-1])
    print(f"scancel + resubmit vs uninterrupted job: max |difference| "
          f"{difference:.3g}")
    assert difference <= TOLERANCE
