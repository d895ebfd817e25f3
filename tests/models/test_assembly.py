"""Tests of ring_loss_tf.models.assembly: building and rebuilding models from a
config.

References: the layers each setting must produce, the variables a
hand-made list says weight decay covers, a model_dir written by release
0.1.0 (rebuilt and restored), and a head added by a user through the
registry (the README's "Extending" example, run as written).
"""

import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from ring_loss_tf import config as config_lib
from ring_loss_tf.layers import heads
from ring_loss_tf import layers
from ring_loss_tf.models import assembly
from ring_loss_tf import registry
from ring_loss_tf.errors import ConfigError
from tests.tiny_runs import model_config
from tests.tiny_runs import model_fn

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"
RELEASE_RUN = FIXTURES / "release_0_1_run"


@pytest.mark.parametrize("head", list(registry.HEADS))
def test_every_registered_head_builds_and_trains(head):
    config = config_lib.replace(model_config(head), center_loss_weight=None)
    built = assembly.build_models(config)
    images = tf.random.stateless_normal((4, 16, 16, 1), (0, 1))
    labels = tf.constant([0, 1, 2, 6])
    logits, embeddings = built.train_model([images, labels], training=True)
    assert logits.shape == (4, 7) and embeddings.shape == (4, 12)
    assert logits.dtype == "float32"
    center = [l for l in built.train_model.layers
              if isinstance(l, layers.CenterLoss)]
    assert bool(center) == (head == "centerloss")
    assert isinstance(built.ring, layers.RingLoss)


@pytest.mark.parametrize("name", list(registry.BACKBONES))
def test_every_registered_backbone_is_a_function(name):
    function = registry.load(registry.BACKBONES[name])
    assert callable(function) and function.__name__ == name


def test_equal_seeds_give_equal_models_and_other_seeds_do_not():
    a = model_fn("arcface", seed=3)().train_model.get_weights()
    b = model_fn("arcface", seed=3)().train_model.get_weights()
    c = model_fn("arcface", seed=4)().train_model.get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_without_num_classes_is_a_config_error():
    with pytest.raises(ConfigError, match=r"num_classes=None: is not set"):
        assembly.build_models(config_lib.make())


def test_weight_decay_only_on_kernels():
    built = model_fn("centerloss", 0.01)()
    decayed = {v.path for v in assembly.decayed_variables(built.train_model)}
    kernels = {
        v.path
        for v in built.train_model.trainable_variables
        if v.path.endswith("/kernel")
    }
    assert decayed == kernels and decayed
    for layer in built.train_model.layers + built.embedding_model.layers:
        if isinstance(
            layer, (layers.RingLoss, layers.CenterLoss, keras.layers.PReLU)
        ):
            assert not {v.path for v in layer.weights} & decayed
    assert not any(p.endswith(("bias", "radius", "centers", "alpha"))
                   for p in decayed)


def test_a_release_0_1_model_dir_is_rebuilt_and_restored():
    built = assembly.load_training_models(RELEASE_RUN)
    reader = tf.train.load_checkpoint(str(RELEASE_RUN))
    assert isinstance(built.head, layers.ArcFace)
    assert built.embedding_model.output_shape == (None, 8)
    shapes = reader.get_variable_to_shape_map()
    # R is the one scalar among the trained variables.
    (radius,) = [n for n, shape in shapes.items() if shape == []
                 and n.startswith("optimizer/_trainable_variables/")]
    assert float(built.ring.radius.numpy()) == pytest.approx(
        float(reader.get_tensor(radius))
    )
    assert float(reader.get_tensor(radius)) != 1.0  # not the initial value
    assert int(built.head.iterations.numpy()) == 2


def test_load_training_models_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        assembly.load_training_models(tmp_path)
    config_lib.save(config_lib.make(num_classes=3), tmp_path)
    with pytest.raises(FileNotFoundError, match="has no checkpoint yet"):
        assembly.load_training_models(tmp_path)


def test_a_head_added_through_the_registry(monkeypatch):
    """The README's "Extending" example: one function, one registry line."""

    def cosine_softmax_head(features, labels, model, num_classes, seed):
        """Normalised-weight softmax with a fixed scale (NormFace)."""
        head = heads.CosineClassifier(num_classes, margin_function="none",
                                      margin_arguments={"scale": 30.0},
                                      name="cosine_softmax")
        return head([features, labels]), head

    monkeypatch.setitem(registry.HEADS, "cosine_softmax",
                        registry.Head(cosine_softmax_head))
    config = config_lib.replace(model_config(), head="cosine_softmax")
    config_lib.check(config)
    built = assembly.build_models(config)
    assert built.head.name == "cosine_softmax"
    images = tf.random.stateless_normal((3, 16, 16, 1), (1, 2))
    logits, embeddings = built.train_model([images, tf.constant([0, 1, 2])])
    kernel = built.head.kernel.numpy().astype(np.float64)
    x = embeddings.numpy().astype(np.float64)
    cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
        kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    )
    np.testing.assert_allclose(logits.numpy(), 30.0 * cos, atol=1e-4)


def test_a_registered_margin_head_is_not_sharded(monkeypatch):
    """`build_models` refuses it with the flag's message, not a KeyError."""

    def my_margin_head(features, labels, model, num_classes, seed):
        head = heads.CosineClassifier(num_classes, margin_function="cosface",
                                      name="my_margin")
        return head([features, labels]), head

    monkeypatch.setitem(registry.HEADS, "my_margin",
                        registry.Head(my_margin_head, margin=True))
    config = config_lib.replace(model_config(), head="my_margin",
                                head_sharding=True)
    with pytest.raises(ConfigError, match=r"^head_sharding=True: the "
                       r"my_margin head has no margin function for the "
                       r"sharded head to call; shard a margin head "
                       r"\(asoftmax/cosface/arcface\), or omit it$"):
        assembly.build_models(config)


def test_a_backbone_added_through_the_registry(monkeypatch):
    def tiny_net(input_shape, embedding_dim, *, seed=None,
                 embedding_block="fc"):
        images = keras.Input(input_shape)
        x = keras.layers.Flatten()(images)
        x = keras.layers.Dense(
            embedding_dim,
            kernel_initializer=keras.initializers.GlorotUniform(seed=seed),
        )(x)
        return keras.Model(images, x, name="tiny_net")

    monkeypatch.setitem(registry.BACKBONES, "tiny_net", tiny_net)
    config = config_lib.replace(model_config(), backbone="tiny_net")
    config_lib.check(config)
    built = assembly.build_models(config)
    assert built.embedding_model.name == "tiny_net"
    assert built.embedding_model.count_params() == 16 * 16 * 12 + 12
