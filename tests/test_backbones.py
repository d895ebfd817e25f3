"""Tests of ring_loss_tf.backbones against the SphereFace architecture table.

Parameter counts are recomputed from the layer list of SphereFace's Table 2
(3×3 convs with bias, per-channel PReLU, a fully-connected embedding), not
read from Keras; the residual unit is checked against x + f(x) computed by
hand from the layer weights.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from ring_loss_tf import backbones
from ring_loss_tf import layers
from ring_loss_tf import registry


def _conv_params(c_in, c_out):
    return 9 * c_in * c_out + c_out + c_out  # kernel + bias + PReLU slopes


def _sphereface_params(units, input_shape, embedding_dim):
    height, width, channels = input_shape
    total, c_in = 0, channels
    for filters, num_units in zip((64, 128, 256, 512), units):
        total += _conv_params(c_in, filters)
        total += 2 * num_units * _conv_params(filters, filters)
        c_in = filters
        height, width = -(-height // 2), -(-width // 2)
    return total + height * width * 512 * embedding_dim + embedding_dim


def _convs(model):
    return [l for l in model.layers if isinstance(l, keras.layers.Conv2D)]


@pytest.mark.parametrize(
    "function, units, depth",
    [
        (backbones.sphereface20, (1, 2, 4, 1), 20),
        (backbones.sphereface4, (0, 0, 0, 0), 4),
    ],
)
def test_sphereface_matches_table(function, units, depth):
    model = function(seed=0)
    assert model.input_shape == (None, 112, 96, 3)
    assert model.output_shape == (None, 512)
    assert len(_convs(model)) == depth
    assert model.count_params() == _sphereface_params(
        units, (112, 96, 3), 512
    )
    # PReLU after every conv, no BatchNorm anywhere, a 7×6×512 final map.
    kinds = [type(l).__name__ for l in model.layers]
    assert kinds.count("PReLU") == depth
    assert not any("Normalization" in k for k in kinds)
    assert model.get_layer("flatten").input.shape[1:] == (7, 6, 512)
    assert [l.strides for l in _convs(model)].count((2, 2)) == 4


def test_sphereface20_has_28m_parameters_with_casia_head():
    # The paper's setting: SphereFace-20 with CASIA-WebFace's 10,572-way
    # classifier, 28.1M parameters in all.
    total = _sphereface_params((1, 2, 4, 1), (112, 96, 3), 512) + (
        512 * 10572
    )
    assert total == pytest.approx(28.1e6, rel=0.005)
    assert backbones.sphereface20().count_params() + 512 * 10572 == total


def test_residual_unit_is_identity_plus_two_prelu_convs():
    model = backbones.sphereface4(input_shape=(16, 16, 3), embedding_dim=8)
    full = backbones.sphereface20(
        input_shape=(16, 12, 3), embedding_dim=8, seed=1
    )
    x = np.random.default_rng(0).normal(size=(2, 16, 12, 3)).astype("f")
    probe = keras.Model(
        full.input,
        [full.get_layer("conv1_1_prelu").output,
         full.get_layer("conv1_res1").output],
    )
    before, after = (t.numpy().astype(np.float64) for t in probe(x))

    def conv_prelu(h, conv, prelu):
        kernel, bias = (w.numpy().astype(np.float64) for w in conv.weights)
        out = tf.nn.conv2d(h, kernel, 1, "SAME").numpy() + bias
        alpha = prelu.weights[0].numpy().astype(np.float64)
        return np.where(out > 0, out, alpha * out)

    h = conv_prelu(before, full.get_layer("conv1_2"),
                   full.get_layer("conv1_2_prelu"))
    h = conv_prelu(h, full.get_layer("conv1_3"),
                   full.get_layer("conv1_3_prelu"))
    np.testing.assert_allclose(after, before + h, atol=1e-4)
    assert model.output_shape == (None, 8)


def test_small_cnn_downsamples_first_and_is_small():
    model = backbones.small_cnn()
    convs = _convs(model)
    assert model.input_shape == (None, 32, 32, 1)
    assert model.output_shape == (None, 128)
    assert convs[0].strides == (2, 2)  # the first conv halves 32×32
    widths = (16, 32, 64)
    expected, c_in = 0, 1
    for w in widths:
        expected += _conv_params(c_in, w) + _conv_params(w, w)
        c_in = w
    expected += 4 * 4 * 64 * 128 + 128
    assert model.count_params() == expected


def test_seeds_make_equal_and_distinct_weights():
    a = backbones.small_cnn(seed=7).get_weights()
    b = backbones.small_cnn(seed=7).get_weights()
    c = backbones.small_cnn(seed=8).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])
    # Two convs of equal shape inside one residual unit get distinct draws.
    model = backbones.sphereface20(input_shape=(16, 16, 1), seed=3)
    k2 = model.get_layer("conv1_2").kernel.numpy()
    k3 = model.get_layer("conv1_3").kernel.numpy()
    assert not np.array_equal(k2, k3)
    # N(0, 0.01) inside residual units, as the Caffe model.
    assert np.std(k2) == pytest.approx(0.01, rel=0.1)


@pytest.mark.parametrize("name", list(registry.BACKBONES))
def test_forward_eager_and_compiled_agree(name):
    model = registry.load(registry.BACKBONES[name])(input_shape=(24, 20, 1), embedding_dim=16,
                                seed=0)
    x = np.random.default_rng(1).normal(size=(3, 24, 20, 1)).astype("f")
    eager = model(x).numpy()
    compiled = tf.function(model, jit_compile=True)(x).numpy()
    assert eager.shape == (3, 16) and np.all(np.isfinite(eager))
    np.testing.assert_allclose(compiled, eager, rtol=1e-4, atol=1e-4)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match=r"input_shape.*\(32, 32\)"):
        backbones.small_cnn(input_shape=(32, 32))
    with pytest.raises(ValueError, match=r"embedding_dim=0"):
        backbones.sphereface20(embedding_dim=0)
    with pytest.raises(ValueError, match=r"widths=\(8, 8\)"):
        backbones.small_cnn(widths=(8, 8))


@pytest.mark.parametrize("name", ["small_cnn", "sphereface4"])
def test_bn_embedding_block_normalises_each_dimension(name):
    shape = (32, 32, 1) if name == "small_cnn" else (24, 20, 3)
    model = registry.load(registry.BACKBONES[name])(
        input_shape=shape, embedding_dim=16, seed=0, embedding_block="bn"
    )
    norms = [l for l in model.layers if isinstance(l, layers.BatchNorm)]
    assert [l.name for l in norms] == ["feature_bn", "embedding_bn"]
    assert norms[1].gamma is None  # insightface's frozen scale of 1
    images = np.random.default_rng(0).normal(size=(12, *shape))
    embeddings = model(images.astype("float32"), training=True).numpy()
    np.testing.assert_allclose(embeddings.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(embeddings.var(0), 1.0, rtol=1e-2)


def test_unknown_embedding_block_is_refused():
    with pytest.raises(ValueError, match=r"`embedding_block` must be one of"):
        backbones.small_cnn(embedding_block="layernorm")
