"""Training throughput and the quick start's wall time and memory.

    python bench/train.py                  # throughput table (about 5 min)
    python bench/train.py --quick_start    # also time `train.py` with defaults

Throughput: images/s of the full distributed training step (forward,
backward, all-reduce, SGD update) of the default model (small_cnn → RingLoss
→ 1000-way softmax, 32×32×1, global batch 256) on synthetic batches, as a
CPU trains by default (no XLA) and with XLA, ring loss on/off, and 1 vs 2
replicas on two logical CPU devices
(one process; the CPU is split before TensorFlow starts). Repetitions of the
configurations are interleaved, so a slow spell of a shared machine hits all
of them; the table gives medians and the ratios of the medians, measured in
this one run.

Loop (--loop): the training loop of train.py (`loop.run_loop`, one
replica, no XLA unless --loop_jit, ring, a prefetched synthetic `tf.data`
input through `distribute_dataset`) at --loop_batch_size (default 64,
where per-step overhead shows), in three forms, interleaved: the
statistics read after every step (what the loop did before it kept them
on the device: one host round trip per step), read at log steps only
(--log_every steps apart) with one step per compiled call, and
--steps_per_loop steps per call.

Quick start: runs `python train.py --lambda_ring=0.01` (all defaults, fresh
data cache and model_dir in a temporary directory) and reports the wall time,
the data generation time and the peak resident memory of the process tree.
"""

import argparse
import os
import pathlib
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2
)

import numpy as np  # noqa: E402

from ring_loss_tf import config as config_lib  # noqa: E402
from ring_loss_tf.models import assembly  # noqa: E402
from ring_loss_tf.training import trainer as trainer_lib  # noqa: E402
from ring_loss_tf.training import distribution  # noqa: E402
from ring_loss_tf.training import loop  # noqa: E402

CONFIGS = {
    # name: (devices, jit, lambda_ring)
    "1 replica, ring": (["/cpu:0"], False, 0.01),
    "1 replica, XLA, ring": (["/cpu:0"], True, 0.01),
    "1 replica, no ring": (["/cpu:0"], False, 0.0),
    "2 replicas, ring": (["/cpu:0", "/cpu:1"], False, 0.01),
}


def _trainer(devices, jit, lambda_ring, batch_size, num_classes):
    # train.py's default model on the embedded set's 32×32 grey images.
    config = config_lib.make(
        num_classes=num_classes,
        lambda_ring=lambda_ring,
        image_size=(32, 32),
        channels=1,
        embedding_dim=128,
        seed=0,
    )
    return trainer_lib.Trainer(
        distribution.build_strategy(devices),
        lambda: assembly.build_models(config),
        global_batch_size=batch_size,
        learning_rate=0.01,
        jit=jit,
    )


def throughput(args):
    rng = np.random.default_rng(0)
    images = tf.constant(
        rng.uniform(-1, 1, (args.batch_size, 32, 32, 1)), tf.float32
    )
    labels = tf.constant(
        rng.integers(0, args.num_classes, args.batch_size), tf.int32
    )
    trainers = {}
    for name, (devices, jit, lambda_ring) in CONFIGS.items():
        trainer = _trainer(
            devices, jit, lambda_ring, args.batch_size, args.num_classes
        )
        trainer.initialize_radius(images)
        for _ in range(2):  # compile and warm up
            trainer.train_step(images, labels)
        trainers[name] = trainer
    rates = {name: [] for name in CONFIGS}
    for _ in range(args.repeats):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                trainer.train_step(images, labels)
            elapsed = time.perf_counter() - start
            rates[name].append(args.steps * args.batch_size / elapsed)
    medians = {name: statistics.median(r) for name, r in rates.items()}
    print(f"Training step throughput, batch {args.batch_size}, "
          f"{args.num_classes} classes, median of {args.repeats} x "
          f"{args.steps} steps:")
    print("| configuration | images/s (median) | min | max |")
    print("|---|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {medians[name]:.0f} | {min(r):.0f} | {max(r):.0f} |")
    base = medians["1 replica, ring"]
    print()
    print("| ratio (images/s) | value |")
    print("|---|---|")
    print(f"| XLA / no XLA | {medians['1 replica, XLA, ring'] / base:.2f} |")
    print(f"| ring on / ring off | "
          f"{base / medians['1 replica, no ring']:.2f} |")
    print(f"| 2 replicas / 1 replica | "
          f"{medians['2 replicas, ring'] / base:.2f} |")


def _loop_rate(trainer, iterator, steps, args, form):
    """images/s of `steps` steps of one form of the loop."""
    start_step = int(trainer.step.numpy())
    start = time.perf_counter()
    if form == "read every step":
        for _ in range(steps):
            stats, _ = trainer.train_step(*next(iterator))
            dict(stats)
    else:
        loop.run_loop(
            trainer, iterator, start_step + steps,
            checkpoint_every=10**9, log_every=args.log_every,
            print_fn=lambda _: None,
            steps_per_loop=1 if form == "read at log" else args.steps_per_loop,
        )
    elapsed = time.perf_counter() - start
    assert int(trainer.step.numpy()) == start_step + steps
    return steps * args.loop_batch_size / elapsed


def loop_throughput(args):
    batch = args.loop_batch_size
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-1, 1, (batch, 32, 32, 1)), tf.float32)
    labels = tf.constant(
        rng.integers(0, args.num_classes, batch), tf.int32
    )
    forms = ("read every step", "read at log",
             f"{args.steps_per_loop} steps per call")
    runs = {}
    for form in forms:
        trainer = _trainer(["/cpu:0"], args.loop_jit, 0.01, batch,
                           args.num_classes)
        trainer.initialize_radius(images)
        dataset = trainer.distribute_dataset(
            lambda _: tf.data.Dataset.from_tensors((images, labels))
            .repeat().prefetch(2)
        )
        iterator = iter(dataset)
        _loop_rate(trainer, iterator, 2 * args.steps_per_loop, args, form)
        runs[form] = (trainer, iterator)
    rates = {form: [] for form in forms}
    for _ in range(args.repeats):
        for form, (trainer, iterator) in runs.items():
            rates[form].append(
                _loop_rate(trainer, iterator, args.loop_steps, args, form)
            )
    medians = {form: statistics.median(r) for form, r in rates.items()}
    print(f"Training loop, batch {batch}, small_cnn 32x32x1, "
          f"{args.num_classes} classes, 1 replica, "
          f"{'jit' if args.loop_jit else 'no jit'}, ring, log every "
          f"{args.log_every}; median of {args.repeats} x {args.loop_steps} "
          "steps:")
    print("| loop | images/s (median) | min | max |")
    print("|---|---|---|---|")
    for form, r in rates.items():
        print(f"| {form} | {medians[form]:.0f} | {min(r):.0f} | "
              f"{max(r):.0f} |")
    base = rates["read every step"]
    for form in forms[1:]:
        ratios = [a / b for a, b in zip(rates[form], base)]
        print(f"{form} / read every step: "
              f"{medians[form] / medians['read every step']:.2f} "
              f"(per-round ratios {min(ratios):.2f} .. {max(ratios):.2f})")


def quick_start():
    with tempfile.TemporaryDirectory() as directory:
        directory = pathlib.Path(directory)
        command = [
            sys.executable, str(REPO / "train.py"), "--lambda_ring=0.01",
            f"--cache_dir={directory / 'cache'}",
            f"--model_dir={directory / 'run'}",
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True,
                                text=True)
        wall = time.perf_counter() - start
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        if result.returncode:
            print(result.stderr[-3000:])
            raise SystemExit("train.py failed")
        settings = list((directory / "cache").glob("kanji-*/settings.json"))
        generation = None
        if settings:
            text = settings[0].read_text()
            found = re.search(r'"generation_seconds": ([\d.]+)', text)
            generation = float(found.group(1)) if found else None
        print("Quick start: python train.py --lambda_ring=0.01 (defaults)")
        print(f"wall time {wall / 60:.1f} min (data generation "
              f"{generation} s), peak memory {peak_kib / 2**20:.2f} GiB")
        print("\n".join(
            line for line in result.stdout.splitlines()
            if line.startswith(("|", "Verification", "step"))
        ))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--quick_start", action="store_true")
    parser.add_argument("--loop", action="store_true",
                        help="also time the training loop's forms")
    parser.add_argument("--loop_batch_size", type=int, default=64)
    parser.add_argument("--loop_steps", type=int, default=50)
    parser.add_argument("--log_every", type=int, default=50)
    parser.add_argument("--steps_per_loop", type=int, default=10)
    parser.add_argument("--loop_jit", action=argparse.BooleanOptionalAction,
                        default=False,
                        help="time the loop compiled with XLA (off: the "
                        "CPU default)")
    parser.add_argument("--skip_throughput", action="store_true")
    args = parser.parse_args()
    if not args.skip_throughput:
        throughput(args)
    if args.loop:
        loop_throughput(args)
    if args.quick_start:
        quick_start()


if __name__ == "__main__":
    main()
