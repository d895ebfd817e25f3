"""Tests of ring_loss_tf.embedder: model loading and input adaptation.

The tiny model of tests/eval_world.py (with a layer class defined only
there) is exported; every embedding is checked against the Keras model
called directly on images normalised in the test.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ring_loss_tf import images
from ring_loss_tf import embedder
from tests import eval_world

SIZE = eval_world.SIZE


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return eval_world.build_world(tmp_path_factory.mktemp("eval"))


def _embedder(world, which="float", **kwargs):
    path = world["root"] / ("run" if which == "float" else "uint8_model")
    return embedder.load_embedder(path, **kwargs)


def test_resolves_model_dir_and_reads_the_signature(world):
    e = _embedder(world)
    assert e.name == "run"  # named after the model_dir, not "export"
    assert e.describe()["image_size"] == [SIZE, SIZE]
    assert e.channels == 1 and e.input_dtype == tf.float32
    batch = np.stack(list(world["images"].values())[:9])
    np.testing.assert_allclose(
        e(batch), world["reference"](batch), rtol=1e-5, atol=1e-5
    )


def test_uint8_signature_gets_pixels_and_channels_adapted(world):
    e = _embedder(world, "uint8", batch_size=4)
    assert e.input_dtype == tf.uint8 and e.channels == 3
    assert e.output_key == "embedding"  # chosen among two outputs
    batch = np.stack(list(world["images"].values())[:9])  # grey, 1 channel
    np.testing.assert_allclose(
        e(batch), world["reference"](batch), rtol=1e-5, atol=1e-5
    )
    other = _embedder(world, "uint8", output_key="normalized_embedding")
    got = other(batch)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, rtol=1e-5)


def test_colour_images_become_pillow_grey_and_sizes_are_adapted(world):
    e = _embedder(world)
    rgb = np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE, 3))
    rgb = rgb.astype(np.uint8)
    grey = np.stack([np.asarray(Image.fromarray(x).convert("L")) for x in rgb])
    adapted = e.adapt(rgb) * 128 + 127.5
    # Pillow rounds in fixed point: at most one grey level apart.
    assert np.max(np.abs(adapted[..., 0] - grey)) <= 1
    # Other sizes are resized as the training pipeline resizes.
    big = np.random.default_rng(2).integers(0, 256, (3, 24, 20, 1))
    big = big.astype(np.uint8)
    want = np.stack([images.resize_image(x, (SIZE, SIZE)) for x in big])
    np.testing.assert_allclose(e.adapt(big) * 128 + 127.5, want)


def test_flip_sums_image_and_mirror(world):
    e = _embedder(world)
    batch = np.stack(list(world["images"].values())[:7])
    want = world["reference"](batch) + world["reference"](batch[:, :, ::-1])
    np.testing.assert_allclose(e(batch, flip=True), want, rtol=1e-5, atol=1e-5)


def test_model_errors(world, tmp_path):
    with pytest.raises(FileNotFoundError, match="Model not found"):
        embedder.resolve_model_path(tmp_path / "nothing")
    (tmp_path / "train_dir").mkdir()
    (tmp_path / "train_dir" / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="without an exported model"):
        embedder.resolve_model_path(tmp_path / "train_dir")
    with pytest.raises(FileNotFoundError, match="neither a SavedModel"):
        embedder.resolve_model_path(tmp_path)
    with pytest.raises(ValueError, match="no output 'logits'"):
        _embedder(world, "uint8", output_key="logits")
    with pytest.raises(ValueError, match="no signature 'predict'"):
        _embedder(world, signature="predict")
    a, b = keras.Input((4, 4, 1)), keras.Input((4, 4, 1))
    two = keras.Model([a, b], keras.layers.Add()([a, b]))
    with pytest.raises(ValueError, match="2 inputs"):
        embedder.Embedder(two)
    with pytest.raises(ValueError, match="input_normalization"):
        embedder.Embedder(world["model"], input_normalization="imagenet")


def test_large_images_are_embedded_in_calls_of_bounded_pixels():
    """512 images per call at 32×32, 64 at 112×112 (an iResNet's
    activations: ~55 MB per image); the split batches give the model's
    own outputs."""
    inputs = keras.Input((None, None, 1))
    pooled = keras.layers.GlobalAveragePooling2D()(inputs)
    model = keras.Model(inputs, keras.layers.Dense(
        3, kernel_initializer=keras.initializers.GlorotUniform(seed=0))(pooled))
    emb = embedder.Embedder(model, batch_size=512)
    assert emb.calls_of(32, 32) == 512
    assert emb.calls_of(112, 112) == 64
    assert emb.calls_of(4000, 4000) == 1
    pixels = np.random.default_rng(0).integers(0, 256, (70, 112, 112, 1),
                                               np.uint8)
    got, _ = emb.embed_with_plain(pixels, flip=False)
    want = model((pixels.astype(np.float64) - 127.5) / 128.0).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
