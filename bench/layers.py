"""Training-step cost of Ring loss and of each head, on each Keras backend.

    python bench/layers.py [--backends tensorflow,jax,torch] [--repeats 7]
                           [--steps 20] [--batch_size 256] [--heads ...]

Times one training step (forward, backward, SGD update) of the default
backbone (`small_cnn`, 32x32 grey input, 128-d) with a 1000-way head, batch
256, with and without `RingLoss`, and with each head instead of plain
softmax. Each backend runs in its own process (Keras picks its backend at
import) with the step its users write:

- tensorflow: `tf.function(jit_compile=True)` around tape + `apply` (XLA);
- jax: `jax.jit` around `stateless_call`, `jax.value_and_grad` and
  `optimizer.stateless_apply`, the state carried from step to step;
- torch: eager forward, `loss.backward()`, `optimizer.apply`.

Variants are measured interleaved, round after round, in one process, so
machine drift hits them alike; each round times `--steps` steps and the
figure is the median over `--repeats` rounds. Prints the median step times,
their ratios to the plain-softmax baseline, and the RingLoss overhead as the
median of per-round paired ratios (steadier on a noisy machine).

Target (the layers issue): Ring loss adds <= 2 % to the step time.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
NUM_CLASSES = 1000
HEADS = "softmax,asoftmax,cosface,arcface,l2softmax,centerloss"


def build(head, ring):
    import keras

    import ring_loss_tf
    from ring_loss_tf.models import backbones

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


def _cross_entropy(labels, logits):
    import keras
    from keras import ops

    return ops.mean(
        keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True
        )
    )


def make_tensorflow_step(model, optimizer):
    import tensorflow as tf

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

    return lambda images, labels: step(images, labels).numpy()


def make_jax_step(model, optimizer):
    import jax

    optimizer.build(model.trainable_variables)

    def compute_loss(trainable, non_trainable, images, labels):
        logits, non_trainable, losses = model.stateless_call(
            trainable, non_trainable, [images, labels], training=True,
            return_losses=True,
        )
        loss = _cross_entropy(labels, logits)
        for extra in losses:
            loss = loss + extra
        return loss, non_trainable

    grad_fn = jax.value_and_grad(compute_loss, has_aux=True)

    @jax.jit
    def step(state, images, labels):
        trainable, non_trainable, optimizer_state = state
        (loss, non_trainable), grads = grad_fn(
            trainable, non_trainable, images, labels
        )
        trainable, optimizer_state = optimizer.stateless_apply(
            optimizer_state, grads, trainable
        )
        return loss, (trainable, non_trainable, optimizer_state)

    state = [
        (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
            [v.value for v in optimizer.variables],
        )
    ]

    def run(images, labels):
        loss, state[0] = step(state[0], images, labels)
        return jax.block_until_ready(loss)

    return run


def make_torch_step(model, optimizer):
    import torch

    def run(images, labels):
        model.zero_grad()
        logits = model([images, labels], training=True)
        loss = _cross_entropy(labels, logits)
        for extra in model.losses:
            loss = loss + extra
        loss.backward()
        variables = model.trainable_variables
        grads = [v.value.grad for v in variables]
        with torch.no_grad():
            optimizer.apply(grads, variables)
        return loss.item()

    return run


def measure(args):
    """Runs in the child process whose KERAS_BACKEND is set."""
    import keras
    import numpy as np

    backend = keras.backend.backend()
    make_step = {
        "tensorflow": make_tensorflow_step,
        "jax": make_jax_step,
        "torch": make_torch_step,
    }[backend]
    rng = np.random.default_rng(0)
    images = keras.ops.convert_to_tensor(
        rng.standard_normal((args.batch_size, 32, 32, 1)).astype("float32")
    )
    labels = keras.ops.convert_to_tensor(
        rng.integers(0, NUM_CLASSES, args.batch_size).astype("int32")
    )
    variants = [("softmax", False), ("softmax", True)]
    variants += [(h, False) for h in args.heads.split(",") if h != "softmax"]
    steps = {}
    for head, ring in variants:
        model = build(head, ring)
        step = make_step(model, keras.optimizers.SGD(0.01, momentum=0.9))
        for _ in range(3):  # compile and warm up
            step(images, labels)
        steps[(head, ring)] = step
    times = {f"{h}{' + RingLoss' if r else ''}": [] for h, r in variants}
    for _ in range(args.repeats):
        for (head, ring), name in zip(variants, times):
            step = steps[(head, ring)]
            start = time.perf_counter()
            for _ in range(args.steps):
                step(images, labels)
            times[name].append((time.perf_counter() - start) / args.steps)
    return times


def report(backend, times, args):
    label = {"tensorflow": "tensorflow (XLA)"}.get(backend, backend)
    base = statistics.median(times["softmax"])
    print(
        f"\n{label}: batch {args.batch_size}, small_cnn 32x32x1 -> 128-d, "
        f"{NUM_CLASSES} classes, median of {args.repeats} rounds "
        f"x {args.steps} steps"
    )
    print(f"{'variant':<22}{'ms/step':>10}{'vs softmax':>12}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<22}{median * 1e3:>10.2f}{median / base:>12.3f}")
    paired = [
        r / s for r, s in zip(times["softmax + RingLoss"], times["softmax"])
    ]
    overhead = (statistics.median(paired) - 1) * 100
    print(
        f"RingLoss overhead ({label}), median of per-round ratios: "
        f"{overhead:+.2f} % (range {(min(paired) - 1) * 100:+.1f} .. "
        f"{(max(paired) - 1) * 100:+.1f} %)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="tensorflow,jax,torch")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--heads", default=HEADS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (medians of >= 5 rounds)")
    if args.child:
        sys.path.insert(0, ROOT)
        print(json.dumps(measure(args)))
        return
    for backend in args.backends.split(","):
        if backend not in ("tensorflow", "jax", "torch"):
            parser.error(
                f"--backends: unknown backend {backend!r} (choose from "
                "tensorflow, jax, torch)"
            )
        env = dict(os.environ, KERAS_BACKEND=backend)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        child = [sys.executable, os.path.abspath(__file__), "--child"]
        child += [
            f"--repeats={args.repeats}",
            f"--steps={args.steps}",
            f"--batch_size={args.batch_size}",
            f"--heads={args.heads}",
        ]
        result = subprocess.run(
            child, env=env, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            print(f"\n{backend}: failed\n{result.stderr[-2000:]}")
            continue
        times = json.loads(result.stdout.strip().splitlines()[-1])
        report(backend, times, args)


if __name__ == "__main__":
    main()
