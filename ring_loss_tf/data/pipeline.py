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

import concurrent.futures
import dataclasses
import io
import os
import pathlib
import re
import warnings
from typing import Sequence

import numpy as np
import tensorflow as tf

from ring_loss_tf.data import recordio
from ring_loss_tf.data import sources
# By name: `images` is the usual name of a batch here.
from ring_loss_tf.data.images import AUGMENTATIONS
from ring_loss_tf.data.images import CORRUPT_IMAGE_FIX
from ring_loss_tf.data.images import IMAGE_EXTENSIONS
from ring_loss_tf.data.images import MAX_IMAGE_PIXELS
from ring_loss_tf.data.images import augment_batch
from ring_loss_tf.data.images import decode_image
from ring_loss_tf.data.images import decode_native
from ring_loss_tf.data.images import image_bytes_ok
from ring_loss_tf.data.images import is_image_file
from ring_loss_tf.data.images import normalize
from ring_loss_tf.data.images import resize_image

# `training_dataset` keeps a folder set's decoded images in memory up to this.
IN_MEMORY_LIMIT_BYTES = 256 * 2**20


DataWarning = sources.DataWarning

# --------------------------------------------------------------------------
# Folders of images


def _missing_dir_error(path, what="Data directory"):
    return FileNotFoundError(
        f"{what} not found: {path}. Check the path (a folder per identity, "
        "a train.rec with train.idx, or a directory holding train.rec)."
    )


def _is(entry: os.DirEntry, kind: str) -> bool:
    """`entry.is_dir()` / `is_file()`, a link that cannot be followed (a
    loop) named in one line."""
    try:
        return entry.is_dir() if kind == "dir" else entry.is_file()
    except OSError as error:
        raise ValueError(
            f"{entry.path}: cannot be read ({error.strerror or error}); "
            "remove it or make the link point to an image or folder."
        ) from None


def list_image_folder(
    root: str | os.PathLike,
) -> tuple[list[str], np.ndarray, list[str]]:
    """Lists a folder-per-identity set: (paths, labels int32, class_names).

    Identities are the sub-directories of `root` in sorted order (label k is
    `class_names[k]`); images are their files with an image extension
    (jpg, jpeg, png, bmp, pgm, gif; any case), sorted. Identity folders
    without images are skipped with one warning naming them; no images at
    all is an error.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise _missing_dir_error(root)
    paths, labels, class_names, empty = [], [], [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or not _is(entry, "dir"):
            continue
        files = sorted(
            f.name for f in os.scandir(entry.path)
            if is_image_file(f.name) and _is(f, "file")
        )
        if not files:
            empty.append(entry.name)
            continue
        label = len(class_names)
        class_names.append(entry.name)
        paths.extend(os.path.join(entry.path, name) for name in files)
        labels.extend([label] * len(files))
    if empty:
        shown = ", ".join(empty[:10]) + (" ..." if len(empty) > 10 else "")
        warnings.warn(
            f"Skipped {len(empty)} identity folder(s) with no images in "
            f"{root}: {shown}",
            DataWarning,
            stacklevel=2,
        )
    if not paths:
        raise ValueError(
            f"No images found in {root}: expected one sub-directory per "
            f"identity holding {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} "
            "files (root/<identity>/<image>)."
        )
    return paths, np.asarray(labels, np.int32), class_names


def find_corrupt_images(paths: Sequence[str]) -> list[tuple[str, str]]:
    """(path, reason) of each image Pillow cannot fully decode.

    Decodes every file (threads, one per core), so it costs about as much as
    one epoch of reading. Used by `skip_corrupt=True`.
    """
    from PIL import Image

    def check(path):
        try:
            with Image.open(path) as image:
                image.load()
            with open(path, "rb") as file:
                ok = bool(image_bytes_ok(file.read()).numpy())
            return None if ok else (path, "truncated")
        except Exception as error:  # Pillow raises many types
            return (path, f"{type(error).__name__}: {error}")

    workers = min(32, (os.cpu_count() or 1) * 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return [r for r in pool.map(check, paths, chunksize=64) if r]


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
        raise _missing_dir_error(path)
    options = options or sources.Options()
    if skip_corrupt:
        options = dataclasses.replace(options, skip_corrupt=True)
    return sources.open_source(path, options)


def find_corrupt_records(
    reader: recordio.RecordIOReader, keys: np.ndarray
) -> list[tuple[int, str]]:
    """(key, reason) of each image record that cannot be read or decoded.

    Reads every record (threads, one per core) and decodes its image with
    Pillow, as `find_corrupt_images` does for files; used by
    `skip_corrupt=True` on RecordIO sets. A bad class label is not skipped
    here: the pipeline stops on it, naming the record.
    """
    from PIL import Image

    def check(key):
        key = int(key)
        try:
            _, payload = reader.read_image(key)
            with Image.open(io.BytesIO(payload)) as image:
                image.load()
            ok = bool(image_bytes_ok(payload).numpy())
            return None if ok else (key, "truncated image")
        except Exception as error:  # framing errors, Pillow's many types
            return (key, f"{type(error).__name__}: {error}")

    workers = min(32, (os.cpu_count() or 1) * 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return [r for r in pool.map(check, keys, chunksize=64) if r]


def find_corrupt_examples(source: TrainingSource) -> list[tuple[int, str]]:
    """(index, "<name>: reason") of each example of `source` that cannot be
    read or decoded (threads, one per core); `find_corrupt_records` for any
    source."""
    from PIL import Image

    def check(index):
        try:
            payload, _, name = source.read(index)
        except Exception as error:  # framing, keys, labels
            return (index, str(error))
        try:
            with Image.open(io.BytesIO(payload)) as image:
                image.load()
            if bool(image_bytes_ok(payload).numpy()):
                return None
            return (index, f"{name}: truncated image")
        except Exception as error:  # Pillow's many types
            return (index, f"{name}: {type(error).__name__}: {error}")

    workers = min(32, (os.cpu_count() or 1) * 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        found = pool.map(check, range(source.num_examples), chunksize=64)
        return [r for r in found if r]


def _check_size(image_size, channels):
    try:
        height, width = (int(v) for v in image_size)
    except (TypeError, ValueError):
        raise ValueError(
            "`image_size` must be (height, width). "
            f"Received: image_size={image_size!r}"
        ) from None
    if height < 1 or width < 1:
        raise ValueError(f"`image_size` must be positive: {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(
            f"`channels` must be 1 (grey) or 3 (RGB). Received: {channels!r}"
        )
    return height, width


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
    height, width = _check_size(image_size, channels)
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


# --------------------------------------------------------------------------
# Loading images into arrays (in-memory sets, evaluation)


def load_encoded_images(
    items: tf.data.Dataset,
    count: int,
    image_size: tuple[int, int] | None,
    channels: int | None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Decodes `count` encoded images into a uint8 (count, h, w, c) array.

    `items` yields (encoded bytes, name), the name being what an error
    reports (a path, or "<file> image <i>"). `image_size`, `channels` and
    `max_pixels` are as in `load_images`.
    """
    if count == 0:
        raise ValueError("No images to load.")
    if channels is None:
        first = next(iter(items.take(1)))
        decoded = decode_native(first[0], first[1], max_pixels=max_pixels)
        channels = 1 if decoded.shape[-1] in (1, 2) else 3
    if image_size is None:
        first = next(iter(items.take(1)))
        size = tuple(decode_image(
            first[0], channels, first[1], max_pixels=max_pixels
        ).shape[:2])
    else:
        size = _check_size(image_size, channels)

    def element(contents, name):
        image = decode_image(contents, channels, name, max_pixels=max_pixels)
        # Without image_size: the first image's (a model of any input size
        # takes one batch of one size).
        return tf.cast(resize_image(image, size), tf.uint8)

    dataset = items.map(
        element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    ).batch(256).prefetch(tf.data.AUTOTUNE)
    out = np.empty((count, size[0], size[1], channels), np.uint8)
    start = 0
    try:
        for batch in dataset:
            out[start : start + len(batch)] = batch.numpy()
            start += len(batch)
    except tf.errors.InvalidArgumentError as error:
        if "File:" in error.message:  # our own checks name the file
            raise
        # A corrupt middle that passed `image_bytes_ok`: the decoder's
        # error does not say which file; find it, from the failed batch on.
        for contents, name in items.skip(start):
            try:
                decode_native(contents, name, max_pixels=max_pixels)
            except tf.errors.InvalidArgumentError as bad:
                reason = bad.message.splitlines()[0].split("}}")[-1]
                reason = re.sub(r"\s*\[Op:.*", "", reason).strip()
                raise tf.errors.InvalidArgumentError(
                    None, None,
                    "Corrupt or truncated image file. "
                    f"{CORRUPT_IMAGE_FIX} File: "
                    f"{name.numpy().decode('utf-8', 'replace')} ({reason})",
                ) from None
        raise
    return out


def load_images(
    paths: Sequence[str | os.PathLike],
    *,
    image_size: tuple[int, int] | None,
    channels: int | None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> np.ndarray:
    """Reads image files into a uint8 array (len(paths), h, w, channels).

    Uses the training pipeline's `decode_image` and `resize_image`.
    `image_size=None` keeps the first file's size and resizes the others
    to it; `channels=None` takes the first image's (1 for grey, else 3); an
    image of more than `max_pixels` pixels (its header read, not decoded)
    fails, naming the file (None: no budget). PNGs that need no resizing
    and no colour conversion (grey to grey or RGB, RGB to RGB) are decoded
    with Pillow in threads, which gives the same pixels (PNG is lossless) at
    a fraction of the per-image cost of a tf.data pipeline.
    """
    paths = [str(p) for p in paths]
    for p in paths[:1]:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"Image file not found: {p}")
    if image_size is not None and channels is not None and paths:
        height, width = _check_size(image_size, channels)
        out = np.empty((len(paths), height, width, channels), np.uint8)
        done = _load_lossless(paths, out, max_pixels)
        rest = [i for i, ok in enumerate(done) if not ok]
        if rest:
            out[rest] = _load_with_tensorflow(
                [paths[i] for i in rest], image_size, channels, max_pixels
            )
        return out
    return _load_with_tensorflow(paths, image_size, channels, max_pixels)


def _load_with_tensorflow(paths, image_size, channels, max_pixels):
    names = tf.constant(paths)
    items = tf.data.Dataset.from_tensor_slices(names).map(
        lambda p: (tf.io.read_file(p), p)
    )
    return load_encoded_images(
        items, len(paths), image_size, channels, max_pixels
    )


def _load_lossless(paths, out, max_pixels) -> list[bool]:
    """Fills out[i] from paths[i] with Pillow where that is exact."""
    from PIL import Image

    height, width, channels = out.shape[1:]

    def load(i):
        path = paths[i]
        if not path.lower().endswith(".png"):
            return False
        try:
            with Image.open(path) as image:
                if image.format != "PNG" or image.size != (width, height):
                    return False
                # Over the budget: the TensorFlow path refuses it by name.
                if max_pixels is not None and width * height > max_pixels:
                    return False
                if image.mode not in ("L", "RGB") or (
                    image.mode == "RGB" and channels == 1
                ):
                    return False
                pixels = np.asarray(image)
        except Exception:  # left to the TensorFlow path, which names it
            return False
        if pixels.ndim == 2:
            pixels = pixels[..., None]
        out[i] = pixels if pixels.shape[-1] == channels else np.repeat(
            pixels, channels, axis=-1
        )
        return True

    workers = min(8, (os.cpu_count() or 1) * 2)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        return list(pool.map(load, range(len(paths)), chunksize=256))
