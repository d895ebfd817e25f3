"""The sharded head against the replicated one: memory and step time.

    python bench/sharded_head.py [--classes 10000,100000,1000000]
                                 [--replicas 2] [--embedding_dim 128]
                                 [--batch_size 64] [--steps 3] [--repeats 3]

For each class count, the `Trainer` step of an ArcFace head on a small
backbone (small_cnn on 16×16×1 synthetic images, so the head is
most of the work) over `--replicas` logical CPU devices, with the head
replicated (the default) and sharded (`--head_sharding`, r = 1 and
r = 0.1). Each variant runs in its own process (so its peak RSS is its
own); the variants alternate round after round, each round times `--steps`
steps after two warm-up steps, and a figure is the median of `--repeats`
rounds. Reported per variant: the head's state per replica (kernel and
momentum, as the variables on each device hold them), the process's peak
RSS, ms per step and the ratio to the replicated step of the same round.

Then the same accounting carried to 8 GPUs of one machine, D = 512,
float32, a batch of 128 per GPU, for MS1MV3 (93,431 identities), Glint360K
(360,232) and WebFace42M (2,059,906): per GPU the replicated head holds the
kernel, its momentum, its gradient and its normalised copy (4·D·C floats)
and logits for its 128 rows (2 · 128·C, forward and gradient); the sharded
head holds a C/8 slice of the first four and logits for the whole batch of
1,024 rows on kept columns (2 · 1024 · r · C/8). The wire per step: a ring
all-reduce of the head's gradient sends 2·(N−1)/N · 4·D·C bytes per GPU;
the sharded head all-gathers the features, labels and row maxima
((N−1)/N · 4·(D + 2)·1024) and all-reduces the features' gradient and two
numbers per row (2·(N−1)/N · 4·(D + 2)·1024). At 100 Gb/s.

On the project's 2-core machine (see the README's table for the figures
and the run's time).
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA_SETS = (("MS1MV3", 93_431), ("Glint360K", 360_232),
             ("WebFace42M", 2_059_906))
VARIANTS = (("replicated", False, 1.0), ("sharded", True, 1.0),
            ("sharded r=0.1", True, 0.1))
GPUS, GPU_BATCH, GPU_DIM = 8, 128, 512
WIRE_BYTES_PER_S = 100e9 / 8


def gib(n):
    return n / 2**30


def carried(classes, rate, sharded, gpus=GPUS, batch=GPU_BATCH,
            dim=GPU_DIM):
    """(head bytes per GPU, bytes each GPU sends per step)."""
    if not sharded:
        memory = 4 * (4 * dim * classes + 2 * batch * classes)
        wire = 2 * (gpus - 1) / gpus * 4 * dim * classes
        return memory, wire
    width = classes / gpus
    rows = gpus * batch
    memory = 4 * (4 * dim * width + 2 * rows * rate * width)
    share = (gpus - 1) / gpus  # of a ring all-gather's whole; twice that
    # all-gathers: features, labels, row maxima; all-reduces: the features'
    # gradient, the rows' sums of exp and target logits.
    wire = 4 * share * (dim * rows + 2 * rows + 2 * (dim * rows + 2 * rows))
    return memory, wire


def one_variant(args):
    """Runs in a child: prints {"ms": [...], "rss": bytes, "state": bytes}."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * args.replicas
    )
    from ring_loss_tf import config as config_lib
    from ring_loss_tf.models import assembly
    from ring_loss_tf.training import trainer as trainer_lib
    from ring_loss_tf.training import distribution

    config = config_lib.make(
        num_classes=args.classes, backbone="small_cnn", head="arcface",
        image_size=(16, 16), channels=1, embedding_dim=args.embedding_dim,
        margin_warmup_steps=0, head_sharding=args.sharded,
        head_sample_rate=args.rate, lambda_ring=0.01,
    )
    devices = [f"/cpu:{i}" for i in range(args.replicas)]
    trainer = trainer_lib.Trainer(
        distribution.build_strategy(devices),
        lambda: assembly.build_models(config),
        global_batch_size=args.batch_size, jit=False,
    )
    head = trainer.models.head
    if args.sharded:
        state = max(
            (k.shape.num_elements() + m.shape.num_elements()) * 4
            for k, m in zip(head.kernels, head.momenta)
        )
    else:
        state = 2 * head.kernel.shape.num_elements() * 4
    rng = np.random.default_rng(0)
    images = tf.constant(rng.normal(size=(args.batch_size, 16, 16, 1)),
                         tf.float32)
    labels = tf.constant(rng.integers(0, args.classes, args.batch_size),
                         tf.int32)
    trainer.initialize_radius(images)
    for _ in range(2):
        trainer.train_step(images, labels)
    start = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step(images, labels)
    ms = (time.perf_counter() - start) / args.steps * 1e3
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"ms": ms, "rss": rss, "state": state}))


def run_variant(args, classes, sharded, rate):
    command = [
        sys.executable, __file__, "--child", "--classes", str(classes),
        "--replicas", str(args.replicas), "--embedding_dim",
        str(args.embedding_dim), "--batch_size", str(args.batch_size),
        "--steps", str(args.steps), "--rate", str(rate),
    ] + (["--sharded"] if sharded else [])
    output = subprocess.run(command, check=True, capture_output=True,
                            text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def measure(args):
    print(f"ArcFace head, {args.replicas} logical CPU devices, "
          f"D = {args.embedding_dim}, global batch {args.batch_size}; "
          f"median of {args.repeats} rounds of {args.steps} steps\n")
    print("| classes | head | head state / replica | peak RSS | ms / step "
          "| step vs replicated |")
    print("|---|---|---|---|---|---|")
    for classes in args.classes:
        rounds = {name: [] for name, _, _ in VARIANTS}
        for _ in range(args.repeats):
            for name, sharded, rate in VARIANTS:
                rounds[name].append(run_variant(args, classes, sharded,
                                                rate))
        base = [r["ms"] for r in rounds["replicated"]]
        for name, _, _ in VARIANTS:
            runs = rounds[name]
            ms = statistics.median(r["ms"] for r in runs)
            ratio = statistics.median(
                r["ms"] / b for r, b in zip(runs, base))
            print(f"| {classes:,} | {name} | "
                  f"{runs[0]['state'] / 2**20:,.1f} MiB | "
                  f"{gib(max(r['rss'] for r in runs)):.2f} GiB | "
                  f"{ms:,.0f} | {ratio:.2f} |")


def carried_table():
    print(f"\nCarried to {GPUS} GPUs, D = {GPU_DIM}, {GPU_BATCH} rows per "
          "GPU, float32 (formulas in this script's docstring)\n")
    print("| data set | identities | head | head memory / GPU | sent / GPU "
          "/ step | at 100 Gb/s |")
    print("|---|---|---|---|---|---|")
    for name, classes in DATA_SETS:
        for label, sharded, rate in VARIANTS:
            memory, wire = carried(classes, rate, sharded)
            print(f"| {name} | {classes:,} | {label} | {gib(memory):.2f} GiB"
                  f" | {wire / 2**20:,.1f} MiB | "
                  f"{wire / WIRE_BYTES_PER_S * 1e3:.1f} ms |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="10000,100000,1000000")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--embedding_dim", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rate", type=float, default=1.0)
    parser.add_argument("--sharded", action="store_true")
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--carried_only", action="store_true")
    args = parser.parse_args()
    if args.child:
        args.classes = int(args.classes)
        return one_variant(args)
    args.classes = [int(c) for c in args.classes.split(",")]
    started = time.perf_counter()
    if not args.carried_only:
        measure(args)
    carried_table()
    print(f"\n({(time.perf_counter() - started) / 60:.1f} min)")


if __name__ == "__main__":
    main()
