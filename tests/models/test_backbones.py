"""Tests of ring_loss_tf.models.backbones against the architectures'
definitions.

SphereFace: parameter counts are recomputed from the layer list of
SphereFace's Table 2 (3×3 convs with bias, per-channel PReLU, a
fully-connected embedding), not read from Keras; the residual unit is
checked against x + f(x) computed by hand from the layer weights.

insightface's iResNet and MobileFaceNet: parameters and multiply-adds are
written out below layer by layer from arcface_torch's PyTorch definitions
(`backbones/iresnet.py`, `backbones/mobilefacenet.py`, with PyTorch's
output-size formula), and checked against the published figures:
arcface_torch's README gives FLOPs (r18 2.6G, r50 6.3G, r100 12.1G,
"mobilefacenet-0.45G"), not parameter counts; MobileFaceNets' Table 1
gives 0.99M parameters and 221M MAdds for the paper's network. One
IBasicBlock and the MobileFaceNet blocks are checked against float64 NumPy
convolutions padded as PyTorch pads.
"""

import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from ring_loss_tf.models import backbones
from ring_loss_tf import config as config_lib
from ring_loss_tf import export
from ring_loss_tf import layers
from ring_loss_tf.models import assembly
from ring_loss_tf import registry
from ring_loss_tf.training import trainer as trainer_lib
from ring_loss_tf.training import distribution
from tests import hidden_package
from tests.tiny_runs import tiny_kanji_config
from tests.tiny_runs import tiny_train


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


def _calibrate(model, images):
    """Moving averages := the statistics of `images`, as after training.

    A new iResNet's BatchNorms start at mean 0, variance 1, which does not
    normalise its N(0, 0.1) convs: in inference mode its embeddings reach
    1e6–1e8, where float32 sums differ between eager and XLA beyond a
    fixed tolerance and an export check compares noise. No-op without
    BatchNorm.
    """
    norms = [l for l in model.layers if isinstance(l, layers.BatchNorm)]
    for layer in norms:
        layer.momentum = 0.0
    model(images, training=True)
    for layer in norms:
        layer.momentum = 0.9


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
    model = registry.load(registry.BACKBONES[name])(
        input_shape=(24, 20, 1), embedding_dim=16, seed=0
    )
    x = np.random.default_rng(1).normal(size=(3, 24, 20, 1)).astype("f")
    _calibrate(model, x)
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


def test_gdc_embedding_block_is_a_global_depthwise_conv():
    model = backbones.small_cnn(embedding_dim=16, seed=0,
                                embedding_block="gdc")
    gdc = model.get_layer("gdc")
    # One 4×4 filter per channel over small_cnn's 4×4×64 map, no bias.
    assert isinstance(gdc, keras.layers.DepthwiseConv2D)
    assert tuple(gdc.kernel.shape) == (4, 4, 64, 1) and not gdc.use_bias
    assert not model.get_layer("embedding").use_bias
    assert model.get_layer("embedding_bn").gamma is not None
    assert model.output_shape == (None, 16)


# --------------------------------------------------------------------------
# insightface's backbones: iResNet and MobileFaceNet
# --------------------------------------------------------------------------

IRESNETS = {  # IBasicBlocks per stage (iresnet.py)
    "iresnet18": (2, 2, 2, 2),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}
INSIGHTFACE = (*IRESNETS, "mobilefacenet")


class _TorchCount:
    """Parameters, BatchNorm channels and multiply-adds of a PyTorch network
    on a square input, added module by module as its definition reads."""

    def __init__(self, size):
        self.size, self.params, self.bn_channels, self.macs = size, 0, 0, 0

    def conv(self, c_in, c_out, kernel, stride=1, padding=0, groups=1):
        # nn.Conv2d(..., bias=False): every conv of both files.
        self.size = (self.size + 2 * padding - kernel) // stride + 1
        weights = c_out * (c_in // groups) * kernel * kernel
        self.params += weights
        self.macs += weights * self.size**2

    def bn(self, channels):
        self.params += 2 * channels  # weight, bias (running stats: buffers)
        self.bn_channels += channels

    def prelu(self, channels):
        self.params += channels

    def linear(self, c_in, c_out, bias):
        self.params += c_in * c_out + (c_out if bias else 0)
        self.macs += c_in * c_out


def _iresnet_reference(blocks, embedding_dim=512):
    """arcface_torch's IResNet(IBasicBlock, blocks) on 112×112×3."""
    t = _TorchCount(112)
    t.conv(3, 64, 3, 1, 1)  # conv1
    t.bn(64)  # bn1
    t.prelu(64)  # prelu
    inplanes = 64
    for planes, num_blocks in zip((64, 128, 256, 512), blocks):
        for block in range(num_blocks):
            stride, size = (2 if block == 0 else 1), t.size
            t.bn(inplanes)  # bn1
            t.conv(inplanes, planes, 3, 1, 1)  # conv1
            t.bn(planes)  # bn2
            t.prelu(planes)  # prelu
            t.conv(planes, planes, 3, stride, 1)  # conv2
            t.bn(planes)  # bn3
            if stride != 1 or inplanes != planes:  # downsample
                out, t.size = t.size, size
                t.conv(inplanes, planes, 1, stride)
                t.bn(planes)
                assert t.size == out
            inplanes = planes
    t.bn(512)  # bn2
    t.linear(512 * t.size**2, embedding_dim, bias=True)  # fc, fc_scale 7·7
    t.bn(embedding_dim)  # features (its weight frozen at 1)
    return t


def _mobilefacenet_reference(scale=2, embedding_dim=512,
                             blocks=(1, 4, 6, 2)):
    """arcface_torch's MobileFaceNet(num_features, blocks, scale) on
    112×112×3 (`get_mbf`: blocks (1, 4, 6, 2), scale 2)."""
    t = _TorchCount(112)

    def conv_block(c_in, c_out, kernel=1, stride=1, padding=0, groups=1):
        t.conv(c_in, c_out, kernel, stride, padding, groups)
        t.bn(c_out)
        t.prelu(c_out)

    def linear_block(c_in, c_out, kernel=1, groups=1):
        t.conv(c_in, c_out, kernel, 1, 0, groups)
        t.bn(c_out)

    def depth_wise(c_in, c_out, stride, groups):
        conv_block(c_in, groups)
        conv_block(groups, groups, 3, stride, 1, groups=groups)
        linear_block(groups, c_out)

    c64, c128 = 64 * scale, 128 * scale
    conv_block(3, c64, 3, 2, 1)
    assert blocks[0] == 1
    conv_block(c64, c64, 3, 1, 1, groups=64)
    depth_wise(c64, c64, 2, 128)
    for _ in range(blocks[1]):
        depth_wise(c64, c64, 1, 128)
    depth_wise(c64, c128, 2, 256)
    for _ in range(blocks[2]):
        depth_wise(c128, c128, 1, 256)
    depth_wise(c128, c128, 2, 512)
    for _ in range(blocks[3]):
        depth_wise(c128, c128, 1, 256)
    conv_block(c128, 512)  # conv_sep
    linear_block(512, 512, 7, groups=512)  # GDC
    t.linear(512, embedding_dim, bias=False)
    t.bn(embedding_dim)
    return t


def _reference(name):
    if name in IRESNETS:
        return _iresnet_reference(IRESNETS[name])
    return _mobilefacenet_reference()


def _size(weights):
    return sum(int(np.prod(w.shape)) for w in weights)


@pytest.mark.parametrize("name", INSIGHTFACE)
def test_insightface_backbones_match_their_pytorch_definitions(name):
    model = registry.load(registry.BACKBONES[name])(seed=0)
    reference = _reference(name)
    assert model.input_shape == (None, 112, 112, 3)
    assert model.output_shape == (None, 512)
    # iresnet.py's `features` BatchNorm has a weight frozen at 1 (counted by
    # PyTorch's parameters()); here that BatchNorm has no scale at all.
    frozen = 512 if name in IRESNETS else 0
    assert _size(model.trainable_weights) == reference.params - frozen
    assert _size(model.non_trainable_weights) == 2 * reference.bn_channels
    assert backbones.multiply_adds(model) == reference.macs
    adds = [l for l in model.layers if isinstance(l, keras.layers.Add)]
    if name in IRESNETS:
        assert len(adds) == sum(IRESNETS[name])
        assert model.get_layer("feature_bn").input.shape == (None, 7, 7, 512)
        assert model.get_layer("embedding_bn").gamma is None
    else:
        assert len(adds) == 4 + 6 + 2  # the stride-1 bottlenecks
        assert tuple(model.get_layer("gdc").kernel.shape) == (7, 7, 512, 1)
        assert model.get_layer("conv2_dw").groups == 64
    # Each 3×3 stride-2 conv reads PyTorch's padding: 1 pixel on each side.
    for layer in model.layers:
        is_conv = isinstance(
            layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
        )
        if is_conv and layer.strides == (2, 2) and layer.kernel_size != (
            1, 1
        ):
            padding = model.get_layer(f"{layer.name}_pad")
            assert padding.padding == ((1, 1), (1, 1))
            assert layer.padding == "valid"


@pytest.mark.parametrize(
    "name, gmacs, mparams",
    [("iresnet18", 2.6, 24.0), ("iresnet50", 6.3, 43.6),
     ("iresnet100", 12.1, 65.2)],
)
def test_iresnet_multiply_adds_are_the_published_figures(name, gmacs,
                                                         mparams):
    reference = _iresnet_reference(IRESNETS[name])
    # arcface_torch's README, "ViT For Face Recognition" table (FLOPs, G).
    assert round(reference.macs / 1e9, 1) == gmacs
    # Not published there: the figures of backbones.py's docstrings.
    assert round(reference.params / 1e6, 1) == mparams


def test_mobilefacenet_matches_the_published_figures():
    # arcface_torch's README calls the default "mobilefacenet-0.45G" (its
    # flops.py counts BatchNorm, PReLU and sums too, conv and FC here).
    assert _mobilefacenet_reference().macs == pytest.approx(0.45e9, rel=0.03)
    # The paper's network (Table 1, 128-d): 0.99M parameters, 221M MAdds.
    paper = _mobilefacenet_reference(scale=1, embedding_dim=128)
    assert paper.params == pytest.approx(0.99e6, rel=0.015)
    assert paper.macs == pytest.approx(221e6, rel=0.005)
    model = backbones.mobilefacenet(scale=1, embedding_dim=128)
    assert _size(model.trainable_weights) == paper.params
    assert backbones.multiply_adds(model) == paper.macs
    assert model.output_shape == (None, 128)


def test_mobilefacenet_refuses_a_bad_scale():
    for scale in (0, 1.5, True):
        with pytest.raises(ValueError, match=rf"scale={scale!r}"):
            backbones.mobilefacenet(scale=scale)


def _np_conv(x, kernel, stride, padding, groups=1):
    """float64 convolution of NHWC `x` with a Keras kernel `(k_h, k_w,
    c_in / groups, c_out)`, zero-padded by `padding` ((top, bottom), (left,
    right)) first: PyTorch's padding p is ((p, p), (p, p))."""
    x = np.pad(x, ((0, 0), *padding, (0, 0)))
    k_h, k_w, c_in, c_out = kernel.shape
    out_h = (x.shape[1] - k_h) // stride + 1
    out_w = (x.shape[2] - k_w) // stride + 1
    per_group = c_out // groups
    out = np.zeros((x.shape[0], out_h, out_w, c_out))
    for g in range(groups):
        inputs = x[..., g * c_in:(g + 1) * c_in]
        outputs = slice(g * per_group, (g + 1) * per_group)
        for i in range(k_h):
            for j in range(k_w):
                patch = inputs[:, i:i + stride * out_h:stride,
                               j:j + stride * out_w:stride]
                out[..., outputs] += patch @ kernel[i, j, :, outputs]
    return out


def _np_depthwise(x, kernel, stride, padding):
    """float64 depthwise convolution, kernel `(k_h, k_w, c, 1)`."""
    x = np.pad(x, ((0, 0), *padding, (0, 0)))
    k_h, k_w = kernel.shape[:2]
    out_h = (x.shape[1] - k_h) // stride + 1
    out_w = (x.shape[2] - k_w) // stride + 1
    out = 0.0
    for i in range(k_h):
        for j in range(k_w):
            patch = x[:, i:i + stride * out_h:stride,
                      j:j + stride * out_w:stride]
            out = out + patch * kernel[i, j, :, 0]
    return out


def _weights_of(model):
    """Functions reading one layer's weights as float64, by layer name."""

    def value(name, attribute="kernel"):
        variable = getattr(model.get_layer(name), attribute)
        return np.asarray(variable.numpy(), np.float64)

    def bn(x, name):
        layer = model.get_layer(name)
        y = (x - value(name, "moving_mean")) / np.sqrt(
            value(name, "moving_variance") + layer.epsilon
        )
        if layer.gamma is not None:
            y = y * value(name, "gamma")
        return y + value(name, "beta")

    def prelu(x, name):
        return np.where(x > 0, x, value(name, "alpha") * x)

    return value, bn, prelu


def _randomize_norms_and_slopes(model, seed):
    """BatchNorm statistics and affine weights, PReLU slopes: random, so
    that none of them is an identity the reference could get wrong."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNorm):
            c = layer.moving_mean.shape[0]
            for variable, values in (
                (layer.moving_mean, rng.normal(0, 0.5, c)),
                (layer.moving_variance, rng.uniform(0.5, 2.0, c)),
                (layer.gamma, rng.uniform(0.5, 1.5, c)),
                (layer.beta, rng.normal(0, 0.2, c)),
            ):
                if variable is not None:
                    variable.assign(values.astype("float32"))
        elif isinstance(layer, keras.layers.PReLU):
            layer.alpha.assign(
                rng.uniform(0, 0.5, layer.alpha.shape).astype("float32")
            )


TORCH_PADDING = ((1, 1), (1, 1))
SAME_AT_STRIDE_2 = ((0, 1), (0, 1))  # Keras "same" on an even size


def _assert_close(got, expected):
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)


def test_ibasic_block_matches_numpy_with_pytorch_padding():
    model = backbones.iresnet18(input_shape=(16, 16, 3), seed=0)
    _randomize_norms_and_slopes(model, 1)
    probe = keras.Model(
        model.input,
        [model.get_layer("layer1_1_add").output,
         model.get_layer("layer2_0_add").output],
    )
    x = np.random.default_rng(2).normal(size=(2, 16, 16, 3)).astype("f")
    before, after = (
        np.asarray(t, np.float64) for t in probe(x, training=False)
    )
    assert before.shape == (2, 8, 8, 64) and after.shape == (2, 4, 4, 128)
    kernel, bn, prelu = _weights_of(model)

    def block(h, stride_2_padding):
        """layer2[0] of iresnet.py: stride 2, with its downsample."""
        y = bn(h, "layer2_0_bn1")
        y = _np_conv(y, kernel("layer2_0_conv1"), 1, TORCH_PADDING)
        y = prelu(bn(y, "layer2_0_bn2"), "layer2_0_prelu")
        y = _np_conv(y, kernel("layer2_0_conv2"), 2, stride_2_padding)
        y = bn(y, "layer2_0_bn3")
        shortcut = _np_conv(
            h, kernel("layer2_0_downsample_conv"), 2, ((0, 0), (0, 0))
        )
        return y + bn(shortcut, "layer2_0_downsample_bn")

    expected = block(before, TORCH_PADDING)
    _assert_close(after, expected)
    # Keras' "same" would sample other pixels: the check tells them apart.
    other = block(before, SAME_AT_STRIDE_2)
    assert np.abs(other - expected).max() > 0.1 * np.abs(expected).max()


def test_mobilefacenet_blocks_and_gdc_match_numpy():
    model = backbones.mobilefacenet(input_shape=(32, 32, 3), seed=0)
    _randomize_norms_and_slopes(model, 1)
    names = ("conv1_prelu", "bottleneck2_add", "conv_sep_prelu")
    probe = keras.Model(
        model.input,
        [model.get_layer(n).output for n in names] + [model.output],
    )
    x = np.random.default_rng(2).normal(size=(2, 32, 32, 3)).astype("f")
    stem, blocks, last_map, embeddings = (
        np.asarray(t, np.float64) for t in probe(x, training=False)
    )
    kernel, bn, prelu = _weights_of(model)

    def conv_block(h, name, stride=1, padding=((0, 0), (0, 0)), groups=1):
        h = _np_conv(h, kernel(name), stride, padding, groups)
        return prelu(bn(h, f"{name}_bn"), f"{name}_prelu")

    def bottleneck(h, name, stride):
        """insightface's DepthWise (residual at stride 1)."""
        y = conv_block(h, f"{name}_expand")
        y = _np_depthwise(
            y, kernel(f"{name}_dw", "kernel"), stride, TORCH_PADDING
        )
        y = prelu(bn(y, f"{name}_dw_bn"), f"{name}_dw_prelu")
        y = _np_conv(y, kernel(f"{name}_project"), 1, ((0, 0), (0, 0)))
        y = bn(y, f"{name}_project_bn")
        return y + h if stride == 1 else y

    # The 3×3 conv in 64 groups of 2 channels (scale 2), a stride-2 and a
    # residual bottleneck.
    h = conv_block(stem, "conv2_dw", padding=TORCH_PADDING, groups=64)
    h = bottleneck(h, "bottleneck1", 2)
    _assert_close(blocks, bottleneck(h, "bottleneck2", 1))
    # GDC: a 2×2 depthwise conv over the 2×2 map, BN, FC, BN.
    assert last_map.shape == (2, 2, 2, 512)
    y = _np_depthwise(last_map, kernel("gdc"), 1, ((0, 0), (0, 0)))
    y = bn(y, "gdc_bn").reshape(2, 512) @ kernel("embedding")
    _assert_close(embeddings, bn(y, "embedding_bn"))


@pytest.fixture(scope="module")
def tiny_kanji(tmp_path_factory):
    return tiny_kanji_config(tmp_path_factory.mktemp("kanji"))


@pytest.mark.parametrize("name", INSIGHTFACE)
def test_one_training_step_on_the_embedded_set(name, tiny_kanji, tmp_path):
    """`train.py --backbone=NAME` on the embedded set, one step of batch 2:
    the registry's 112×112×3 and embedding block, grey characters as RGB."""
    lines = []
    result = tiny_train(
        tmp_path, tiny_kanji, backbone=name, steps=1, batch_size=2,
        warmup_steps=0, print_fn=lines.append,
    )
    # R ("auto") starts at the norm the first step sees: the last
    # BatchNorm maps each of the 512 features of a batch of two to ±1
    # (γ = 1, β = 0), so √512.
    first_r = float(re.search(r" R ([0-9.]+) ", lines[1]).group(1))
    assert first_r == pytest.approx(np.sqrt(512), rel=1e-2), lines[1]
    config = result.config
    entry = registry.BACKBONES[name]
    assert (config.data.image_size, config.data.channels) == ((112, 112), 3)
    assert config.model.embedding_block == entry.embedding_block
    assert result.step == 1
    assert all(np.isfinite(v) for v in result.last.values())
    trained = result.trainer.models.embedding_model
    initial = registry.load(entry)(
        seed=config.run.seed, embedding_block=config.model.embedding_block
    )
    # Equal seeds give equal initial weights: the step moved them.
    for layer in ("conv1", "embedding_bn"):
        assert not np.allclose(
            trained.get_layer(layer).weights[0].numpy(),
            initial.get_layer(layer).weights[0].numpy(),
        ), layer


def test_auto_radius_starts_at_the_norm_the_first_step_sees():
    config = config_lib.make(
        num_classes=4, backbone="iresnet18", image_size=(32, 32), seed=0
    )
    trainer = trainer_lib.Trainer(
        distribution.build_strategy(["/cpu:0"]),
        lambda: assembly.build_models(config),
        global_batch_size=4,
        jit=False,
    )
    images = tf.random.stateless_normal((4, 32, 32, 3), (0, 1))
    model = trainer.models.embedding_model
    before = [v.numpy() for v in model.non_trainable_variables]
    trainer.initialize_radius(images)
    # The BatchNorm statistics the forward pass moved are put back.
    for value, v in zip(before, model.non_trainable_variables):
        np.testing.assert_array_equal(value, v.numpy(), err_msg=v.path)
    embeddings = model(images, training=True)
    norms = np.linalg.norm(embeddings.numpy().astype(np.float64), axis=1)
    assert trainer.radius() == pytest.approx(norms.mean(), rel=1e-5)
    # Inference mode at initialisation is far off (what R once started at).
    inference = np.linalg.norm(model(images, training=False).numpy(), axis=1)
    assert not inference.mean() == pytest.approx(norms.mean(), rel=0.5)


_HIDDEN_WORKER = hidden_package.PREAMBLE + textwrap.dedent("""
    import numpy as np
    import tensorflow as tf
    serving = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
    result = serving(images=tf.constant(np.load(sys.argv[2])))
    np.save(sys.argv[3], result["embedding"].numpy())
    """)


# iresnet100 is left out: the layers of iresnet18, 45 s to export and load.
@pytest.mark.parametrize("name", ["iresnet18", "iresnet50", "mobilefacenet"])
def test_export_serves_without_the_package(name, tmp_path):
    model = registry.load(registry.BACKBONES[name])(seed=0)
    images = np.random.default_rng(0).integers(
        0, 256, (3, 112, 112, 3), np.uint8
    )
    x = (images.astype("float32") - 127.5) / 128.0
    _calibrate(model, x)
    path = export.export_saved_model(model, tmp_path / "export")
    np.save(tmp_path / "in.npy", images)
    worker = subprocess.run(
        [sys.executable, "-c", _HIDDEN_WORKER, str(path),
         str(tmp_path / "in.npy"), str(tmp_path / "out.npy")],
        cwd=tmp_path, env=hidden_package.env(tmp_path), capture_output=True,
        text=True,
    )
    assert worker.returncode == 0, worker.stderr[-3000:]
    served = np.load(tmp_path / "out.npy")
    expected = model(x, training=False).numpy()
    assert served.shape == (3, 512) and np.all(np.isfinite(expected))
    np.testing.assert_allclose(served, expected, rtol=1e-4, atol=1e-4)
