"""Input pipeline throughput against training-step consumption (data issue).

    python bench/input.py [--repeats 5] [--batches 20] [--batch_size 256]
                          [--cache_dir DIR] [--fresh_generation]

Measures, in one process, round after round (so machine drift hits every
variant alike), the median over `--repeats` rounds of:

- kanji pipeline: `pipeline.training_dataset` on the embedded default set
  (`kanji.prepare()` defaults, 32x32 grey, augment="characters"), images/s
  over `--batches` batches of a fresh iterator after 5 warm-up batches,
  in memory (the default for this set) and streaming from the PNGs;
- JPEG pipeline: the same on a folder of 112x96 RGB JPEGs made in a temp dir
  (200 identities x 20), augment="face", output 112x96x3;
- training step: one compiled step (forward, backward, SGD) of the default
  backbone `backbones.small_cnn` (a stand-in if it is missing) with a
  softmax head, on an in-memory batch: 32x32x1 with 1000 classes, and
  112x96x3 with 200 classes;

and prints pipeline / step ratios (target >= 3: input never limits training).
It also times the renderer (ms per image on one core, median of `--repeats`
runs of 200 images) and one generation of the default set with all cores
into a fresh temporary cache when `--fresh_generation` is given (a single
run: about a minute), otherwise reports the generation time recorded in the
cached set's settings.json.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

from ring_loss_tf.data import pipeline  # noqa: E402
from ring_loss_tf.data import kanji  # noqa: E402


def make_jpeg_folder(root, identities=200, per_identity=20, size=(112, 96)):
    """Smooth random colour images, JPEG quality 90, like aligned faces."""
    rng = np.random.default_rng(0)
    for i in range(identities):
        directory = os.path.join(root, f"person_{i:04d}")
        os.makedirs(directory)
        for k in range(per_identity):
            small = rng.integers(0, 256, size=(14, 12, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize(
                (size[1], size[0]), Image.BICUBIC
            )
            image.save(os.path.join(directory, f"{k:04d}.jpg"), quality=90)


def pipeline_rate(dataset, batches, batch_size, warmup=5):
    """Steady-state images/s of a fresh iterator, consumed flat out.

    A fresh iterator per measurement, deleted afterwards, so no prefetch
    buffer filled during another measurement inflates the figure and no
    background reading slows the training-step measurement.
    """
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        images, _ = next(iterator)
    images.numpy()
    rate = batches * batch_size / (time.perf_counter() - start)
    del iterator
    return rate


def build_step(input_shape, num_classes, batch_size):
    try:
        from ring_loss_tf.models import backbones

        backbone = backbones.small_cnn(input_shape=input_shape, seed=0)
        name = "backbones.small_cnn"
    except (ImportError, AttributeError):
        inputs = keras.Input(input_shape)
        x = inputs
        for filters in (16, 32, 64):
            x = keras.layers.Conv2D(filters, 3, 2, padding="same")(x)
            x = keras.layers.PReLU(shared_axes=[1, 2])(x)
            x = keras.layers.Conv2D(filters, 3, 1, padding="same")(x)
            x = keras.layers.PReLU(shared_axes=[1, 2])(x)
        x = keras.layers.Dense(128)(keras.layers.Flatten()(x))
        backbone = keras.Model(inputs, x)
        name = "stand-in small CNN"
    head = keras.layers.Dense(num_classes, use_bias=False)
    head.build((None, backbone.output_shape[-1]))
    variables = backbone.trainable_variables + head.trainable_variables
    optimizer = keras.optimizers.SGD(0.01, momentum=0.9)
    optimizer.build(variables)

    @tf.function(jit_compile=True)
    def gradients(images, labels):
        with tf.GradientTape() as tape:
            logits = head(backbone(images, training=True))
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            )
        return tape.gradient(loss, variables)

    @tf.function
    def step(images, labels):
        optimizer.apply_gradients(zip(gradients(images, labels), variables))

    rng = np.random.default_rng(0)
    images = tf.constant(
        rng.normal(size=(batch_size,) + input_shape).astype(np.float32)
    )
    labels = tf.constant(rng.integers(0, num_classes, batch_size), tf.int32)
    step(images, labels)  # compile

    def rate(steps):
        start = time.perf_counter()
        for _ in range(steps):
            step(images, labels)
        variables[0].numpy()
        return steps * batch_size / (time.perf_counter() - start)

    return rate, name


def render_ms(repeats, count=200):
    codepoints = list(kanji.character_files())[:count]
    for c in codepoints:  # parse the SVGs outside the timing
        kanji._strokes_of(c)
    times = []
    for r in range(repeats):
        start = time.perf_counter()
        for c in codepoints:
            kanji.encode_png(kanji.render_sample(
                c, seed=r, split="train", sample=0, image_size=32
            ))
        times.append((time.perf_counter() - start) / count * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--cache_dir", default=None)
    parser.add_argument("--fresh_generation", action="store_true")
    args = parser.parse_args()
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, "
          f"batch {args.batch_size}, {args.repeats} rounds", flush=True)

    print(f"renderer: {render_ms(args.repeats):.2f} ms/image on one core "
          "(median)", flush=True)
    if args.fresh_generation:
        with tempfile.TemporaryDirectory() as cache:
            start = time.perf_counter()
            root = kanji.prepare(cache_dir=cache, progress=False)
            seconds = time.perf_counter() - start
            count = sum(len(f) for _, _, f in os.walk(root / "train")) + sum(
                len(f) for _, _, f in os.walk(root / "test"))
        print(f"generation of the default set ({count} images, all cores, "
              f"one run): {seconds:.1f} s", flush=True)
    root = kanji.prepare(cache_dir=args.cache_dir)
    settings = json.loads((root / "settings.json").read_text())
    print(f"default set: {root} (recorded generation time "
          f"{settings['generation_seconds']} s with "
          f"{settings['num_workers']} workers)", flush=True)

    kanji_source = pipeline.open_training_source(root / "train")
    start = time.perf_counter()
    kanji_dataset = pipeline.training_dataset(
        kanji_source, batch_size=args.batch_size, image_size=(32, 32),
        channels=1, augment="characters", seed=0,
    )  # in memory by default: 41 MB decoded
    print(f"kanji pipeline built (decoded into memory) in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    kanji_stream = pipeline.training_dataset(
        kanji_source, batch_size=args.batch_size, image_size=(32, 32),
        channels=1, augment="characters", seed=0, in_memory=False,
    )
    with tempfile.TemporaryDirectory() as folder:
        make_jpeg_folder(folder)
        jpeg_source = pipeline.open_training_source(folder)
        jpeg_dataset = pipeline.training_dataset(
            jpeg_source, batch_size=args.batch_size, image_size=(112, 96),
            channels=3, augment="face", seed=0,
        )
        step_small, name = build_step((32, 32, 1), 1000, args.batch_size)
        step_face, _ = build_step((112, 96, 3), 200, args.batch_size)
        rates = {k: [] for k in ("kanji", "kanji_stream", "jpeg", "step32",
                                 "step112")}
        for r in range(args.repeats):
            rates["kanji"].append(
                pipeline_rate(kanji_dataset, args.batches, args.batch_size))
            rates["kanji_stream"].append(
                pipeline_rate(kanji_stream, args.batches, args.batch_size))
            rates["step32"].append(step_small(args.steps))
            rates["jpeg"].append(
                pipeline_rate(jpeg_dataset, args.batches, args.batch_size))
            rates["step112"].append(step_face(args.steps))
            print(f"round {r + 1}: " + ", ".join(
                f"{k} {v[-1]:.0f}" for k, v in rates.items()), flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    print(f"\nmedians over {args.repeats} rounds (images/s):")
    print(f"  kanji pipeline (in memory, default)    {median['kanji']:9.0f}")
    print(f"  kanji pipeline (streaming from PNGs)   "
          f"{median['kanji_stream']:9.0f}")
    print(f"  {name} step, 32x32x1, 1000 classes {median['step32']:9.0f}")
    print(f"  ratio in-memory pipeline / step        "
          f"{median['kanji'] / median['step32']:9.1f}x  (target >= 3x)")
    print(f"  ratio streaming pipeline / step        "
          f"{median['kanji_stream'] / median['step32']:9.1f}x")
    print(f"  JPEG pipeline, 112x96x3, face          {median['jpeg']:9.0f}")
    print(f"  {name} step, 112x96x3, 200 classes {median['step112']:9.0f}")
    print(f"  ratio pipeline / step                  "
          f"{median['jpeg'] / median['step112']:9.1f}x  (target >= 3x)")


if __name__ == "__main__":
    main()
