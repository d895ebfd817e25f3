"""Backbones: parameters, multiply-adds and training speed on this machine.

    python bench/backbones.py [--backbones iresnet18,mobilefacenet]
                              [--batch_size 8] [--steps 3] [--repeats 5]

For each registered backbone (`registry.BACKBONES`) at its function's
default input and embedding size (small_cnn 32×32×1 → 128; sphereface*
112×96×3 → 512; iresnet*, mobilefacenet 112×112×3 → 512): the trainable
parameters (insightface's count adds the 512 frozen scales of iResNet's last
BatchNorm), the multiply-adds of its convs and dense layers
(`backbones.multiply_adds`, the figure arcface_torch's README calls FLOPs),
and images/s of a forward + backward pass in training mode (gradients of
the summed squared embeddings with respect to every trainable weight, no
update), eagerly compiled (`tf.function`) and with XLA. The two variants of
a backbone alternate round after round; each round times `--steps` steps
after a warm-up call, and the figure is the median of `--repeats` rounds.

Then MobileFaceNet's grouped conv (3×3, 128 channels in 64 groups, 56×56,
batch `--batch_size`) as `keras.layers.Conv2D(groups=64)` and as
`layers.GroupedConv2D`: milliseconds per forward + backward, median of
`--repeats` rounds of one step (the grouped kernel takes seconds).

On the project's 2-core machine (9 min): iresnet18 / 50 / 100 train at
8.3 / 4.3 / 2.4 images/s with XLA and 10.8 / 5.5 / 3.1 without,
mobilefacenet at 5.2 and 17.0 (XLA's CPU depthwise convs are slow); the
grouped conv takes 13 s as Conv2D, 49 ms as GroupedConv2D.
"""

import argparse
import math
import os
import pathlib
import statistics
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from ring_loss_tf.models import backbones  # noqa: E402
from ring_loss_tf import layers  # noqa: E402
from ring_loss_tf import registry  # noqa: E402


def training_pass(model, jit):
    """A compiled forward + backward of `model` in training mode."""

    @tf.function(jit_compile=jit)
    def run(images):
        with tf.GradientTape() as tape:
            embeddings = model(images, training=True)
            loss = tf.reduce_sum(tf.square(tf.cast(embeddings, tf.float32)))
        return tape.gradient(loss, model.trainable_weights)

    return run


def seconds_per_step(function, inputs, steps):
    started = time.perf_counter()
    for _ in range(steps):
        outputs = function(inputs)
    np.asarray(outputs[0])  # wait for the last step
    return (time.perf_counter() - started) / steps


def interleaved(functions, inputs, steps, repeats):
    """Median seconds per step of each function, timed round after round."""
    for function in functions.values():
        function(inputs)  # trace and compile
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(seconds_per_step(function, inputs, steps))
    return {name: statistics.median(t) for name, t in times.items()}


def backbone_table(names, batch_size, steps, repeats):
    print(f"{'backbone':<14}{'input':>12}{'parameters':>13}"
          f"{'GMACs':>8}{'img/s XLA':>11}{'img/s no XLA':>14}")
    for name in names:
        model = registry.load(registry.BACKBONES[name])(seed=0)
        shape = model.input_shape[1:]
        images = tf.random.stateless_normal((batch_size, *shape), (0, 1))
        medians = interleaved(
            {jit: training_pass(model, jit) for jit in (True, False)},
            images, steps, repeats,
        )
        parameters = sum(math.prod(w.shape) for w in model.trainable_weights)
        print(
            f"{name:<14}{'×'.join(map(str, shape)):>12}{parameters:>13,}"
            f"{backbones.multiply_adds(model) / 1e9:>8.3f}"
            f"{batch_size / medians[True]:>11.1f}"
            f"{batch_size / medians[False]:>14.1f}",
            flush=True,
        )


def grouped_conv_table(batch_size, repeats):
    images = tf.random.stateless_normal((batch_size, 56, 56, 128), (0, 2))
    reference = keras.layers.Conv2D(
        128, 3, padding="same", groups=64, use_bias=False
    )
    grouped = layers.GroupedConv2D(
        128, 3, padding="same", groups=64, use_bias=False
    )
    reference.build(images.shape)
    grouped.build(images.shape)
    grouped.set_weights(reference.get_weights())
    np.testing.assert_allclose(
        grouped(images).numpy(), reference(images).numpy(), atol=1e-4
    )
    functions = {}
    for name, layer in (("Conv2D(groups=64)", reference),
                        ("GroupedConv2D", grouped)):
        for jit in (False, True):
            functions[f"{name}, {'XLA' if jit else 'no XLA'}"] = (
                training_pass(keras.Sequential([layer]), jit)
            )
    medians = interleaved(functions, images, 1, repeats)
    print(f"\n3×3 conv, 128 channels in 64 groups, 56×56, batch "
          f"{batch_size}: forward + backward, median of {repeats} rounds")
    for name, seconds in medians.items():
        print(f"  {name:<28}{seconds * 1e3:>10.0f} ms")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default=",".join(registry.BACKBONES),
                        help="comma-separated registry names")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_grouped_conv", action="store_true",
                        help="leave out the grouped-conv comparison")
    args = parser.parse_args()
    names = [n.strip() for n in args.backbones.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry.BACKBONES]
    if unknown:
        parser.error(f"--backbones: unknown {unknown}; use some of "
                     f"{list(registry.BACKBONES)}")
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (medians of >= 5 rounds)")
    print(f"Forward + backward, batch {args.batch_size}, median of "
          f"{args.repeats} rounds of {args.steps} steps")
    backbone_table(names, args.batch_size, args.steps, args.repeats)
    if not args.no_grouped_conv:
        grouped_conv_table(args.batch_size, args.repeats)


if __name__ == "__main__":
    main()
