"""The training input pipeline: sources, order, decoding, batches.

Training data comes as a folder per identity (`root/<identity>/*.jpg`, the
layout of CASIA-WebFace and of aligned face sets, and of the embedded default
set `ring_loss_tf.data.kanji`), as insightface's MXNet RecordIO `train.rec` +
`train.idx` (MS1M, Glint360K, WebFace), read without MXNet, or as TFRecord
shards of tf.train.Example (`open_training_source`; the sources are in
`ring_loss_tf.data.sources`). `training_dataset` makes the tf.data pipeline:

    position c = 0, 1, 2, ...  (this worker's share when sharded)
    example    = shuffled_index(c): permutation of epoch c div n at c mod n
    image      = read -> check -> decode -> channels -> resize (in parallel;
                 small folder sets: once, into memory, then gathered)
    batch(drop_remainder)
    images     = augment_batch(images, stateless seed (seed, first c))
    images     = (images - 127.5) / 128
    prefetch, AUTOTUNE everywhere

Every random choice is a stateless function of the seed and the position,
so the order is reproducible, sharding splits one global order, and the
iterator is checkpointable (its state is little more than the position).

`load_images` reads image files into a uint8 array with the same ops: the
in-memory path of the pipeline and evaluation use it, so both see the same
pixels. The image ops themselves are in `ring_loss_tf.data.images`; the
evaluation formats (LFW pairs, insightface `.bin`, identification folders)
in `ring_loss_tf.data.eval_sets`.

Over 600 lines: the folder and RecordIO sources, the order, the
decoding checks and the in-memory path are one pipeline; splitting them
would scatter the one guarantee they keep together (every worker sees the
same global batches, and a resumed run the same positions).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import numpy as np
import tensorflow as tf

from ring_loss_tf.data import sources
# By name: `images` is the usual name of a batch here.
from ring_loss_tf.data.images import AUGMENTATIONS
from ring_loss_tf.data.images import CORRUPT_IMAGE_FIX  # noqa: F401
from ring_loss_tf.data.images import IMAGE_EXTENSIONS  # noqa: F401
from ring_loss_tf.data.images import MAX_IMAGE_PIXELS
from ring_loss_tf.data.images import augment_batch
from ring_loss_tf.data.images import check_size
from ring_loss_tf.data.images import decode_image
from ring_loss_tf.data.images import decode_native  # noqa: F401
from ring_loss_tf.data.images import image_bytes_ok  # noqa: F401
from ring_loss_tf.data.images import is_image_file  # noqa: F401
from ring_loss_tf.data.images import normalize
from ring_loss_tf.data.images import resize_image
# Readers and checks of the sources and of image lists, named here too
# (`ring_loss_tf.data.training_dataset`'s neighbours before 0.3).
from ring_loss_tf.data.images import load_encoded_images  # noqa: F401
from ring_loss_tf.data.images import load_images  # noqa: F401
from ring_loss_tf.data.sources import find_corrupt_examples  # noqa: F401
from ring_loss_tf.data.sources import find_corrupt_images  # noqa: F401
from ring_loss_tf.data.sources import find_corrupt_records  # noqa: F401
from ring_loss_tf.data.sources import list_image_folder  # noqa: F401

# `training_dataset` keeps a folder set's decoded images in memory up to this.
IN_MEMORY_LIMIT_BYTES = 256 * 2**20


DataWarning = sources.DataWarning

# --------------------------------------------------------------------------
# Folders of images


# --------------------------------------------------------------------------
# Training sources


# The sources themselves (folder, RecordIO, TFRecord) are in
# `ring_loss_tf.data.sources`; this is their common type.
TrainingSource = sources.Source


def open_training_source(
    path: str | os.PathLike,
    *,
    skip_corrupt: bool = False,
    options: sources.Options | None = None,
) -> TrainingSource:
    """Opens a folder per identity, a `train.rec`, a dir with train.rec, or
    a dir of TFRecord shards (`ring_loss_tf.data.sources.FORMATS`).

    Args:
        path: `root/<identity>/*.jpg`; or a `.rec` file with its `.idx`
            beside it; or a directory holding `train.rec` (as insightface
            distributes MS1M, Glint360K, WebFace); or a directory holding
            `train-*.tfrecord` shards (or a `train/` of `*.tfrecord`).
        skip_corrupt: decode every image (file, or record) once now and
            leave out those that fail (a record that cannot even be read
            too), counted in one warning. Without it a corrupt or
            truncated image stops training with an error naming the file
            or the record.
        options: the TFRecord keys and index directory; its
            `skip_corrupt` is overridden by the argument when that is True.

    RecordIO labels are each image record's own label; the class count comes
    from insightface's header record 0 when present (each label is then
    checked against it as its record is read), otherwise from reading and
    checking every record's header once (a warning says if some classes
    below the largest label have no image). TFRecord labels and the class
    count (the largest label + 1) come from the shards' index.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise sources.missing_dir_error(path)
    options = options or sources.Options()
    if skip_corrupt:
        options = dataclasses.replace(options, skip_corrupt=True)
    return sources.open_source(path, options)


def training_dataset(
    source: TrainingSource,
    *,
    batch_size: int,
    image_size: tuple[int, int],
    channels: int,
    augment: str,
    seed: int,
    input_context: tf.distribute.InputContext | None = None,
    start_step: int = 0,
    repeat: bool = True,
    in_memory: bool | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> tf.data.Dataset:
    """The training input pipeline.

    Yields `(images, labels)`: float32 (b, h, w, channels) scaled by
    (x - 127.5) / 128, and int32 (b,). Global batch s holds stream positions
    s·B .. s·B + B - 1 (B = `batch_size`); each epoch visits every example
    once in an order drawn from `seed` and the epoch number
    (`shuffled_index`); augmentation draws from `seed` and s·B, for the whole
    global batch. Batches are whole (drop_remainder).

    Without `input_context` each element is a global batch (b = B). With
    it (from `strategy.distribute_datasets_from_function`), pipeline k of K
    serves M = replicas / K replicas, which hold rows k·M·b .. (k+1)·M·b - 1
    of every global batch (b = B / replicas): the pipeline yields, per step,
    M batches of b rows, in replica order, and reads and decodes only those
    rows, with the very pixels and draws one device would give them. K
    workers thus decode B / K images per step each, and N replicas see
    exactly the one-device batch.

    The stream is a pure function of the step: to resume, build the
    pipeline again with `start_step` (no iterator state to save).

    Args:
        source: from `open_training_source`.
        batch_size: B, the global batch.
        image_size: (height, width) the images are resized to.
        channels: 1 (grey) or 3 (RGB).
        augment: "face", "characters" or "none" (see `augment_batch`).
        seed: the order and augmentation seed.
        input_context: from `strategy.distribute_datasets_from_function`.
        start_step: the global batch to start from.
        repeat: loop over epochs forever (True) or stop after the first
            epoch's whole global batches.
        in_memory: decode a folder source once into memory (uint8, with
            the same ops) and gather batches from it, giving the very same
            batches as streaming, much faster. Default: when the decoded
            images fit in `IN_MEMORY_LIMIT_BYTES` (the default KanjiVG set
            takes 41 MB); a corrupt file then fails here, naming it.
        max_pixels: an image whose header says more pixels (width x
            height) fails, naming the file, before it is decoded (None: no
            budget).
    """
    height, width = check_size(image_size, channels)
    if augment not in AUGMENTATIONS:
        raise ValueError(
            f"`augment` must be one of {AUGMENTATIONS}. "
            f"Received: augment={augment!r}"
        )
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(
            f"`batch_size` must be a positive integer. "
            f"Received: batch_size={batch_size!r}"
        )
    num = source.num_examples
    pipeline, pipelines, replicas = 0, 1, 1
    if input_context is not None:
        pipeline = input_context.input_pipeline_id
        pipelines = input_context.num_input_pipelines
        replicas = input_context.num_replicas_in_sync
    if batch_size % replicas or replicas % pipelines:
        raise ValueError(
            f"`batch_size` {batch_size} must split evenly over "
            f"{replicas} replica(s) in {pipelines} input pipeline(s)."
        )
    per_replica = batch_size // replicas
    local_rows = per_replica * (replicas // pipelines)
    steps = num // batch_size
    if not repeat and steps <= start_step:
        raise ValueError(
            f"One epoch of {num} images has no whole batch of {batch_size} "
            f"from step {start_step}; lower `batch_size`."
        )
    # The pipeline's j-th batch holds rows (j mod M)·b .. + b - 1 of this
    # pipeline's share of global batch start_step + j div M (M replicas
    # here, b rows each); that is, local row c = j·b + i is row
    # k·L + c mod L of global batch start_step + c div L (L = M·b).
    # Positions are made a batch at a time: a per-row tf.data map costs
    # more than the whole in-memory pipeline does.
    replicas_here = replicas // pipelines
    first_row = pipeline * local_rows
    batches = tf.data.Dataset.counter() if repeat else tf.data.Dataset.range(
        (steps - start_step) * replicas_here
    )

    def batch_positions(j):
        global_step = start_step + j // replicas_here
        first = (
            global_step * batch_size + first_row
            + (j % replicas_here) * per_replica
        )
        return first + tf.range(per_replica, dtype=tf.int64)

    seed_tensor = tf.constant(int(seed), tf.int64)
    preloadable = source.preloadable
    if in_memory is None:
        size = num * height * width * channels
        in_memory = preloadable and size <= IN_MEMORY_LIMIT_BYTES
    if in_memory and not preloadable:
        raise ValueError(
            "`in_memory=True` needs a folder source; RecordIO and TFRecord "
            f"sets stream. Received: a {source.kind} source"
        )

    def finish(images, labels, positions):
        # Augmentation is vectorised over the batch (a few ops per batch,
        # not per image), seeded by the global batch's first position.
        row = positions[0] % batch_size
        batch_seed = tf.stack([seed_tensor, positions[0] - row])
        images = augment_batch(
            images, batch_seed, augment, rows=(row, batch_size)
        )
        return normalize(images), labels

    if in_memory:
        # Decoded once with the same ops; a batch is then one gather.
        pixels = tf.constant(
            source.preload((height, width), channels, max_pixels)
        )
        labels = tf.constant(source.labels, tf.int32)

        def gather(j):
            rows = batch_positions(j)
            index = shuffled_index(rows, seed_tensor, num)
            images = tf.cast(tf.gather(pixels, index), tf.float32)
            return finish(images, tf.gather(labels, index), rows)

        dataset = batches.map(
            gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    else:
        load = source.loader()
        expect = source.expect

        def element(position):
            index = shuffled_index(position, seed_tensor, num)
            (contents, name), label = load(index)
            image = decode_image(contents, channels, name, expect, max_pixels)
            return resize_image(image, (height, width)), label, position

        dataset = batches.map(batch_positions).unbatch().map(
            element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        dataset = dataset.batch(per_replica, drop_remainder=True).map(
            finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    if source.external_state:
        options.experimental_external_state_policy = (
            tf.data.experimental.ExternalStatePolicy.IGNORE
        )
    return dataset.with_options(options)


def shuffled_index(
    positions: tf.Tensor, seed: tf.Tensor, num_examples: int
) -> tf.Tensor:
    """Example index at each stream position: a fresh permutation per epoch.

    index = P_e(c mod n) for position c in epoch e = c div n, where P_e is
    the stateless pseudo-random permutation of 0 .. n-1 of
    `RandomIndexShuffle` with seed (seed, e, 0). Works on a scalar or a
    vector of int64 positions.
    """
    positions = tf.convert_to_tensor(positions, tf.int64)
    seed = tf.cast(seed, tf.int64)
    seeds = tf.stack(
        [
            tf.fill(tf.shape(positions), seed),
            positions // num_examples,
            tf.zeros_like(positions),
        ],
        axis=-1,
    )
    return tf.raw_ops.RandomIndexShuffle(
        index=positions % num_examples,
        seed=seeds,
        max_index=tf.constant(num_examples - 1, tf.int64),
        rounds=4,
    )


# Starts the ValueError a record read raises inside tf.data, so that the
# training loop finds our one-line message in TensorFlow's error text.
RECORD_ERROR = sources.RECORD_ERROR


