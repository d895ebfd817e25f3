"""Runs every benchmark in bench/ and prints their figures in one report.

    python bench/all.py    # quick settings, 4 min + ~6 for peer, ~4 sharded
    python bench/all.py --full                   # each script's defaults
    python bench/all.py --only layers,eval --markdown bench_results/perf.md
    python bench/all.py --reproduce_dir bench_results/reproduce

Each benchmark runs in its own process (`sys.executable bench/<name>.py`,
Keras picks its backend at import, and bench/train.py splits the CPU before
TensorFlow starts), one after the other so they never compete for the
cores. Quick settings keep ≥ 5 repetitions (every figure stays a median of
≥ 5 runs) but time fewer steps / smaller problems:

    layers  --backends tensorflow --heads softmax,arcface --steps 5
    input   --batches 5 --steps 3
    train   --steps 3 --loop --loop_steps 20
    eval    --num_probes 2000 --num_distractors 50000
    worker_input  --steps 10 --train_steps 3 --decode_batches 5
    backbones  --backbones small_cnn,iresnet18,mobilefacenet --steps 1
               --no_grouped_conv
    peer    --networks small_cnn,sphereface20 --heads softmax --steps 2
    sharded_head  --classes 10000

so its figures are noisier than those of `--full` (each script's defaults;
bench/eval.py's 10,000 x 1,000,000 identification, estimated at 15-20 min
a repetition here, is not run).
The report is each script's own output (its
tables, medians and ratios) under a heading with the command and wall time;
--markdown writes the same report as markdown (the README's performance
section is `python bench/all.py --markdown perf.md`, pasted as it is).
--reproduce_dir appends the tables of a finished bench/reproduce.py study
(its table.md; the study itself takes up to an hour and is not rerun here).
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import time

BENCH = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import machine  # noqa: E402
ORDER = ("release", "layers", "input", "train", "eval", "recordio_index",
         "worker_input", "backbones", "peer", "sharded_head")
QUICK = {
    "release": ["--repeats", "3"],
    "layers": ["--backends", "tensorflow", "--heads", "softmax,arcface",
               "--steps", "5", "--repeats", "5"],
    "input": ["--batches", "5", "--steps", "3", "--repeats", "5"],
    "train": ["--steps", "3", "--repeats", "5", "--loop", "--loop_steps",
              "20"],
    "eval": ["--num_probes", "2000", "--num_distractors", "50000",
             "--repeats", "5"],
    "recordio_index": ["--records", "1000000", "--repeats", "5"],
    "worker_input": ["--steps", "10", "--train_steps", "3",
                     "--decode_batches", "5", "--repeats", "5"],
    "backbones": ["--backbones", "small_cnn,iresnet18,mobilefacenet",
                  "--steps", "1", "--repeats", "5", "--no_grouped_conv"],
    "peer": ["--networks", "small_cnn,sphereface20", "--heads", "softmax",
             "--steps", "2", "--repeats", "5"],
    "sharded_head": ["--classes", "10000", "--repeats", "5"],
}
WHAT = {
    "release": "train.py against the last release (regression guard)",
    "layers": "Ring loss and head cost per training step",
    "input": "input pipeline vs training step",
    "train": "training throughput (XLA, ring, replicas)",
    "eval": "verification, identification and embedding speed",
    "recordio_index": "RecordIO index memory and time to open",
    "worker_input": "per-worker input: images decoded per worker and step",
    "backbones": "backbones: parameters, multiply-adds, training speed",
    "peer": "against PyTorch: the same training step, side by side",
    "sharded_head": "sharded head (Partial FC) vs replicated: memory, step",
}


def run(name: str, extra: list[str], timeout: float) -> dict:
    """Runs bench/<name>.py; returns command, seconds, output, returncode."""
    command = [sys.executable, str(BENCH / f"{name}.py"), *extra]
    print(f"== {name}: {' '.join(command[1:])}", flush=True)
    started = time.monotonic()
    try:
        done = subprocess.run(
            command,
            cwd=BENCH.parent,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            timeout=timeout,
        )
        output, code = done.stdout, done.returncode
        if code:
            output += "\n" + "\n".join(done.stderr.splitlines()[-15:])
    except subprocess.TimeoutExpired as error:
        output = (error.stdout or b"")
        output = output.decode() if isinstance(output, bytes) else output
        output += f"\n(stopped after the {timeout:.0f} s timeout)"
        code = "timeout"
    seconds = time.monotonic() - started
    print(output.rstrip(), flush=True)
    print(f"== {name}: {seconds:.0f} s, exit {code}\n", flush=True)
    return {
        "name": name,
        "command": "python " + " ".join(
            str(pathlib.Path(c).relative_to(BENCH.parent))
            if c.startswith(str(BENCH)) else c
            for c in command[1:]
        ),
        "seconds": seconds,
        "output": output.rstrip(),
        "returncode": code,
    }


def markdown(results: list[dict], reproduce: str | None, quick: bool) -> str:
    lines = [
        "## Performance",
        "",
        "Generated by `python bench/all.py"
        + ("" if quick else " --full")
        + f"` on this machine ({machine.describe()}): absolute times "
        "are upper bounds; compare the ratios, measured within one run as "
        "medians of several rounds.",
        "",
    ]
    for r in results:
        status = "" if r["returncode"] == 0 else f" (exit {r['returncode']})"
        lines += [
            f"### {WHAT[r['name']]}{status}",
            "",
            f"`{r['command']}` ({r['seconds'] / 60:.1f} min):",
            "",
            "```",
            r["output"],
            "```",
            "",
        ]
    if reproduce:
        lines += ["### The paper's comparisons (bench/reproduce.py)", "",
                  reproduce, ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(ORDER),
                        help=f"comma-separated subset of {', '.join(ORDER)}")
    parser.add_argument("--full", action="store_true",
                        help="each benchmark's default (slower) settings")
    parser.add_argument("--markdown", default=None,
                        help="also write the report as markdown here")
    parser.add_argument("--reproduce_dir", default=None,
                        help="a bench/reproduce.py output dir to include")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds per benchmark")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        parser.error(f"--only: unknown {unknown}; use some of {list(ORDER)}")
    reproduce = None
    if args.reproduce_dir:
        table = pathlib.Path(args.reproduce_dir) / "table.md"
        if not table.is_file():
            parser.error(
                f"--reproduce_dir: {table} not found; run "
                "bench/reproduce.py --output_dir there first"
            )
        reproduce = table.read_text().rstrip()
    started = time.monotonic()
    results = [
        run(n, [] if args.full else QUICK[n], args.timeout)
        for n in ORDER if n in names
    ]
    print("=" * 72)
    print(machine.describe())
    print(f"Summary ({(time.monotonic() - started) / 60:.1f} min):")
    for r in results:
        print(f"  {r['name']:<7} exit {r['returncode']}, "
              f"{r['seconds']:.0f} s: {r['command']}")
    if reproduce:
        print("\n" + reproduce)
    if args.markdown:
        path = pathlib.Path(args.markdown)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown(results, reproduce, not args.full) + "\n")
        print(f"Wrote {path}")
    failed = [r["name"] for r in results if r["returncode"] != 0]
    if failed:
        sys.exit(f"Failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
