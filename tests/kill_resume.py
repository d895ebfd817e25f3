"""Kill train.py with SIGKILL at random moments, resume, check nothing is lost.

    python tests/kill_resume.py                      # 10 kills (23 min here, at
                                                     # nice 19 beside a benchmark)
    python tests/kill_resume.py --kills 20 --seed 3 --workdir /tmp/kr

A tiny run (the embedded character set at 12 identities, A-Softmax + Ring
loss, a checkpoint after every step) is first trained without interruption.
Then the same command is started again and again on a second model_dir, and
each time killed with SIGKILL at a moment drawn at random from three kinds:

- start-up: a random time before the first step (importing TensorFlow,
  reading the data, building and compiling the model);
- training: a random time, up to two step durations, after a random
  progress line;
- checkpoint write: the moment a checkpoint's temporary files appear in
  model_dir (TensorFlow writes <prefix>_temp/ and then merges; the
  `checkpoint` index is replaced atomically).

After every kill, each checkpoint named in model_dir/checkpoint must load
with every tensor readable. At the end the killed run is completed and its
last checkpoint compared with the uninterrupted one, tensor by tensor and
exactly: weights, R, the A-Softmax iteration counter, optimizer slots, the
step and the input iterator's position. `tests/training/test_faults.py`
runs this with 3 kills.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 30
# The number of save operations differs between the runs by construction.
NOT_COMPARED = ("save_counter/",)
# Kill moments (see the docstring).
KINDS = ("start-up", "training", "checkpoint write")
_PROGRESS = re.compile(r"^step\s+(\d+)/(\d+)")


def tiny_flags(workdir, model_dir, steps=STEPS):
    """train.py flags of a tiny, deterministic, quickly started run."""
    return [
        f"--model_dir={model_dir}",
        f"--cache_dir={pathlib.Path(workdir) / 'cache'}",
        "--num_train_identities=12",
        "--num_test_identities=6",
        "--train_samples_per_identity=6",
        "--test_samples_per_identity=3",
        "--image_size=16",
        "--head=asoftmax",
        "--lambda_ring=0.01",
        f"--steps={steps}",
        "--batch_size=8",
        "--lr=0.01",
        "--warmup_steps=2",
        "--log_every=1",
        "--checkpoint_every=1",
        "--noevaluate",
        "--noexport",
    ]


def environment():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_train(flags, env=None, **kwargs):
    """train.py in a new process (stdout piped, line by line)."""
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), *flags],
        cwd=REPO,
        env=env or environment(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        **kwargs,
    )


def run_train(flags, timeout=600, **kwargs):
    """train.py to completion; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, str(REPO / "train.py"), *flags],
        cwd=REPO,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


def _temporary_checkpoint_files(model_dir):
    try:
        names = os.listdir(model_dir)
    except FileNotFoundError:
        return []
    return [n for n in names if "_temp" in n or ".tmp" in n]


def checkpoint_paths(model_dir):
    """The checkpoints the `checkpoint` index of model_dir names."""
    import tensorflow as tf

    state = tf.train.get_checkpoint_state(str(model_dir))
    if state is None:
        return []
    return list(state.all_model_checkpoint_paths)


def read_checkpoint(path):
    """Every tensor of a checkpoint (raises if one cannot be read).

    The input iterator's state is a variant tensor, which the checkpoint
    reader lists but cannot convert; it is checked by its effect: the
    resumed run would train on other batches, and the weights would differ.
    """
    import tensorflow as tf

    reader = tf.train.load_checkpoint(str(path))
    return {
        name: reader.get_tensor(name)
        for name, dtype in reader.get_variable_to_dtype_map().items()
        if dtype != tf.variant
    }


def check_left_behind(model_dir):
    """Loads every checkpoint in model_dir; returns (loaded, left over).

    Every checkpoint whose .index file exists must load completely, and so
    must the latest one the `checkpoint` index names, with two exceptions a
    kill can leave, returned as left over:
    - TensorFlow's CheckpointManager names the new checkpoint in the index
      *before* it deletes the oldest beyond max_to_keep (so a kill while
      deleting never loses the new one); a kill in between leaves an index
      entry of an old checkpoint without files (allowed only for entries
      older than the latest);
    - TensorFlow merges ckpt-N_temp/ into ckpt-N.index before it names
      ckpt-N in the index; a kill during the merge leaves a partial
      ckpt-N.index newer than the latest named one, which nothing reads
      and the next run deletes (`trainer.remove_unfinished_checkpoints`).

    Raises:
        RuntimeError: a checkpoint does not load (names it and why).
    """
    model_dir = pathlib.Path(model_dir)
    named = checkpoint_paths(model_dir)
    on_disk = sorted(str(p)[: -len(".index")]
                     for p in model_dir.glob("*.index"))
    being_deleted = [
        p for p in named[:-1] if not pathlib.Path(p + ".index").exists()
    ]
    newest = _step_of(named[-1]) if named else -1
    unfinished = [p for p in on_disk
                  if p not in named and _step_of(p) > newest]
    loaded = 0
    for path in sorted(set(on_disk) | set(named[-1:])):
        try:
            read_checkpoint(path)
            loaded += 1
        except Exception as error:  # noqa: BLE001 - named in the message
            if path in unfinished:
                being_deleted.append(path)
                continue
            raise RuntimeError(
                f"the checkpoint {path} does not load: {error}"
            ) from None
    return loaded, being_deleted


def _step_of(path):
    return int(re.search(r"ckpt-(\d+)$", str(path)).group(1))


def compare_checkpoints(a, b):
    """Names of tensors that differ between two checkpoints (exactly)."""
    import numpy as np

    ta = {k: v for k, v in read_checkpoint(a).items()
          if not k.startswith(NOT_COMPARED)}
    tb = {k: v for k, v in read_checkpoint(b).items()
          if not k.startswith(NOT_COMPARED)}
    differ = sorted(set(ta) ^ set(tb))
    for name in sorted(set(ta) & set(tb)):
        x, y = np.asarray(ta[name]), np.asarray(tb[name])
        if x.shape != y.shape or not np.array_equal(x, y):
            differ.append(name)
    return differ, sorted(ta)


@dataclasses.dataclass
class Kill:
    kind: str
    step_before: int | None  # latest checkpoint step before this start
    step_after: int | None  # latest checkpoint step after the kill
    temporary_files: list  # checkpoint temp files left by the kill
    checkpoints_loaded: int
    # Index entries of old checkpoints whose files max_to_keep was deleting.
    being_deleted: list


def _latest_step(model_dir):
    paths = checkpoint_paths(model_dir)
    return int(paths[-1].rsplit("-", 1)[1]) if paths else None


def _kill_once(flags, model_dir, kind, startup_seconds, step_seconds, rng,
               total_steps):
    """Starts train.py, SIGKILLs it at a moment of `kind`; True if killed
    before it finished."""
    process = start_train(flags)
    started = time.monotonic()
    try:
        if kind == "start-up":
            deadline = started + rng.uniform(0.0, startup_seconds)
            while time.monotonic() < deadline and process.poll() is None:
                time.sleep(0.005)
        else:
            # Early in what is left, so that the run survives many kills.
            before = _latest_step(model_dir) or 0
            target = before + rng.randint(1, max(1, (total_steps - before) // 3))
            for line in process.stdout:
                match = _PROGRESS.match(line)
                if match and int(match.group(1)) >= target:
                    break
            if kind == "training":
                time.sleep(rng.uniform(0.0, 2 * step_seconds))
            else:
                # Poll for the temporary files of the next checkpoint.
                deadline = time.monotonic() + 10 * step_seconds + 1.0
                while (
                    not _temporary_checkpoint_files(model_dir)
                    and time.monotonic() < deadline
                    and process.poll() is None
                ):
                    pass
        killed = process.poll() is None
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        return killed
    finally:
        if process.poll() is None:
            process.kill()
        process.stdout.close()
        process.stderr.close()


def timed_run(flags):
    """train.py to completion, timed from its progress lines: (exit code,
    stderr, (seconds to the first step, seconds a step))."""
    process = start_train(flags)
    t0 = time.monotonic()
    times = []
    for line in process.stdout:
        if _PROGRESS.match(line):
            times.append(time.monotonic() - t0)
    stderr = process.stderr.read()
    process.wait()
    process.stderr.close()
    process.stdout.close()
    startup_seconds = times[0] if times else time.monotonic() - t0
    step_seconds = max(
        1e-3, (times[-1] - times[0]) / max(1, len(times) - 1)
    ) if times else 0.05
    return process.returncode, stderr, (startup_seconds, step_seconds)


def run(workdir, kills=10, seed=0, steps=STEPS, print_fn=print,
        reference_dir=None, timings=None):
    """The whole check (see the module docstring).

    `reference_dir`: an uninterrupted run of `tiny_flags(workdir, ...,
    steps)` already finished (its embedded set cached in `workdir`), used
    instead of training one here. `timings`: (start-up seconds, seconds a
    step) of that run, from `timed_run`; without them a second run
    measures them. Timings from a cold start (the set generated first) are a
    little long: a "start-up" kill that comes after the run has finished
    is drawn again, as any kill that comes too late.

    Returns:
        dict: "kills" (list of `Kill`), "differ" (tensor names that differ
        from the uninterrupted run: empty when nothing was lost),
        "compared" (the tensor names compared), "seconds".

    Raises:
        RuntimeError: a run failed, or a checkpoint left behind does not
            load (the message says which).
    """
    workdir = pathlib.Path(workdir)
    rng = random.Random(seed)
    started = time.monotonic()
    killed_dir = workdir / "killed"
    t0 = time.monotonic()
    if reference_dir is None:
        reference_dir = workdir / "uninterrupted"
        reference = run_train(tiny_flags(workdir, reference_dir, steps))
        if reference.returncode != 0:
            raise RuntimeError(
                f"uninterrupted run failed:\n{reference.stderr}"
            )
    total = time.monotonic() - t0
    if timings is None:
        # Rough timings of this machine, from a second, warm start.
        code, stderr, timings = timed_run(
            tiny_flags(workdir, workdir / "timing", steps)
        )
        if code != 0:
            raise RuntimeError(f"timing run failed:\n{stderr}")
    startup_seconds, step_seconds = timings
    print_fn(
        f"uninterrupted run: {reference_dir} ({total:.1f} s here); start-up "
        f"{startup_seconds:.1f} s, {1000 * step_seconds:.0f} ms a step"
    )
    record = []
    flags = tiny_flags(workdir, killed_dir, steps)
    while len(record) < kills:
        kind = KINDS[len(record) % len(KINDS)] if len(record) < 3 else (
            rng.choice(KINDS)
        )
        before = _latest_step(killed_dir)
        if before is not None and before >= steps - 1:
            # Too close to the end for another kill: start over.
            import shutil

            shutil.rmtree(killed_dir)
            before = None
        if not _kill_once(flags, killed_dir, kind, startup_seconds,
                          step_seconds, rng, steps):
            print_fn(f"  ({kind}: the run finished before the kill; again)")
            continue
        temporary = _temporary_checkpoint_files(killed_dir)
        try:
            loaded, swept = check_left_behind(killed_dir)
        except RuntimeError as error:
            raise RuntimeError(
                f"after kill {len(record) + 1} ({kind}): {error}"
            ) from None
        kill = Kill(kind, before, _latest_step(killed_dir), temporary,
                    loaded, swept)
        record.append(kill)
        print_fn(
            f"kill {len(record):2d} ({kind:16s}): checkpoint step "
            f"{kill.step_before} -> {kill.step_after}, "
            f"{kill.checkpoints_loaded} checkpoint(s) load"
            + (f", temporary files left: {', '.join(temporary)}"
               if temporary else "")
            + (f", left over (being deleted or written): {swept}"
               if swept else "")
        )
    final = run_train(flags)
    if final.returncode != 0:
        raise RuntimeError(f"resumed run failed:\n{final.stderr}")
    _, left_over = check_left_behind(killed_dir)
    if left_over:
        raise RuntimeError(f"the completed run left behind {left_over}")
    last = checkpoint_paths(killed_dir)[-1]
    differ, compared = compare_checkpoints(
        checkpoint_paths(reference_dir)[-1], last
    )
    seconds = time.monotonic() - started
    print_fn(
        f"resumed to {last}: {len(compared)} tensors compared with the "
        f"uninterrupted run, {len(differ)} differ"
        + (f": {differ}" if differ else "") + f" ({seconds:.0f} s in all)"
    )
    return {"kills": record, "differ": differ, "compared": compared,
            "seconds": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--workdir", default=None,
                        help="default: a new temporary directory")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.steps < 4:
        parser.error("--kills must be >= 1 and --steps >= 4")
    import tempfile

    workdir = args.workdir or tempfile.mkdtemp(prefix="kill-resume-")
    result = run(workdir, kills=args.kills, seed=args.seed, steps=args.steps)
    kinds = {k: sum(x.kind == k for x in result["kills"]) for k in KINDS}
    partial = sum(bool(x.temporary_files) for x in result["kills"])
    print(
        f"{len(result['kills'])} kills ({kinds}); {partial} left partial "
        "checkpoint files; every checkpoint left behind loaded; final "
        + ("state EQUAL to the uninterrupted run" if not result["differ"]
           else f"state DIFFERS in {result['differ']}")
    )
    return 0 if not result["differ"] else 1


if __name__ == "__main__":
    sys.exit(main())
