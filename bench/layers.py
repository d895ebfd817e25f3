"""Training-step cost of Ring loss and of each head (issue: the layers).

    python bench/layers.py [--repeats 7] [--steps 20] [--batch_size 256]

Times one compiled training step (forward, backward, SGD update) of the
default backbone (`small_cnn`, 32x32 grey input, 128-d) with a 1000-way
head, batch 256, with and without `RingLoss`, and with each head instead of
plain softmax. Variants are measured interleaved, round after round, in one
process, so machine drift hits them alike; each round times `--steps` steps
and the figure is the median over `--repeats` rounds. Prints the median
step times and their ratios to the plain-softmax baseline.

Target (the layers issue): Ring loss adds <= 2 % to the step time.
"""

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import ring_loss_tf  # noqa: E402
from ring_loss_tf import backbones  # noqa: E402

NUM_CLASSES = 1000


def build(head, ring):
    backbone = backbones.small_cnn(input_shape=(32, 32, 1), seed=0)
    images = keras.Input((32, 32, 1))
    labels = keras.Input((), dtype="int32")
    embeddings = backbone(images)
    if ring:
        embeddings = ring_loss_tf.RingLoss(0.01, radius_init=10.0)(embeddings)
    if head == "softmax":
        logits = keras.layers.Dense(NUM_CLASSES)(embeddings)
    elif head == "l2softmax":
        logits = keras.layers.Dense(NUM_CLASSES)(
            ring_loss_tf.L2Constrained(20.0)(embeddings)
        )
    elif head == "centerloss":
        embeddings = ring_loss_tf.CenterLoss(NUM_CLASSES, 0.003)(
            [embeddings, labels]
        )
        logits = keras.layers.Dense(NUM_CLASSES)(embeddings)
    else:
        layer = {
            "asoftmax": ring_loss_tf.ASoftmax,
            "cosface": ring_loss_tf.CosFace,
            "arcface": ring_loss_tf.ArcFace,
        }[head](NUM_CLASSES)
        logits = layer([embeddings, labels])
    return keras.Model([images, labels], logits)


def make_step(model, optimizer):
    @tf.function(jit_compile=True)
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model([images, labels], training=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            )
            if model.losses:
                loss += tf.add_n(model.losses)
        variables = model.trainable_variables
        grads = tape.gradient(loss, variables)
        optimizer.apply(grads, variables)
        return loss

    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument(
        "--heads",
        default="softmax,asoftmax,cosface,arcface,l2softmax,centerloss",
    )
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = tf.constant(
        rng.standard_normal((args.batch_size, 32, 32, 1)), tf.float32
    )
    labels = tf.constant(rng.integers(0, NUM_CLASSES, args.batch_size), tf.int32)
    variants = [("softmax", False), ("softmax", True)]
    variants += [(h, False) for h in args.heads.split(",") if h != "softmax"]
    steps = {}
    for head, ring in variants:
        model = build(head, ring)
        step = make_step(model, keras.optimizers.SGD(0.01, momentum=0.9))
        for _ in range(3):  # compile and warm up
            step(images, labels).numpy()
        steps[(head, ring)] = step
    times = {key: [] for key in variants}
    for _ in range(args.repeats):
        for key in variants:
            step = steps[key]
            start = time.perf_counter()
            for _ in range(args.steps):
                loss = step(images, labels)
            loss.numpy()
            times[key].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(times[("softmax", False)])
    print(
        f"batch {args.batch_size}, small_cnn 32x32x1 -> 128-d, "
        f"{NUM_CLASSES} classes, XLA, median of {args.repeats} rounds "
        f"x {args.steps} steps"
    )
    print(f"{'variant':<22}{'ms/step':>10}{'vs softmax':>12}")
    for head, ring in variants:
        median = statistics.median(times[(head, ring)])
        name = head + (" + RingLoss" if ring else "")
        print(f"{name:<22}{median * 1e3:>10.2f}{median / base:>12.3f}")
    # Paired per-round ratios are steadier than a ratio of medians.
    paired = [
        r / s
        for r, s in zip(times[("softmax", True)], times[("softmax", False)])
    ]
    print(
        "RingLoss overhead, median of per-round ratios: "
        f"{(statistics.median(paired) - 1) * 100:+.2f} %"
    )


if __name__ == "__main__":
    main()
