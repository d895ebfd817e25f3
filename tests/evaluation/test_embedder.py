"""Tests of ring_loss_tf.evaluation.embedder: model loading and input
adaptation.

The tiny model of tests/eval_world.py (with a layer class defined only
there) is exported; every embedding is checked against the Keras model
called directly on images normalised in the test. SavedModels crafted to
hold an operation that reaches outside the model (tests/saved_models.py)
must be refused before anything of them is loaded.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from ring_loss_tf.data import images
from ring_loss_tf.evaluation import embedder
from tests import eval_world
from tests import saved_models

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


# --------------------------------------------------------------------------
# A SavedModel is a program: what load_embedder agrees to load


def _all_ops(path):
    """Every op name in saved_model.pb, read here from the proto."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((path / "saved_model.pb").read_bytes())
    ops = set()
    for meta_graph in proto.meta_graphs:
        ops.update(n.op for n in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            ops.update(n.op for n in function.node_def)
    return ops


@pytest.mark.parametrize("kind", saved_models.KINDS)
def test_a_model_with_an_outside_operation_is_refused_before_loading(
    tmp_path, monkeypatch, kind
):
    witness = tmp_path / "witness"
    if kind in ("read_file_in_loop", "restore_v2"):
        witness.write_text("a file the model would read")
    path = saved_models.save_crafted(tmp_path / "model", kind, witness)
    op = saved_models.OPS[kind]
    assert op in _all_ops(path)  # the crafted model holds it
    before = witness.exists()

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    with monkeypatch.context() as patch:
        patch.setattr(embedder.tf.saved_model, "load", no_load)
        with pytest.raises(
            embedder.UnsafeModelError,
            match=rf"^Refusing to load the SavedModel "
                  rf"{re.escape(str(tmp_path))}/model: its "
                  rf"graph holds a {op} operation \(function '[^']+', node "
                  rf"'[^']+'\), which .*; a SavedModel is a program and "
                  r"would run it\. If you trust where the model comes from, "
                  r"pass --trust_saved_model \(trust_saved_model=True\)\.$",
        ) as caught:
            embedder.load_embedder(path)
    assert "\n" not in str(caught.value)
    assert witness.exists() == before
    if kind == "write_file":
        # Trusted, it loads and runs what it holds: the check is what
        # stopped it.
        trusted = embedder.load_embedder(path, trust_saved_model=True)
        images = np.full((1, 4, 4, 3), 10, np.uint8)
        np.testing.assert_allclose(trusted(images), [[10.0, 10.0, 10.0]])
        assert witness.read_text() == "written by the model"


def test_plain_models_load_and_their_saver_ops_are_exempt(world, tmp_path):
    path = saved_models.save_plain(tmp_path / "plain")
    images = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3))
    images = images.astype(np.uint8)
    got = embedder.load_embedder(path)(images)
    np.testing.assert_allclose(got, images.mean(axis=(1, 2)), rtol=1e-6)
    for model in (path, world["root"] / "run" / "export",
                  world["root"] / "uint8_model"):
        # Every SavedModel has a saver that writes and reads checkpoints
        # (for TF Serving); the check leaves those functions alone.
        assert {"SaveV2", "RestoreV2"} <= _all_ops(model)
        listed = {op for op, _ in embedder.saved_model_ops(model)}
        assert not listed & {"SaveV2", "RestoreV2", "MergeV2Checkpoints"}
        embedder.check_saved_model(model)


def test_a_saved_model_pb_that_is_not_one_is_one_line(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "saved_model.pb").write_bytes(b"\xff\xfe not a proto")
    with pytest.raises(ValueError, match=r"^Could not load the SavedModel "
                       r".*/m: its saved_model\.pb is not a SavedModel"):
        embedder.load_embedder(tmp_path / "m")


def test_every_unsafe_op_is_a_tensorflow_op():
    # A misspelt name would leave its operation unchecked.
    from tensorflow.python.framework import op_def_registry
    from tensorflow.python.ops import script_ops  # noqa: F401 (PyFunc)

    try:  # the RPC ops register when their module is imported
        from tensorflow.distribute.experimental import rpc  # noqa: F401
    except ImportError:
        pass
    missing = [op for op in embedder.UNSAFE_OPS
               if op_def_registry.get(op) is None]
    assert missing == []
