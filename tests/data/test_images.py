"""Tests of the image ops (ring_loss_tf/images.py): each eagerly and inside
tf.data, against Pillow and numpy."""

import io

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ring_loss_tf.data import images
from tests.data_files import encode
from tests.data_files import pgm
from tests.data_files import png_of_size
from tests.data_files import smooth_rgb

RNG = np.random.default_rng(0)


def run_both(fn, *args):
    """fn(*args) eagerly and inside tf.data.Dataset.map, as numpy."""
    eager = fn(*args)
    dataset = tf.data.Dataset.from_tensors(args).map(fn)
    in_data = next(iter(dataset))
    return np.asarray(eager), np.asarray(in_data)



@pytest.mark.parametrize("fmt", ["PNG", "BMP", "JPEG", "PGM", "GIF"])
def test_decode_image_matches_pillow(fmt):
    rgb = smooth_rgb()
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    if fmt == "PGM":
        contents, reference = pgm(grey), grey[..., None]
    elif fmt == "GIF":
        contents = encode(grey, "GIF")
        reference = np.asarray(Image.open(io.BytesIO(contents)).convert("L"))
        reference = reference[..., None]
    else:
        # 4:4:4 JPEG: decoders differ in how they upsample chroma.
        options = {"quality": 95, "subsampling": 0} if fmt == "JPEG" else {}
        contents = encode(rgb, fmt, **options)
        reference = np.asarray(Image.open(io.BytesIO(contents)).convert("RGB"))
    channels = reference.shape[-1]
    eager, in_data = run_both(
        lambda c: images.decode_image(c, channels, "x"), tf.constant(contents)
    )
    np.testing.assert_array_equal(eager, in_data)
    tolerance = 2 if fmt == "JPEG" else 0
    assert np.abs(eager.astype(int) - reference).max() <= tolerance


def test_decode_pgm_16_bit():
    samples = RNG.integers(0, 1001, size=(5, 7))
    contents = pgm(samples, maxval=1000)
    eager, in_data = run_both(
        lambda c: images.decode_image(c, 1, "x"), tf.constant(contents)
    )
    np.testing.assert_array_equal(eager, in_data)
    np.testing.assert_array_equal(
        eager[..., 0], np.rint(samples * 255.0 / 1000).astype(np.uint8)
    )


def test_to_channels_grey_to_rgb_and_rgb_to_grey():
    rgb = smooth_rgb()
    eager, in_data = run_both(lambda x: images.to_channels(x, 1), rgb)
    np.testing.assert_array_equal(eager, in_data)
    # Pillow's L = R*299/1000 + G*587/1000 + B*114/1000 (rounded).
    pillow = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.abs(eager[..., 0].astype(int) - pillow).max() <= 1
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, np.uint8)], -1)
    np.testing.assert_array_equal(images.to_channels(rgba, 3), rgb)
    grey = rgb[..., :1]
    eager, in_data = run_both(lambda x: images.to_channels(x, 3), grey)
    np.testing.assert_array_equal(eager, np.repeat(grey, 3, axis=-1))
    np.testing.assert_array_equal(in_data, eager)
    with pytest.raises(ValueError, match="must be 1 or 3"):
        images.to_channels(grey, 2)


def test_resize_image():
    image = smooth_rgb(40, 48)
    eager, in_data = run_both(lambda x: images.resize_image(x, (20, 24)), image)
    np.testing.assert_array_equal(eager, in_data)
    assert eager.shape == (20, 24, 3) and eager.dtype == np.float32
    np.testing.assert_array_equal(eager, np.rint(eager))  # whole grey levels
    # A 2x box average is what an antialiased 2x downsample approximates.
    box = image.astype(float).reshape(20, 2, 24, 2, 3).mean(axis=(1, 3))
    inner = (slice(2, -2), slice(2, -2))
    assert np.abs(eager[inner] - box[inner]).max() <= 3
    # The right size passes through unchanged; a constant stays constant.
    same, _ = run_both(lambda x: images.resize_image(x, (40, 48)), image)
    np.testing.assert_array_equal(same, image)
    flat = np.full((13, 17, 1), 77, np.uint8)
    np.testing.assert_array_equal(images.resize_image(flat, (32, 32)), 77)


def test_normalize():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16, 1)
    eager, in_data = run_both(images.normalize, x)
    expected = (x.astype(np.float64) - 127.5) / 128
    np.testing.assert_allclose(eager, expected, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(in_data, eager)


def shifted_versions(image, shift):
    """Every crop of the symmetric-padded image at offsets within +-shift."""
    padded = np.pad(
        image, [(shift, shift), (shift, shift), (0, 0)], "symmetric"
    )
    h, w = image.shape[:2]
    return [
        padded[dy : dy + h, dx : dx + w]
        for dy in range(2 * shift + 1)
        for dx in range(2 * shift + 1)
    ]


@pytest.mark.parametrize("mode", ["face", "characters", "none"])
def test_augment_image(mode):
    image = RNG.uniform(0, 255, size=(32, 32, 1)).astype(np.float32)
    shift = images.max_translation((32, 32))
    assert shift == 2
    candidates = shifted_versions(image, shift)
    mirrored = shifted_versions(image[:, ::-1], shift)
    seeds = np.stack([np.full(40, 7), np.arange(40)], axis=1)
    in_data = tf.data.Dataset.from_tensor_slices(seeds).map(
        lambda k: images.augment_image(image, k, mode)
    )
    flips = 0
    for seed, from_data in zip(seeds, in_data):
        eager = np.asarray(images.augment_image(image, seed, mode))
        np.testing.assert_array_equal(eager, from_data)
        again = images.augment_image(image, seed, mode)
        np.testing.assert_array_equal(again, eager)  # same seed, same image
        if mode == "none":
            np.testing.assert_array_equal(eager, image)
            continue
        plain = any(np.array_equal(eager, c) for c in candidates)
        flipped = any(np.array_equal(eager, c) for c in mirrored)
        assert plain or flipped
        flips += flipped and not plain
    if mode == "face":
        assert 8 <= flips <= 32  # about half of 40
    else:
        assert flips == 0  # a mirrored character is another character
    with pytest.raises(ValueError, match="augment"):
        images.augment_image(image, seed, "flip")


def test_image_bytes_ok_catches_truncation_and_garbage():
    grey = np.asarray(Image.fromarray(smooth_rgb()).convert("L"))
    for contents in (
        encode(grey, "PNG"),
        encode(smooth_rgb(), "JPEG"),
        encode(grey, "BMP"),
        encode(grey, "GIF"),
        pgm(grey),
    ):
        assert bool(images.image_bytes_ok(contents))
        cut = contents[: len(contents) * 3 // 4]
        eager, in_data = run_both(images.image_bytes_ok, tf.constant(cut))
        assert not eager and not in_data, contents[:4]
    for garbage in (b"", b"hello world", b"\x89PNG\r\n\x1a\n"):
        assert not bool(images.image_bytes_ok(garbage))



@pytest.mark.parametrize("mode", ["face", "characters"])
def test_augment_batch_draws_per_image(mode):
    image = RNG.uniform(0, 255, size=(16, 16, 1)).astype(np.float32)
    batch = np.repeat(image[None], 24, axis=0)
    seed = np.array([3, 9], np.int64)
    eager, in_data = run_both(
        lambda x, k: images.augment_batch(x, k, mode), batch, seed
    )
    np.testing.assert_array_equal(eager, in_data)
    shift = images.max_translation((16, 16))
    candidates = shifted_versions(image, shift)
    mirrored = shifted_versions(image[:, ::-1], shift)
    kinds = set()
    for out in eager:
        plain = [np.array_equal(out, c) for c in candidates]
        flipped = [np.array_equal(out, c) for c in mirrored]
        assert any(plain) or (mode == "face" and any(flipped))
        kinds.add((any(plain) and not any(flipped), tuple(plain + flipped)))
    assert len(kinds) > 5  # each image draws its own shift (and flip)


def test_decode_fast_path_falls_back_for_other_formats():
    rgb = smooth_rgb()
    png, bmp = encode(rgb, "PNG"), encode(rgb, "BMP")
    for contents, expect in ((png, "jpeg"), (bmp, "png"), (png, "png")):
        eager, in_data = run_both(
            lambda c: images.decode_image(c, 3, "x", expect),
            tf.constant(contents),
        )
        np.testing.assert_array_equal(eager, rgb)
        np.testing.assert_array_equal(in_data, rgb)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)File:.*cut"):
        images.decode_image(png[:-30], 3, "cut", "png")
    with pytest.raises(ValueError, match="expect"):
        images.decode_image(png, 3, "x", "webp")


def _sizes(contents_list):
    """header_size of each, eagerly and inside tf.data (which must agree)."""
    out = []
    for contents in contents_list:
        eager, in_data = run_both(images.header_size, tf.constant(contents))
        np.testing.assert_array_equal(eager, in_data)
        out.append(tuple(int(v) for v in eager))
    return out


def test_header_size_equals_pillows_size_for_every_format():
    rgb = smooth_rgb(20, 24)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))
    files = [encode(rgb, "PNG"), encode(rgb, "JPEG"), encode(rgb, "BMP"),
             encode(grey, "GIF"), pgm(grey[:7, :5]),
             png_of_size(3000, 2000)]
    # A top-down BMP stores its height negated.
    bottom_up = encode(grey, "BMP")
    top_down = bottom_up[:22] + (-20).to_bytes(4, "little", signed=True) + (
        bottom_up[26:])
    files.append(top_down)
    expected = [Image.open(io.BytesIO(f)).size for f in files[:-1]]
    assert _sizes(files) == expected + [(24, 20)]
    # Not an image, or cut inside the header: (0, 0), left to the decoder.
    assert _sizes([b"", b"hello", files[0][:16]]) == [(0, 0)] * 3


def _budget_error(contents, max_pixels, expect=None):
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        images.decode_image(contents, 1, "dir/x.png", expect, max_pixels)
    return caught.value.message


@pytest.mark.parametrize("expect", [None, "png"])
def test_pixel_budget_refuses_a_bomb_before_decoding_it(expect):
    bomb = png_of_size(12000, 12000)
    assert len(bomb) < 20_000  # 17 KB that decode to 144 million pixels
    message = _budget_error(bomb, images.MAX_IMAGE_PIXELS, expect)
    assert (
        "Image larger than the pixel budget of 67108864 (max_image_pixels)"
        in message and "--max_image_pixels" in message
    ), message
    assert "dir/x.png (12000x12000 pixels)" in message, message
    # Before decoding: data the decoder would reject is never looked at.
    garbage = png_of_size(30, 20, idat=b"not zlib data")
    message = _budget_error(garbage, 599, expect)
    assert "pixel budget of 599" in message and "(30x20 pixels)" in message
    with pytest.raises(tf.errors.InvalidArgumentError) as within:
        images.decode_image(garbage, 1, "dir/x.png", expect, 600)
    assert "budget" not in within.value.message  # the decoder's own error


def test_pixel_budget_is_width_times_height_in_tf_data_too():
    rgb = smooth_rgb(20, 24)
    for fmt, expect in (("PNG", "png"), ("JPEG", "jpeg"), ("BMP", None),
                        ("GIF", None)):
        contents = tf.constant(encode(rgb, fmt))
        for budget, fits in ((480, True), (479, False)):  # 24 x 20 = 480
            def decode(c):
                return images.decode_image(c, 3, "f", expect, budget)

            dataset = tf.data.Dataset.from_tensors(contents).map(decode)
            if fits:
                unlimited = images.decode_image(contents, 3, "f", expect, None)
                np.testing.assert_array_equal(next(iter(dataset)), unlimited)
            else:
                with pytest.raises(tf.errors.InvalidArgumentError,
                                   match=r"pixel budget of 479 .* File:"):
                    next(iter(dataset))
    with pytest.raises(ValueError, match=r"`max_pixels` must be None or a "):
        images.decode_image(encode(rgb, "BMP"), 3, "f", None, 0)
