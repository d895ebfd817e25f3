"""Regression guard: train.py on this checkout against a past release.

    python bench/release.py                      # against 0.1.0, 3 rounds
    python bench/release.py --baseline 0.1.0 --repeats 5 \\
        --train_flags="--jit=false"             # both sides with a flag

Runs the same train.py command (default: the quick start shortened,
`--lambda_ring=0.01 --steps=60 --log_every=20 --evaluate=false
--export=false`, each run in a fresh model_dir) on the baseline (a tag or
commit, extracted with `git archive` into a temporary directory) and on
this working tree, alternately, round after round, so a slow spell of the
machine hits both. Each run's figure is its last logged images/s (the
steps after the previous progress line, compilation excluded); the table
gives the median of the rounds per side and the median of the per-round
ratios, with the CPU it ran on. Both sides share the embedded data set's
cache, so neither pays for generating it inside the timed lines.

Run it alone on the machine, before any performance claim.
"""

import argparse
import os
import pathlib
import re
import shlex
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import machine  # noqa: E402

# Release tags and the commits they name, for clones without the tags.
RELEASES = {"0.1.0": "5f4ae6c"}

DEFAULT_COMMAND = (
    "--lambda_ring=0.01 --steps=60 --log_every=20 --evaluate=false "
    "--export=false"
)

RATE = re.compile(r"^step\s+(\d+)/\d+\s.*?\s([\d.]+) img/s", re.M)


def resolve(revision):
    """The commit of a tag, a commit or a release name of `RELEASES`."""
    for candidate in (revision, RELEASES.get(revision)):
        if candidate is None:
            continue
        found = subprocess.run(
            ["git", "rev-parse", "--verify", "--quiet",
             f"{candidate}^{{commit}}"],
            cwd=REPO, capture_output=True, text=True,
        )
        if found.returncode == 0:
            return found.stdout.strip()
    sys.exit(f"bench/release.py: error: --baseline={revision}: no such tag "
             "or commit in this clone; fetch the tags (git fetch --tags) or "
             "give a commit")


def extract(commit, directory):
    """The commit's tree, as `git archive` writes it, into `directory`."""
    archive = pathlib.Path(directory) / "tree.tar"
    with open(archive, "wb") as out:
        subprocess.run(["git", "archive", commit], cwd=REPO, stdout=out,
                       check=True)
    tree = pathlib.Path(directory) / "tree"
    with tarfile.open(archive) as tar:
        tar.extractall(tree, filter="data")
    archive.unlink()
    return tree


def check_import(tree):
    """The package a run in `tree` imports must be the tree's own (an
    editable install of this checkout must not shadow it)."""
    out = subprocess.run(
        [sys.executable, "-c",
         "import ring_loss_tf, os; print(os.path.realpath("
         "ring_loss_tf.__file__))"],
        cwd=tree, env=_env(tree), capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not out.startswith(str(pathlib.Path(tree).resolve())):
        sys.exit(f"bench/release.py: error: a run in {tree} imports "
                 f"ring_loss_tf from {out}")


def _env(tree):
    return {**os.environ, "PYTHONPATH": str(tree),
            "TF_CPP_MIN_LOG_LEVEL": "2"}


def run(tree, flags, model_dir):
    """(last logged images/s, wall seconds) of one train.py run."""
    command = [sys.executable, str(pathlib.Path(tree) / "train.py"), *flags,
               f"--model_dir={model_dir}"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=tree, env=_env(tree),
                          capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"bench/release.py: error: {shlex.join(command)} exited "
                 f"{done.returncode}:\n{done.stderr[-2000:]}")
    rates = [(int(s), float(r)) for s, r in RATE.findall(done.stdout)]
    rates = [r for s, r in rates if s > 1]
    if not rates:
        sys.exit("bench/release.py: error: no progress line after step 1 in "
                 f"{shlex.join(command)}'s output; give --log_every below "
                 "--steps")
    return rates[-1], wall


def main():
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="0.1.0",
                        help="tag or commit to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--command", default=DEFAULT_COMMAND,
                        help="train.py's flags on both sides")
    parser.add_argument("--train_flags", default="",
                        help="more flags for both sides")
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    flags = shlex.split(args.command) + shlex.split(args.train_flags)
    commit = resolve(args.baseline)
    with tempfile.TemporaryDirectory(prefix="ring_loss_release_") as tmp:
        tmp = pathlib.Path(tmp)
        sides = {
            f"{args.baseline} ({commit[:7]})": extract(commit, tmp),
            "this checkout": REPO,
        }
        for tree in sides.values():
            check_import(tree)
        # One untimed run per side: the data set's cache, bytecode.
        for name, tree in sides.items():
            run(tree, flags + ["--steps=2", "--log_every=1"],
                tmp / f"warm-{abs(hash(name))}")
        results = {name: [] for name in sides}
        for round_ in range(args.repeats):
            for name, tree in sides.items():
                rate, wall = run(tree, flags, tmp / f"{round_}-{abs(hash(name))}")
                results[name].append((rate, wall))
                print(f"round {round_ + 1}: {name:24s} {rate:8.1f} img/s  "
                      f"{wall:6.1f} s wall", flush=True)
    print()
    print(machine.describe())
    print(f"train.py {shlex.join(flags)}; {args.repeats} interleaved rounds")
    baseline, current = list(results)
    for name in results:
        rates = [r for r, _ in results[name]]
        walls = [w for _, w in results[name]]
        print(f"  {name:24s} {statistics.median(rates):8.1f} img/s "
              f"(range {min(rates):.1f} .. {max(rates):.1f}), wall "
              f"{statistics.median(walls):.1f} s")
    ratios = [c[0] / b[0] for b, c in zip(results[baseline],
                                          results[current])]
    print(f"  this checkout / {baseline}: {statistics.median(ratios):.2f} "
          f"(per-round {min(ratios):.2f} .. {max(ratios):.2f})")


if __name__ == "__main__":
    main()
