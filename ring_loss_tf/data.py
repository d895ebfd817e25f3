"""Readers and the tf.data input pipeline.

Training data comes as a folder per identity (`root/<identity>/*.jpg`, the
layout of CASIA-WebFace and of aligned face sets, and of the embedded default
set `ring_loss_tf.kanji`) or as insightface's MXNet RecordIO `train.rec` +
`train.idx` (MS1M, Glint360K, WebFace), read without MXNet. Evaluation data
comes as LFW-format directories with a `pairs.txt`, as insightface `.bin`
files (read with a restricted unpickler that cannot run code), or as image
folders (gallery, probes, distractors).

The training pipeline (`training_dataset`):

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

Images pass through the same `decode_image` / `resize_image` graph functions
in training and in evaluation (`load_images`), so both see the same pixels.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import math
import os
import pathlib
import pickle
import re
import warnings
from typing import Sequence

import numpy as np
import tensorflow as tf

from ring_loss_tf import recordio

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".gif")
AUGMENTATIONS = ("face", "characters", "none")
# `training_dataset` keeps a folder set's decoded images in memory up to this.
IN_MEMORY_LIMIT_BYTES = 256 * 2**20
_PAIRS_FORMAT = (
    "format: a header 'num_folds pairs_per_fold', then per fold "
    "pairs_per_fold lines 'name n1 n2' (same identity) and as many "
    "'name1 n1 name2 n2' (different identities)"
)
_CORRUPT_FIX = (
    "Remove or replace the file, or skip such files with skip_corrupt=True "
    "(--skip_corrupt)."
)


class DataWarning(UserWarning):
    """Something in the data was skipped; training goes on without it."""


# --------------------------------------------------------------------------
# Image ops (graph functions: each works eagerly and inside tf.data)


def _byte(contents, position):
    """Byte at `position` (negative: from the end) as int32, -1 if absent."""
    length = tf.strings.length(contents)
    position = tf.where(position < 0, length + position, position)
    inside = tf.logical_and(position >= 0, position < length)
    value = tf.io.decode_raw(
        tf.strings.substr(
            contents, tf.clip_by_value(position, 0, length), 1
        )
        + tf.constant(b"\x00"),
        tf.uint8,
    )[0]
    return tf.where(inside, tf.cast(value, tf.int32), tf.constant(-1))


def image_bytes_ok(contents: tf.Tensor) -> tf.Tensor:
    """Whether encoded image bytes look whole: a cheap graph-side check.

    Checks the signature of PNG, JPEG, BMP, GIF and binary PGM, and that the
    file is not truncated: PNG ends with its IEND chunk, JPEG has its EOI
    marker (FF D9) in the last 64 bytes, a BMP is as long as its header says,
    a GIF ends with ';' within its last 16 bytes, a PGM holds width x height
    samples. Returns a scalar bool tensor. A corrupt middle is left to the
    decoder, whose error cannot name the file.
    """
    contents = tf.convert_to_tensor(contents, tf.string)
    length = tf.strings.length(contents)
    head = tf.strings.substr(contents, 0, 8)
    tail = tf.io.decode_raw(
        tf.strings.substr(
            contents, tf.maximum(length - 64, 0), tf.minimum(length, 64)
        )
        + tf.constant(b"\x00"),  # never empty: decode_raw needs >= 1 byte
        tf.uint8,
    )
    tail = tf.cast(tail[:-1], tf.int32)

    is_png = tf.equal(head, b"\x89PNG\r\n\x1a\n")
    png_ok = tf.equal(
        tf.strings.substr(contents, tf.maximum(length - 8, 0), 4), b"IEND"
    )
    is_jpeg = tf.equal(tf.strings.substr(contents, 0, 2), b"\xff\xd8")
    jpeg_ok = tf.reduce_any(
        tf.logical_and(tf.equal(tail[:-1], 0xFF), tf.equal(tail[1:], 0xD9))
    )
    is_bmp = tf.equal(tf.strings.substr(contents, 0, 2), b"BM")
    bmp_size = (
        _byte(contents, 2)
        + 256 * _byte(contents, 3)
        + 65536 * _byte(contents, 4)
        + 16777216 * _byte(contents, 5)
    )
    bmp_ok = tf.logical_and(length >= 26, length >= bmp_size)
    is_gif = tf.equal(tf.strings.substr(contents, 0, 4), b"GIF8")
    gif_ok = tf.reduce_any(tf.equal(tail[-16:], 0x3B))
    is_pgm = tf.equal(tf.strings.substr(contents, 0, 2), b"P5")
    pgm_ok = _pgm_complete(contents)
    return tf.reduce_any(
        tf.stack(
            [
                tf.logical_and(is_png, png_ok),
                tf.logical_and(is_jpeg, jpeg_ok),
                tf.logical_and(is_bmp, bmp_ok),
                tf.logical_and(is_gif, gif_ok),
                tf.logical_and(is_pgm, pgm_ok),
            ]
        )
    )


_PGM_HEADER = r"(?s)P5\s+(\d{1,6})\s+(\d{1,6})\s+(\d{1,5})\s.*"


def _pgm_header(contents):
    """(width, height, maxval, header length) of a binary PGM, as int32."""
    # The header is ASCII; its first 64 bytes may include binary samples,
    # which become '?' so the (UTF-8) regex engine sees valid text.
    raw = tf.io.decode_raw(
        tf.strings.substr(contents, 0, 64) + tf.constant(b"\x00"), tf.uint8
    )[:-1]
    raw = tf.cast(raw, tf.int32)
    head = tf.strings.unicode_encode(
        tf.where(raw >= 128, 63, tf.maximum(raw, 1)), "UTF-8"
    )
    ok = tf.strings.regex_full_match(head, _PGM_HEADER)
    head = tf.where(ok, head, "P5 0 0 0 ")
    fields = tf.strings.split(
        tf.strings.regex_replace(head, _PGM_HEADER, r"\1 \2 \3")
    )
    values = tf.strings.to_number(fields, tf.int32)
    header = tf.strings.regex_replace(
        head, r"(?s)(P5\s+\d+\s+\d+\s+\d+\s).*", r"\1"
    )
    return values[0], values[1], values[2], tf.strings.length(header), ok


def _pgm_complete(contents):
    width, height, maxval, header, ok = _pgm_header(contents)
    sample_bytes = tf.where(maxval > 255, 2, 1)
    needed = header + width * height * sample_bytes
    return tf.logical_and(ok, tf.strings.length(contents) >= needed)


def _decode_pgm(contents):
    """Binary PGM (P5, 8 or 16 bit) -> uint8 (height, width, 1)."""
    width, height, maxval, header, _ = _pgm_header(contents)
    count = width * height

    def eight_bit():
        return tf.io.decode_raw(
            tf.strings.substr(contents, header, count) + tf.constant(b"\0"),
            tf.uint8,
        )[:count]

    def sixteen_bit():
        samples = tf.io.decode_raw(
            tf.strings.substr(contents, header, 2 * count),
            tf.uint16,
            little_endian=False,
        )
        scaled = tf.cast(samples, tf.float32) * 255.0 / tf.cast(
            maxval, tf.float32
        )
        return tf.cast(tf.round(scaled), tf.uint8)

    samples = tf.cond(maxval > 255, sixteen_bit, eight_bit)
    return tf.reshape(samples, tf.stack([height, width, 1]))


def to_channels(image: tf.Tensor, channels: int) -> tf.Tensor:
    """uint8 (h, w, 1|2|3|4) -> uint8 (h, w, channels), channels 1 or 3.

    Grey becomes three equal channels; colour becomes grey with the ITU-R
    601-2 weights Pillow uses (L = 0.299 R + 0.587 G + 0.114 B, rounded);
    alpha is dropped.
    """
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 or 3. Received: {channels}")
    image = tf.convert_to_tensor(image)
    have = tf.shape(image)[-1]
    grey = image[..., :1]
    if channels == 3:
        return tf.cond(
            have >= 3,
            lambda: image[..., :3],
            lambda: tf.tile(grey, [1, 1, 3]),
        )

    def from_colour():
        weights = tf.constant([0.299, 0.587, 0.114], tf.float32)
        rgb = tf.cast(image[..., :3], tf.float32)
        value = tf.reduce_sum(rgb * weights, axis=-1, keepdims=True)
        return tf.cast(tf.clip_by_value(tf.round(value), 0, 255), tf.uint8)

    return tf.cond(have >= 3, from_colour, lambda: grey)


def decode_image(
    contents: tf.Tensor,
    channels: int,
    name: tf.Tensor | str = "image",
    expect: str | None = None,
) -> tf.Tensor:
    """Encoded PNG/JPEG/BMP/GIF/PGM bytes -> uint8 (h, w, channels).

    First checks the bytes with `image_bytes_ok` and fails with an
    InvalidArgumentError whose message names `name` (the file) if they look
    corrupt or truncated. Then `to_channels`. `expect` ("png" or "jpeg"), the
    format most files have, adds a fast path of a few ops for whole files of
    that format; any other file takes the general path.
    """
    image = decode_native(contents, name, expect)
    image = to_channels(image, channels)
    return tf.ensure_shape(image, [None, None, channels])


def _png_whole(contents):
    length = tf.strings.length(contents)
    return tf.logical_and(
        tf.equal(tf.strings.substr(contents, 0, 8), b"\x89PNG\r\n\x1a\n"),
        tf.equal(
            tf.strings.substr(contents, tf.maximum(length - 8, 0), 4), b"IEND"
        ),
    )


def _jpeg_whole(contents):
    length = tf.strings.length(contents)
    return tf.logical_and(
        tf.equal(tf.strings.substr(contents, 0, 2), b"\xff\xd8"),
        tf.equal(
            tf.strings.substr(contents, tf.maximum(length - 2, 0), 2),
            b"\xff\xd9",
        ),
    )


def _decode_jpeg(contents):
    # The accurate integer IDCT, libjpeg's default (as in Pillow).
    return tf.io.decode_jpeg(
        contents, channels=0, dct_method="INTEGER_ACCURATE"
    )


_FAST_PATHS = {
    "png": (_png_whole, lambda c: tf.io.decode_png(c, channels=0)),
    "jpeg": (_jpeg_whole, _decode_jpeg),
}


def decode_native(
    contents: tf.Tensor,
    name: tf.Tensor | str = "image",
    expect: str | None = None,
) -> tf.Tensor:
    """Like `decode_image`, keeping the file's channels (1 to 4)."""
    contents = tf.convert_to_tensor(contents, tf.string)
    if expect is not None:
        if expect not in _FAST_PATHS:
            raise ValueError(
                f"`expect` must be None or one of {sorted(_FAST_PATHS)}. "
                f"Received: expect={expect!r}"
            )
        whole, decode = _FAST_PATHS[expect]
        image = tf.cond(
            whole(contents),
            lambda: decode(contents),
            lambda: decode_native(contents, name),
        )
        return tf.ensure_shape(image, [None, None, None])
    check = tf.debugging.Assert(
        image_bytes_ok(contents),
        [f"Corrupt or truncated image file. {_CORRUPT_FIX} File:", name],
        summarize=1,
    )
    with tf.control_dependencies([check]):
        is_pgm = tf.equal(tf.strings.substr(contents, 0, 2), b"P5")
        is_jpeg = tf.equal(tf.strings.substr(contents, 0, 2), b"\xff\xd8")

        def other():
            return tf.cond(
                is_jpeg,
                lambda: _decode_jpeg(contents),
                lambda: tf.io.decode_image(
                    contents, channels=0, expand_animations=False
                ),
            )

        image = tf.cond(is_pgm, lambda: _decode_pgm(contents), other)
    return tf.ensure_shape(image, [None, None, None])


def resize_image(image: tf.Tensor, image_size: Sequence[int]) -> tf.Tensor:
    """uint8 (h, w, c) -> float32 (height, width, c) with values in 0..255.

    Bilinear with antialiasing, rounded to whole grey levels so training and
    evaluation (which keeps uint8) see the same pixels; an image of the right
    size passes through unchanged.
    """
    height, width = (int(v) for v in image_size)
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], height), tf.equal(shape[1], width))

    def resize():
        resized = tf.image.resize(
            tf.cast(image, tf.float32), (height, width), antialias=True
        )
        return tf.clip_by_value(tf.round(resized), 0.0, 255.0)

    resized = tf.cond(same, lambda: tf.cast(image, tf.float32), resize)
    return tf.ensure_shape(resized, [height, width, image.shape[-1]])


def normalize(image: tf.Tensor) -> tf.Tensor:
    """Grey levels 0..255 -> (x - 127.5) / 128, about [-1, 1] (SphereFace)."""
    return (tf.cast(image, tf.float32) - 127.5) / 128.0


def max_translation(image_size: Sequence[int]) -> int:
    """The largest random shift, in pixels: 1/16 of the shorter side (>= 1)."""
    return max(1, int(round(min(image_size[:2]) / 16)))


def augment_batch(images: tf.Tensor, seed: tf.Tensor, mode: str) -> tf.Tensor:
    """Stateless random augmentation of a (b, h, w, c) float batch.

    "face": each image is mirrored left-right with probability 1/2 and
    shifted by whole pixels, up to `max_translation` each way, uniformly;
    "characters": the shift only (a mirrored character is another
    character); "none": unchanged. Pixels shifted in from outside mirror the
    border ("d c b a | a b c d", numpy's "symmetric" padding), so the image
    keeps its background. One projective-transform op for the batch, exact
    at whole-pixel shifts. `seed`: int tensor of shape (2,); the same seed
    gives the same result.
    """
    if mode not in AUGMENTATIONS:
        raise ValueError(
            f"`augment` must be one of {AUGMENTATIONS}. Received: {mode!r}"
        )
    images = tf.convert_to_tensor(images)
    if mode == "none":
        return images
    height, width = images.shape[1], images.shape[2]
    shift = max_translation((height, width))
    batch = tf.shape(images)[0]
    seed = tf.cast(seed, tf.int64)
    offsets = tf.random.stateless_uniform(
        tf.stack([batch, 2]), seed, minval=-shift, maxval=shift + 1,
        dtype=tf.int32,
    )
    offsets = tf.cast(offsets, tf.float32)
    if mode == "face":
        flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        flip = tf.random.stateless_uniform(tf.stack([batch]), flip_seed) < 0.5
    else:
        flip = tf.zeros(tf.stack([batch]), tf.bool)
    # Output pixel (x, y) reads input (sx * x + dx', y + dy) with sx = -1
    # and dx' = width - 1 + dx for a mirrored image.
    sign = tf.where(flip, -1.0, 1.0)
    dx = tf.where(flip, width - 1.0, 0.0) + offsets[:, 0]
    zero = tf.zeros_like(sign)
    one = tf.ones_like(sign)
    transforms = tf.stack(
        [sign, zero, dx, zero, one, offsets[:, 1], zero, zero], axis=1
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=tf.constant([height, width], tf.int32),
        fill_value=tf.constant(0.0, images.dtype),
        interpolation="NEAREST",
        fill_mode="REFLECT",
    )


def augment_image(
    image: tf.Tensor, seed: tf.Tensor, mode: str
) -> tf.Tensor:
    """`augment_batch` of one (h, w, c) image."""
    return augment_batch(tf.convert_to_tensor(image)[None], seed, mode)[0]


# --------------------------------------------------------------------------
# Folders of images


def ordinal(n: int) -> str:
    """1 -> '1st', 2 -> '2nd', 3 -> '3rd', 11 -> '11th', 21 -> '21st'."""
    n = int(n)
    suffix = {1: "st", 2: "nd", 3: "rd"}.get(abs(n) % 10, "th")
    if abs(n) % 100 in (11, 12, 13):
        suffix = "th"
    return f"{n}{suffix}"


def _missing_dir_error(path, what="Data directory"):
    return FileNotFoundError(
        f"{what} not found: {path}. Check the path (a folder per identity, "
        "a train.rec with train.idx, or a directory holding train.rec)."
    )


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


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
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        files = sorted(
            f.name for f in os.scandir(entry.path)
            if _is_image(f.name) and f.is_file()
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


@dataclasses.dataclass
class TrainingSource:
    """Where training images come from: a folder per identity or RecordIO.

    Attributes:
        kind: "folder" or "recordio".
        path: the folder, or the `.rec` file.
        num_classes: number of identities (labels are 0 .. num_classes - 1).
        num_examples: number of images.
        class_names: a name per label (folder names; "0", "1", ... for
            RecordIO).
        paths, labels: (folder) file paths and their labels, in the order
            the pipeline indexes them.
        keys: (RecordIO) the record keys of the images.
        num_skipped: images left out as corrupt (with skip_corrupt=True).
    """

    kind: str
    path: pathlib.Path
    num_classes: int
    num_examples: int
    class_names: list[str]
    paths: np.ndarray | None = None
    labels: np.ndarray | None = None
    keys: np.ndarray | None = None
    reader: recordio.RecordIOReader | None = dataclasses.field(
        default=None, repr=False
    )
    num_skipped: int = 0


def open_training_source(
    path: str | os.PathLike, *, skip_corrupt: bool = False
) -> TrainingSource:
    """Opens a folder per identity, a `train.rec`, or a dir with train.rec.

    Args:
        path: `root/<identity>/*.jpg`; or a `.rec` file with its `.idx`
            beside it; or a directory holding `train.rec` (as insightface
            distributes MS1M, Glint360K, WebFace).
        skip_corrupt: (folders) decode every image once now and leave out
            those that fail, counted in one warning. Without it a corrupt or
            truncated image stops training with an error naming the file.

    RecordIO labels are each image record's own label; the class count comes
    from insightface's header record 0 when present, otherwise from reading
    every record's header once.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise _missing_dir_error(path)
    rec = None
    if path.is_file():
        if path.suffix != ".rec":
            raise ValueError(
                f"Training data must be a directory or a .rec file. "
                f"Received: {path}"
            )
        rec = path
    elif (path / "train.rec").is_file():
        rec = path / "train.rec"
    if rec is not None:
        return _open_recordio(rec)
    paths, labels, class_names = list_image_folder(path)
    skipped = 0
    if skip_corrupt:
        bad = find_corrupt_images(paths)
        if bad:
            skipped = len(bad)
            bad_set = {p for p, _ in bad}
            keep = np.array([p not in bad_set for p in paths])
            paths = [p for p, k in zip(paths, keep) if k]
            labels = labels[keep]
            warnings.warn(
                f"Skipped {skipped} corrupt or truncated image(s) in {path} "
                f"(first: {bad[0][0]}: {bad[0][1]}).",
                DataWarning,
                stacklevel=2,
            )
            if not paths:
                raise ValueError(
                    f"Every image in {path} is corrupt: all {skipped} files "
                    f"failed to decode (first: {bad[0][0]}: {bad[0][1]}). "
                    "Check that the files are images (jpg/png/...) and copy "
                    "the data set again, or point to another directory."
                )
    return TrainingSource(
        kind="folder",
        path=path,
        num_classes=len(class_names),
        num_examples=len(paths),
        class_names=class_names,
        paths=np.asarray(paths, dtype=object),
        labels=np.asarray(labels, np.int32),
        num_skipped=skipped,
    )


def _open_recordio(rec: pathlib.Path) -> TrainingSource:
    reader = recordio.RecordIOReader(rec)
    keys, num_classes = recordio.image_records(reader)
    if len(keys) == 0:
        raise ValueError(
            f"No image records in {rec}: its index lists no records. "
            "Re-create the .rec and .idx with MXNet's im2rec."
        )
    if num_classes is None:
        num_classes = 0
        for k in keys:
            label = recordio.first_label(reader.read_header(int(k)))
            if not (math.isfinite(label) and 0 <= label < 2**31):
                raise ValueError(
                    f"{rec} record {int(k)}: class label {label} is not an "
                    "integer in 0 .. 2**31 - 1. The file is not an "
                    "insightface image .rec, or it is corrupt: re-create it "
                    "with MXNet's im2rec."
                )
            num_classes = max(num_classes, int(label) + 1)
    return TrainingSource(
        kind="recordio",
        path=rec,
        num_classes=num_classes,
        num_examples=len(keys),
        class_names=[str(k) for k in range(num_classes)],
        keys=keys,
        reader=reader,
    )


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
    repeat: bool = True,
    in_memory: bool | None = None,
) -> tf.data.Dataset:
    """The training input pipeline.

    Yields `(images, labels)`: float32 (batch_size, h, w, channels) scaled
    by (x - 127.5) / 128, and int32 (batch_size,). Each epoch visits every
    example once in an order drawn from `seed` and the epoch number
    (`shuffled_index`); augmentation draws from `seed` and the batch's first
    position. With `input_context`, pipeline k of K takes
    positions k, k + K, ... of that one order, and `batch_size` is per
    pipeline (per replica). Batches are whole (drop_remainder).

    The iterator is checkpointable: `tf.train.Checkpoint(iterator=it)`
    saved mid-epoch and restored yields the same next batches. (RecordIO
    reads records with a Python function; its dataset sets the external
    state policy to IGNORE, which is safe because the reads have no state.)

    Args:
        source: from `open_training_source`.
        batch_size: images per batch (per replica with `input_context`).
        image_size: (height, width) the images are resized to.
        channels: 1 (grey) or 3 (RGB).
        augment: "face", "characters" or "none" (see `augment_batch`).
        seed: the order and augmentation seed.
        input_context: from `strategy.distribute_datasets_from_function`.
        repeat: loop over epochs forever (True) or stop after one.
        in_memory: decode a folder source once into memory (uint8, with
            the same ops) and gather batches from it, giving the very same
            batches as streaming, much faster. Default: when the decoded
            images fit in `IN_MEMORY_LIMIT_BYTES` (the default KanjiVG set
            takes 41 MB); a corrupt file then fails here, naming it.
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
    shard, shards = 0, 1
    if input_context is not None:
        shard = input_context.input_pipeline_id
        shards = input_context.num_input_pipelines
    if not repeat and num // shards < batch_size:
        raise ValueError(
            f"One epoch of {num} images split over {shards} pipeline(s) has "
            f"no whole batch of {batch_size}; lower `batch_size`."
        )
    if repeat:
        positions = tf.data.Dataset.counter(start=shard, step=shards)
    else:
        positions = tf.data.Dataset.range(shard, num, shards)
    seed_tensor = tf.constant(int(seed), tf.int64)
    if in_memory is None:
        size = num * height * width * channels
        in_memory = source.kind == "folder" and size <= IN_MEMORY_LIMIT_BYTES
    if in_memory and source.kind != "folder":
        raise ValueError(
            "`in_memory=True` needs a folder source; RecordIO sets stream. "
            f"Received: a {source.kind} source"
        )

    def finish(images, labels, positions):
        # Augmentation is vectorised over the batch (a few ops per batch,
        # not per image), seeded by the batch's first position.
        batch_seed = tf.stack([seed_tensor, positions[0]])
        images = augment_batch(images, batch_seed, augment)
        return normalize(images), labels

    if in_memory:
        # Decoded once with the same ops; a batch is then one gather.
        pixels = tf.constant(
            load_images(source.paths, image_size=(height, width),
                        channels=channels)
        )
        labels = tf.constant(source.labels, tf.int32)

        def gather(batch_positions):
            index = shuffled_index(batch_positions, seed_tensor, num)
            images = tf.cast(tf.gather(pixels, index), tf.float32)
            return images, tf.gather(labels, index), batch_positions

        dataset = positions.batch(batch_size, drop_remainder=True).map(
            gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
    else:
        load = _folder_loader(source) if source.kind == "folder" else (
            _recordio_loader(source)
        )
        expect = _expected_format(source)

        def element(position):
            index = shuffled_index(position, seed_tensor, num)
            (contents, name), label = load(index)
            image = decode_image(contents, channels, name, expect)
            return resize_image(image, (height, width)), label, position

        dataset = positions.map(
            element, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
        )
        dataset = dataset.batch(batch_size, drop_remainder=True)
    dataset = dataset.map(
        finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    )
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    if source.kind == "recordio":
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


def _expected_format(source):
    """The fast-path format of `decode_image` for most of a source's files."""
    if source.kind == "recordio":
        return "jpeg"
    suffixes = collections.Counter(
        os.path.splitext(str(p))[1].lower() for p in source.paths[:1000]
    )
    suffix = suffixes.most_common(1)[0][0]
    return {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}.get(suffix)


def _folder_loader(source):
    paths = tf.constant([str(p) for p in source.paths])
    labels = tf.constant(source.labels, tf.int32)

    def load(index):
        path = tf.gather(paths, index)
        return (tf.io.read_file(path), path), tf.gather(labels, index)

    return load


def _recordio_loader(source):
    reader = source.reader
    keys = source.keys
    path = str(source.path)

    def read(index):
        key = int(keys[int(index)])
        header, payload = reader.read_image(key)
        return np.float32(recordio.first_label(header)), payload, key

    def load(index):
        label, payload, key = tf.py_function(
            read, [index], [tf.float32, tf.string, tf.int64]
        )
        label = tf.ensure_shape(label, [])
        payload = tf.ensure_shape(payload, [])
        name = tf.strings.join(
            ["record ", tf.strings.as_string(key), " of ", path]
        )
        return (payload, name), tf.cast(label, tf.int32)

    return load


# --------------------------------------------------------------------------
# Loading images into arrays (evaluation)


def _load_encoded(
    items: tf.data.Dataset, count: int, image_size, channels, names
) -> np.ndarray:
    """items yields (encoded bytes, name); returns uint8 (count, h, w, c)."""
    if count == 0:
        raise ValueError("No images to load.")
    if channels is None:
        first = next(iter(items.take(1)))
        decoded = decode_native(first[0], first[1])
        channels = 1 if decoded.shape[-1] in (1, 2) else 3
    if image_size is None:
        first = next(iter(items.take(1)))
        size = tuple(decode_image(first[0], channels, first[1]).shape[:2])
    else:
        size = _check_size(image_size, channels)

    def element(contents, name):
        image = decode_image(contents, channels, name)
        if image_size is None:
            shape = tf.shape(image)
            same = tf.logical_and(
                tf.equal(shape[0], size[0]), tf.equal(shape[1], size[1])
            )
            check = tf.debugging.Assert(
                same,
                [f"Images differ in size (first was {size[0]}x{size[1]}); "
                 "pass image_size. File:", name, "has shape", shape],
            )
            with tf.control_dependencies([check]):
                image = tf.identity(image)
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
                decode_native(contents, name)
            except tf.errors.InvalidArgumentError as bad:
                reason = bad.message.splitlines()[0].split("}}")[-1]
                reason = re.sub(r"\s*\[Op:.*", "", reason).strip()
                raise tf.errors.InvalidArgumentError(
                    None, None,
                    f"Corrupt or truncated image file. {_CORRUPT_FIX} File: "
                    f"{name.numpy().decode('utf-8', 'replace')} ({reason})",
                ) from None
        raise
    return out


def load_images(
    paths: Sequence[str | os.PathLike],
    *,
    image_size: tuple[int, int] | None,
    channels: int | None,
) -> np.ndarray:
    """Reads image files into a uint8 array (len(paths), h, w, channels).

    Uses the training pipeline's `decode_image` and `resize_image`.
    `image_size=None` keeps the files' size (they must agree); `channels=None`
    takes the first image's (1 for grey, else 3). PNGs that need no resizing
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
        done = _load_lossless(paths, out)
        rest = [i for i, ok in enumerate(done) if not ok]
        if rest:
            out[rest] = _load_with_tensorflow(
                [paths[i] for i in rest], image_size, channels
            )
        return out
    return _load_with_tensorflow(paths, image_size, channels)


def _load_with_tensorflow(paths, image_size, channels):
    names = tf.constant(paths)
    items = tf.data.Dataset.from_tensor_slices(names).map(
        lambda p: (tf.io.read_file(p), p)
    )
    return _load_encoded(items, len(paths), image_size, channels, paths)


def _load_lossless(paths, out) -> list[bool]:
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


def read_image_folder(
    root: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    load: bool = True,
) -> tuple[np.ndarray | list[str], np.ndarray, list[str]]:
    """A folder per identity as (images, labels int32, class_names).

    For the gallery, probes and distractors of identification. `images` is a
    uint8 (N, h, w, c) array (see `load_images`), or with `load=False` the
    list of file paths.
    """
    paths, labels, class_names = list_image_folder(root)
    if not load:
        return paths, labels, class_names
    images = load_images(paths, image_size=image_size, channels=channels)
    return images, labels, class_names


# --------------------------------------------------------------------------
# Verification sets


@dataclasses.dataclass
class VerificationSet:
    """Pairs of images to verify.

    Attributes:
        images: uint8 (N, H, W, C), each distinct image once.
        left, right: int (P,) indices into `images` of each pair.
        issame: bool (P,), whether the pair shows one identity.
        fold: int (P,), the fold (0 .. num_folds - 1) of each pair.
        names: (N,) where each image came from (path or "<file> image i").
    """

    images: np.ndarray
    left: np.ndarray
    right: np.ndarray
    issame: np.ndarray
    fold: np.ndarray
    names: list[str] = dataclasses.field(default_factory=list)

    @property
    def num_folds(self) -> int:
        return int(self.fold.max()) + 1 if len(self.fold) else 0


_LFW_NAME = re.compile(r"(.+)_(\d+)$")


def _lfw_numbering(directory: pathlib.Path) -> dict[int, pathlib.Path]:
    """Number -> file of one identity folder.

    Files named `<identity>_<nnnn>.<ext>` (LFW) keep their number; a folder
    with no such file is numbered by sorted position from 1; a mix is an
    error (the numbers would be ambiguous).
    """
    files = sorted(
        p for p in directory.iterdir() if _is_image(p.name) and p.is_file()
    )
    numbered = {}
    for file in files:
        match = _LFW_NAME.fullmatch(file.stem)
        if match and match.group(1) == directory.name:
            numbered[int(match.group(2))] = file
    if numbered and len(numbered) != len(files):
        raise ValueError(
            f"{directory} mixes LFW-named files (<identity>_<nnnn>.<ext>) "
            "with other names, so pair numbers are ambiguous; rename the "
            "files one way."
        )
    if numbered:
        return numbered
    return {n: file for n, file in enumerate(files, start=1)}


def parse_pairs_file(
    pairs_path: str | os.PathLike,
) -> list[tuple[str, int, str, int, int]]:
    """Parses an LFW pairs.txt: [(name1, n1, name2, n2, fold), ...].

    Header: "num_folds pairs_per_fold" (or one number: one fold); each fold
    has 2 x pairs_per_fold lines, "name n1 n2" for a genuine pair and
    "name1 n1 name2 n2" for an impostor pair, fields separated by tabs or
    spaces.

    Raises:
        FileNotFoundError: `pairs_path` is not a file.
        ValueError: an empty file, a bad header or pair line, or a pair
            count other than the header's; the message names the file, the
            line and the expected format.
    """
    pairs_path = pathlib.Path(pairs_path)
    if not pairs_path.is_file():
        raise FileNotFoundError(f"Pairs file not found: {pairs_path}")
    lines = [
        (number, line.split())
        for number, line in enumerate(
            pairs_path.read_text(encoding="utf-8", errors="replace")
            .splitlines(),
            start=1,
        )
        if line.strip()
    ]
    if not lines:
        raise ValueError(f"{pairs_path} is empty ({_PAIRS_FORMAT}).")
    header_number, header = lines[0]
    try:
        numbers = [int(v) for v in header]
        if len(numbers) not in (1, 2) or min(numbers) < 1:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"{pairs_path} line {header_number}: expected the header "
            f"'num_folds pairs_per_fold', found {' '.join(header)!r} "
            f"({_PAIRS_FORMAT})."
        ) from None
    num_folds, per_fold = numbers if len(numbers) == 2 else (1, numbers[0])
    pairs = []
    for index, (number, fields) in enumerate(lines[1:]):
        try:
            if len(fields) == 3:
                pair = (fields[0], int(fields[1]), fields[0], int(fields[2]))
            elif len(fields) == 4:
                pair = (fields[0], int(fields[1]), fields[2], int(fields[3]))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"{pairs_path} line {number}: expected 'name n1 n2' or "
                f"'name1 n1 name2 n2' with integer n, found "
                f"{' '.join(fields)!r} ({_PAIRS_FORMAT})."
            ) from None
        pairs.append(pair + (index // (2 * per_fold),))
    expected = num_folds * 2 * per_fold
    if len(pairs) != expected:
        raise ValueError(
            f"{pairs_path}: the header (line {header_number}) promises "
            f"{num_folds} folds x 2 x {per_fold} = {expected} pairs, found "
            f"{len(pairs)} pair lines ({_PAIRS_FORMAT})."
        )
    return pairs


def read_lfw_pairs(
    pairs_path: str | os.PathLike,
    lfw_dir: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
) -> VerificationSet:
    """An LFW-format verification set: pairs.txt over a folder per identity.

    Pair "name n" refers to `lfw_dir/name/name_<nnnn>.<ext>` (any image
    extension); in a folder without LFW-named files, to its n-th image in
    sorted order (as `make_pairs_file` writes for such folders). Each image
    is loaded once (see `load_images` for `image_size` and `channels`).

    Raises:
        FileNotFoundError: `lfw_dir` is not a directory or `pairs_path` is
            not a file.
        ValueError: as `parse_pairs_file`, or a pair names an image that is
            not there (file and line named).
        tf.errors.InvalidArgumentError: an image does not decode, or images
            differ in size without `image_size` (the file named).
    """
    lfw_dir = pathlib.Path(lfw_dir)
    if not lfw_dir.is_dir():
        raise FileNotFoundError(
            f"LFW image directory not found: {lfw_dir}. Pass the directory "
            "holding one folder per identity, <identity>/<identity>_<nnnn>"
            ".<ext>, that the pairs.txt names refer to (evaluate.py "
            "--lfw_dir=DIR --pairs=DIR/pairs.txt)."
        )
    pairs = parse_pairs_file(pairs_path)
    numbering: dict[str, dict[int, pathlib.Path]] = {}
    index_of: dict[pathlib.Path, int] = {}
    names: list[pathlib.Path] = []
    left, right, issame, fold = [], [], [], []
    lines = _pair_line_numbers(pairs_path)
    for (name1, n1, name2, n2, k), line in zip(pairs, lines):
        ends = []
        for name, n in ((name1, n1), (name2, n2)):
            if name not in numbering:
                if name in (".", "..") or "/" in name or os.sep in name:
                    raise ValueError(
                        f"{pairs_path} line {line}: {name!r} is not an "
                        f"identity folder name under {lfw_dir} (no '/', "
                        f"'.' or '..'); {_PAIRS_FORMAT}."
                    )
                directory = lfw_dir / name
                try:
                    is_dir = directory.is_dir()
                except OSError:  # e.g. a name too long for the file system
                    is_dir = False
                numbering[name] = _lfw_numbering(directory) if is_dir else {}
            file = numbering[name].get(n)
            if file is None:
                raise ValueError(
                    f"{pairs_path} line {line}: no image {n} of {name!r}: "
                    f"expected {lfw_dir / name / f'{name}_{n:04d}'}.<ext> "
                    f"(or the {ordinal(n)} image of that folder)."
                )
            if file not in index_of:
                index_of[file] = len(names)
                names.append(file)
            ends.append(index_of[file])
        left.append(ends[0])
        right.append(ends[1])
        issame.append(name1 == name2)
        fold.append(k)
    images = load_images(names, image_size=image_size, channels=channels)
    return VerificationSet(
        images=images,
        left=np.asarray(left, np.int64),
        right=np.asarray(right, np.int64),
        issame=np.asarray(issame, bool),
        fold=np.asarray(fold, np.int64),
        names=[str(n) for n in names],
    )


def _pair_line_numbers(pairs_path) -> list[int]:
    text = pathlib.Path(pairs_path).read_text(
        encoding="utf-8", errors="replace"
    )
    numbers = [n for n, l in enumerate(text.splitlines(), 1) if l.strip()]
    return numbers[1:]


def make_pairs_file(
    root: str | os.PathLike,
    output_path: str | os.PathLike,
    *,
    num_folds: int = 10,
    pairs_per_fold: int = 300,
    seed: int = 0,
) -> pathlib.Path:
    """Writes an LFW-format pairs.txt for a folder-per-identity set.

    Each of the `num_folds` folds gets `pairs_per_fold` genuine pairs (two
    distinct images of one identity) and as many impostor pairs (images of
    two identities), no pair twice. With at least 2 x num_folds identities
    the folds are identity-disjoint, as in LFW (identities are dealt to the
    folds by a seeded shuffle); otherwise the pairs are drawn from all
    identities and dealt to the folds. Genuine pairs go round-robin over the
    identities so each contributes about equally. Numbers follow
    `_lfw_numbering` (LFW file numbers, or sorted position). The result is
    a pure function of the folder listing and `seed`.

    Returns:
        `output_path`, as a Path. Read it with `read_lfw_pairs(output_path,
        root)`.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise _missing_dir_error(root)
    for name, value in (("num_folds", num_folds),
                        ("pairs_per_fold", pairs_per_fold)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(
                f"`{name}` must be a positive integer. Received: {value!r}"
            )
    paths, labels, class_names = list_image_folder(root)
    numbers = [
        sorted(_lfw_numbering(root / name)) for name in class_names
    ]
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0xFA125]))
    order = rng.permutation(len(class_names))
    disjoint = len(class_names) >= 2 * num_folds
    if disjoint:
        groups = [order[k::num_folds] for k in range(num_folds)]
        wanted = pairs_per_fold
    else:
        groups = [order]
        wanted = pairs_per_fold * num_folds
    folds_genuine, folds_impostor = [], []
    for group in groups:
        genuine = _genuine_pairs(group, numbers, wanted, rng)
        impostor = _impostor_pairs(group, numbers, wanted, rng)
        if len(genuine) < wanted or len(impostor) < wanted:
            raise ValueError(
                f"{root} has too few images for {num_folds} folds of "
                f"{pairs_per_fold} genuine and impostor pairs"
                + (" (folds are identity-disjoint)" if disjoint else "")
                + f": found {len(genuine)} genuine and {len(impostor)} "
                "impostor pairs for a fold. Lower `pairs_per_fold`."
            )
        folds_genuine.append(genuine)
        folds_impostor.append(impostor)
    if not disjoint:
        g, i = folds_genuine[0], folds_impostor[0]
        folds_genuine = [g[k::num_folds] for k in range(num_folds)]
        folds_impostor = [i[k::num_folds] for k in range(num_folds)]
    lines = [f"{num_folds}\t{pairs_per_fold}"]
    for genuine, impostor in zip(folds_genuine, folds_impostor):
        for a, n1, n2 in genuine:
            lines.append(f"{class_names[a]}\t{n1}\t{n2}")
        for a, n1, b, n2 in impostor:
            lines.append(f"{class_names[a]}\t{n1}\t{class_names[b]}\t{n2}")
    output_path = pathlib.Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    output_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return output_path


def _genuine_pairs(group, numbers, wanted, rng):
    """Up to `wanted` distinct (identity, n1, n2), round-robin over group."""
    pools = {}
    for a in group:
        count = len(numbers[a])
        if count < 2:
            continue
        i, j = np.triu_indices(count, k=1)
        if len(i) > 200_000:  # sample a subset of a very large identity
            chosen = rng.choice(len(i), 200_000, replace=False)
            i, j = i[chosen], j[chosen]
        pick = rng.permutation(len(i))
        pools[int(a)] = collections.deque(zip(i[pick].tolist(),
                                              j[pick].tolist()))
    out = []
    while len(out) < wanted and pools:
        for a in list(pools):
            if len(out) == wanted:
                break
            i, j = pools[a].popleft()
            out.append((a, numbers[a][i], numbers[a][j]))
            if not pools[a]:
                del pools[a]
    return out


def _impostor_pairs(group, numbers, wanted, rng):
    """Up to `wanted` distinct (identity a, n1, identity b, n2), a != b."""
    group = [int(a) for a in group]
    if len(group) < 2:
        return []
    sizes = np.array([len(numbers[a]) for a in group])
    total = (sizes.sum() ** 2 - (sizes**2).sum()) // 2
    seen, out = set(), []
    attempts = 0
    while len(out) < min(wanted, total) and attempts < 50 * wanted + 1000:
        attempts += 1
        x, y = rng.choice(len(group), 2, replace=False)
        if x > y:
            x, y = y, x
        i = int(rng.integers(sizes[x]))
        j = int(rng.integers(sizes[y]))
        key = (x, i, y, j)
        if key in seen:
            continue
        seen.add(key)
        out.append((group[x], numbers[group[x]][i],
                    group[y], numbers[group[y]][j]))
    return out


# --------------------------------------------------------------------------
# insightface .bin verification sets


class UnsafePickleError(pickle.UnpicklingError):
    """A .bin file asked to load something other than plain data."""


def _latin1_encode(text, encoding="latin1"):
    # Python 3 pickles bytes at protocol < 3 as _codecs.encode(str, "latin1").
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with {encoding!r}")
    return text.encode("latin1")


def _empty_bytes(*args):
    # Python 3 pickles b"" at protocol < 3 as __builtin__.bytes().
    if args:
        raise UnsafePickleError("refusing bytes() with arguments")
    return b""


def _safe_dtype(*args, **kwargs):
    dtype = np.dtype(*args, **kwargs)
    if dtype.hasobject:
        raise UnsafePickleError("refusing a numpy array of Python objects")
    return dtype


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only bytes, str, numbers, lists, tuples, bools and numpy
    arrays of plain dtypes; any other global (a function, a class) is
    refused, so a malicious file cannot run code."""

    def find_class(self, module, name):
        allowed = _ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: a .bin may hold "
                "only bytes, lists, tuples, bools and numpy arrays"
            )
        return allowed()


def _numpy_reconstruct(cls, shape, dtype):
    if cls is not np.ndarray:
        raise UnsafePickleError(f"refusing to reconstruct {cls!r}")
    return np.ndarray.__new__(np.ndarray, shape, _safe_dtype(dtype))


def _numpy_scalar(dtype, data=None):
    dtype = _safe_dtype(dtype)
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError("numpy scalar without raw bytes")
    # A copy: a view would export the pickle's (possibly bytearray) buffer.
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0].copy()


_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: _safe_dtype,
    ("_codecs", "encode"): lambda: _latin1_encode,
    ("__builtin__", "bytes"): lambda: _empty_bytes,
    ("builtins", "bytes"): lambda: _empty_bytes,
}
for _module in ("numpy.core.multiarray", "numpy._core.multiarray"):
    _ALLOWED_GLOBALS[(_module, "_reconstruct")] = lambda: _numpy_reconstruct
    _ALLOWED_GLOBALS[(_module, "scalar")] = lambda: _numpy_scalar
del _module


def _bin_images(path, bins) -> list[bytes]:
    """The encoded images of a .bin: bytes, or arrays of their bytes."""
    if not isinstance(bins, (list, tuple, np.ndarray)):
        raise ValueError(
            f"{path}: expected a list of encoded images as the first item of "
            f"(images, issame), found {type(bins).__name__}. {_BIN_FIX}"
        )
    out = []
    for i, item in enumerate(bins):
        if isinstance(item, (bytes, bytearray)):
            out.append(bytes(item))
        elif isinstance(item, np.ndarray) and item.dtype.kind in "biuf":
            out.append(item.tobytes())
        else:
            raise ValueError(
                f"{path}: image {i} is of type {type(item).__name__}, not "
                f"encoded image bytes. {_BIN_FIX}"
            )
    return out


def _bin_issame(path, issame) -> np.ndarray:
    """The same-identity flags of a .bin as a bool vector."""
    try:
        flags = np.asarray(issame) if isinstance(
            issame, (list, tuple, np.ndarray)) else None
    except (ValueError, TypeError, OverflowError):
        flags = None
    if flags is None or flags.ndim != 1 or (
        len(flags) and flags.dtype.kind not in "biu"
    ):
        raise ValueError(
            f"{path}: expected a list of booleans as the second item of "
            f"(images, issame), found {type(issame).__name__}"
            + (f" of {flags.dtype}, shape {flags.shape}"
               if flags is not None else "")
            + f". {_BIN_FIX}"
        )
    return flags.astype(bool)


_BIN_FIX = (
    "Use a .bin from insightface's datasets, or re-create it with their "
    "lfw2pack.py (a pickle of (images, issame))."
)


def read_bin(
    path: str | os.PathLike,
    *,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    num_folds: int = 10,
) -> VerificationSet:
    """An insightface verification `.bin` (lfw.bin, cfp_fp.bin, agedb_30.bin).

    The file is a pickle of `(bins, issame_list)`: 2P encoded images (pair i
    is images 2i and 2i+1) and P booleans. It is read with
    `RestrictedUnpickler`. Folds are P/num_folds consecutive pairs, as
    insightface's evaluation splits them.

    Raises:
        FileNotFoundError: `path` is not a file.
        UnsafePickleError: the pickle asks to load code or Python objects.
        ValueError: not a pickle, or not of (images, issame), or not 2
            images per pair; the message names the file (and the image).
        tf.errors.InvalidArgumentError: an image does not decode; the
            message names "<path> image <i>".
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Verification .bin file not found: {path}")
    with open(path, "rb") as file:
        try:
            loaded = RestrictedUnpickler(file, encoding="bytes").load()
        except UnsafePickleError as error:
            raise UnsafePickleError(f"{path}: {error}") from None
        except Exception as error:
            raise ValueError(
                f"{path} is not an insightface .bin file (a pickle of "
                f"(images, issame)): {type(error).__name__}: "
                f"{' '.join(str(error).split())} near byte offset "
                f"{file.tell()}. {_BIN_FIX}"
            ) from None
    if not (isinstance(loaded, (tuple, list)) and len(loaded) == 2):
        raise ValueError(
            f"{path}: expected a pickled pair (images, issame), found "
            f"{type(loaded).__name__}."
        )
    bins, issame = loaded
    bins = _bin_images(path, bins)
    issame = _bin_issame(path, issame)
    if len(bins) != 2 * len(issame) or not len(issame):
        raise ValueError(
            f"{path}: expected 2 images per pair, found {len(bins)} images "
            f"for {len(issame)} pairs."
        )
    names = [f"{path} image {i}" for i in range(len(bins))]
    items = tf.data.Dataset.from_tensor_slices(
        (tf.constant(bins), tf.constant(names))
    )
    images = _load_encoded(items, len(bins), image_size, channels, names)
    pairs = len(issame)
    return VerificationSet(
        images=images,
        left=np.arange(0, 2 * pairs, 2),
        right=np.arange(1, 2 * pairs, 2),
        issame=issame,
        fold=np.arange(pairs) * num_folds // pairs,
        names=names,
    )
