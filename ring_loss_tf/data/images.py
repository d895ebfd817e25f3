"""Image ops: encoded bytes to pixels, resizing, scaling and augmentation.

Graph functions, each working eagerly and inside tf.data: the bytes check
(`image_bytes_ok`), the size from the header (`header_size`, checked
against a pixel budget before decoding), decoding (`decode_image`,
`decode_native`, with a PGM decoder TensorFlow lacks), `to_channels`,
`resize_image`, `normalize` and the stateless augmentation
(`augment_batch`). The training pipeline (`pipeline`) and evaluation
(`pipeline.load_images`, `eval_sets`) both decode and resize with them, so
both see the same pixels.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
from typing import Sequence

import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".gif")
AUGMENTATIONS = ("face", "characters", "none")
# The remedy every corrupt-image error ends with.
CORRUPT_IMAGE_FIX = (
    "Remove or replace the file, or skip such files with skip_corrupt=True "
    "(--skip_corrupt)."
)
# The default pixel budget: a few kilobytes of PNG can hold 12000 x 12000
# pixels, which decode and resize through gigabytes. 8192 x 8192 passes any
# camera's photo up to 64 megapixels.
MAX_IMAGE_PIXELS = 8192 * 8192
TOO_LARGE_TEXT = "Image larger than the pixel budget"


def too_large_message(max_pixels: int) -> str:
    """The start of the budget error, up to "File:" (the file follows)."""
    return (
        f"{TOO_LARGE_TEXT} of {max_pixels} (max_image_pixels): decoding it "
        "would take too much memory. Downscale the file, or raise the budget "
        "(--max_image_pixels of train.py or of the aligner). File:"
    )


def is_image_file(name: str) -> bool:
    """Whether a file name has an image extension (any case), not hidden."""
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


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


def _header_integers(contents, start, count, size, big_endian):
    """`count` unsigned integers of `size` bytes each from byte `start`,
    as int64; bytes past the end of the file read as 0."""
    length = tf.strings.length(contents)
    raw = tf.io.decode_raw(
        tf.strings.substr(contents, tf.minimum(start, length), count * size)
        + tf.constant(b"\0" * (count * size)),
        tf.uint8,
    )[: count * size]
    raw = tf.reshape(tf.cast(raw, tf.int64), [count, size])
    powers = 256 ** np.arange(size, dtype=np.int64)
    weights = tf.constant(powers[::-1] if big_endian else powers)
    return tf.reduce_sum(raw * weights, axis=1)


def _png_size(contents):
    # IHDR, always the first chunk: width, height as big-endian uint32.
    return _header_integers(contents, 16, 2, 4, big_endian=True)


def _jpeg_size(contents):
    # libjpeg reads the markers up to the frame header; no pixel is decoded.
    return tf.cast(tf.io.extract_jpeg_shape(contents)[1::-1], tf.int64)


def header_size(contents: tf.Tensor) -> tf.Tensor:
    """(width, height) from an encoded image's header, without decoding.

    PNG's IHDR, JPEG's frame header (`tf.io.extract_jpeg_shape`), BMP's
    info header (a negative, top-down height counts by its size), GIF's
    logical screen and PGM's text header. int64 `(2,)`; (0, 0) for other
    bytes, whose decoding fails anyway.
    """
    contents = tf.convert_to_tensor(contents, tf.string)
    is_jpeg = tf.equal(tf.strings.substr(contents, 0, 2), b"\xff\xd8")
    is_pgm = tf.equal(tf.strings.substr(contents, 0, 2), b"P5")

    def pgm():
        width, height, _, _, ok = _pgm_header(contents)
        size = tf.cast(tf.stack([width, height]), tf.int64)
        return tf.where(ok, size, tf.zeros_like(size))

    def by_bytes():
        signature = tf.strings.substr(contents, 0, 8)
        is_png = tf.equal(signature, b"\x89PNG\r\n\x1a\n")
        is_bmp = tf.equal(tf.strings.substr(contents, 0, 2), b"BM")
        is_gif = tf.equal(tf.strings.substr(contents, 0, 4), b"GIF8")
        bmp = _header_integers(contents, 18, 2, 4, big_endian=False)
        bmp = tf.where(bmp >= 2**31, 2**32 - bmp, bmp)  # signed int32
        gif = _header_integers(contents, 6, 2, 2, big_endian=False)
        size = tf.where(is_bmp, bmp, tf.zeros_like(bmp))
        size = tf.where(is_gif, gif, size)
        return tf.where(is_png, _png_size(contents), size)

    return tf.cond(
        is_jpeg,
        lambda: _jpeg_size(contents),
        lambda: tf.cond(is_pgm, pgm, by_bytes),
    )


def _within_budget(contents, size, name, max_pixels):
    """`contents`, once its header's `size` is known to fit `max_pixels`.

    The message is built only for an image over the budget: a normal one
    costs a comparison and a branch.
    """
    if max_pixels is None:
        return contents
    if not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise ValueError(
            "`max_pixels` must be None or a positive integer. "
            f"Received: max_pixels={max_pixels!r}"
        )
    # Each side clipped so that the product cannot overflow int64.
    size = tf.minimum(size, 2**31)
    fits = size[0] * size[1] <= int(max_pixels)

    def refuse():
        where = tf.strings.join([
            name, " (", tf.strings.as_string(size[0]), "x",
            tf.strings.as_string(size[1]), " pixels)",
        ])
        check = tf.debugging.Assert(
            fits, [too_large_message(int(max_pixels)), where], summarize=1
        )
        with tf.control_dependencies([check]):
            return tf.identity(contents)

    return tf.cond(fits, lambda: contents, refuse)


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
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> tf.Tensor:
    """Encoded PNG/JPEG/BMP/GIF/PGM bytes -> uint8 (h, w, channels).

    First checks the bytes with `image_bytes_ok` and fails with an
    InvalidArgumentError whose message names `name` (the file) if they look
    corrupt or truncated, or if the header's width x height
    (`header_size`) exceeds `max_pixels` (None: no budget); both before
    decoding. Then `to_channels`. `expect` ("png" or "jpeg"), the format
    most files have, adds a fast path of a few ops for whole files of that
    format; any other file takes the general path.
    """
    image = decode_native(contents, name, expect, max_pixels)
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
    "png": (_png_whole, _png_size, lambda c: tf.io.decode_png(c, channels=0)),
    "jpeg": (_jpeg_whole, _jpeg_size, _decode_jpeg),
}


def decode_native(
    contents: tf.Tensor,
    name: tf.Tensor | str = "image",
    expect: str | None = None,
    max_pixels: int | None = MAX_IMAGE_PIXELS,
) -> tf.Tensor:
    """Like `decode_image`, keeping the file's channels (1 to 4)."""
    contents = tf.convert_to_tensor(contents, tf.string)
    if expect is not None:
        if expect not in _FAST_PATHS:
            raise ValueError(
                f"`expect` must be None or one of {sorted(_FAST_PATHS)}. "
                f"Received: expect={expect!r}"
            )
        whole, size, decode = _FAST_PATHS[expect]
        image = tf.cond(
            whole(contents),
            lambda: decode(_within_budget(
                contents, size(contents), name, max_pixels
            )),
            lambda: decode_native(contents, name, max_pixels=max_pixels),
        )
        return tf.ensure_shape(image, [None, None, None])
    check = tf.debugging.Assert(
        image_bytes_ok(contents),
        [f"Corrupt or truncated image file. {CORRUPT_IMAGE_FIX} File:", name],
        summarize=1,
    )
    with tf.control_dependencies([check]):
        contents = _within_budget(
            contents, header_size(contents), name, max_pixels
        )
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


def augment_batch(
    images: tf.Tensor, seed: tf.Tensor, mode: str, rows=None
) -> tf.Tensor:
    """Stateless random augmentation of a (b, h, w, c) float batch.

    "face": each image is mirrored left-right with probability 1/2 and
    shifted by whole pixels, up to `max_translation` each way, uniformly;
    "characters": the shift only (a mirrored character is another
    character); "none": unchanged. Pixels shifted in from outside mirror the
    border ("d c b a | a b c d", numpy's "symmetric" padding), so the image
    keeps its background. One projective-transform op for the batch, exact
    at whole-pixel shifts. `seed`: int tensor of shape (2,); the same seed
    gives the same result.

    `rows`: None, or (first, total): the images are rows first .. first + b
    of a batch of `total` drawn with `seed`, and get those rows' draws. A
    replica holding a slice of the global batch so augments its rows
    exactly as one device augmenting the whole batch would.
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
    first, total = (0, batch) if rows is None else rows
    first = tf.cast(first, tf.int32)
    total = tf.cast(total, tf.int32)
    seed = tf.cast(seed, tf.int64)
    # Draws of the whole batch (a few numbers per image), then our rows'.
    offsets = tf.random.stateless_uniform(
        tf.stack([total, 2]), seed, minval=-shift, maxval=shift + 1,
        dtype=tf.int32,
    )[first : first + batch]
    offsets = tf.cast(offsets, tf.float32)
    if mode == "face":
        flip_seed = tf.random.experimental.stateless_fold_in(seed, 1)
        flip = tf.random.stateless_uniform(
            tf.stack([total]), flip_seed
        )[first : first + batch] < 0.5
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


def check_size(image_size, channels):
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
        size = check_size(image_size, channels)

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
        height, width = check_size(image_size, channels)
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
