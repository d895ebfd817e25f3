"""Layers against float64 NumPy references written here from the formulas.

The references deliberately take another route than the layers: ring loss
gradients use the closed forms ∂L_R/∂R = −(λ/m)·Σ(‖F_i‖ − R) and
∂L_R/∂F_i = (λ/m)·(1 − R/‖F_i‖)·F_i (from ∂‖F‖/∂F = F/‖F‖), the other
gradients are central finite differences of the float64 formulas. The heads
have their own module, tests/layers/test_heads.py; the Keras integration tests
here (fit, `.keras` files, mixed precision, replicas) run the feature layers
together with them.
"""

import numpy as np
import pytest

import keras
from keras import ops

import ring_loss_tf
from ring_loss_tf import layers as rl
from tests import layer_checks as lc
from tests.layer_checks import FIT_JIT
from tests.layer_checks import MODES
from tests.layer_checks import ON_TF
from tests.layer_checks import cases
from tests.layer_checks import random_case
from tests.layer_checks import rng


# --------------------------------------------------------------------------
# float64 NumPy references
# --------------------------------------------------------------------------


def np_ring_loss(x, radius, loss_weight):
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    return loss_weight / (2 * len(x)) * np.sum((norms - radius) ** 2)


def np_ring_grads(x, radius, loss_weight):
    """The closed forms of ∂L_R/∂F_i and ∂L_R/∂R (module docstring)."""
    x = x.astype(np.float64)
    m = len(x)
    norms = np.linalg.norm(x, axis=1)
    d_radius = -(loss_weight / m) * np.sum(norms - radius)
    scale = np.zeros_like(norms)
    nonzero = norms > 0
    scale[nonzero] = 1 - radius / norms[nonzero]
    d_x = (loss_weight / m) * scale[:, None] * x
    return d_x, d_radius


def np_center_loss(x, centers, labels, loss_weight):
    diff = x.astype(np.float64) - centers.astype(np.float64)[labels]
    return loss_weight / (2 * len(x)) * np.sum(diff**2)


def np_center_update(x, centers, labels, alpha):
    x = x.astype(np.float64)
    new = centers.astype(np.float64).copy()
    for j in range(len(centers)):
        members = labels == j
        delta = np.sum(centers[j] - x[members], axis=0) / (1 + members.sum())
        new[j] = centers[j] - alpha * delta
    return new


# --------------------------------------------------------------------------
# Ring loss
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "batch,dim",
    cases([(1, 2), (8, 2), (16, 64), (4, 512)], [(1, 2), (4, 512)]),
)
def test_ring_loss_value_and_closed_form_gradients(batch, dim, mode):
    r = rng(batch * 1000 + dim)
    x = (r.standard_normal((batch, dim)) * 4).astype(np.float32)
    radius = np.float32(r.uniform(1, 10))
    weight = 0.01
    value, (d_x, d_radius) = lc.value_and_grads(
        lambda a, b: rl.ring_loss(a, b, weight), x, radius, mode=mode
    )
    ref_dx, ref_dr = np_ring_grads(x, radius, weight)
    np.testing.assert_allclose(value, np_ring_loss(x, radius, weight), rtol=1e-5)
    np.testing.assert_allclose(d_x, ref_dx, rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(d_radius, ref_dr, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("mode", MODES)
def test_ring_loss_zero_embedding_has_zero_finite_gradient(mode):
    x = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0]], np.float32)
    value, (d_x, d_radius) = lc.value_and_grads(
        lambda a, b: rl.ring_loss(a, b, 1.0), x, np.float32(2.0), mode=mode
    )
    ref_dx, ref_dr = np_ring_grads(x, 2.0, 1.0)
    assert np.all(np.isfinite(d_x))
    np.testing.assert_array_equal(d_x[0], 0.0)  # the limit at F_i = 0
    np.testing.assert_allclose(d_x, ref_dx, rtol=1e-6)
    np.testing.assert_allclose(d_radius, ref_dr, rtol=1e-6)
    np.testing.assert_allclose(value, np_ring_loss(x, 2.0, 1.0), rtol=1e-6)


def test_safe_norm_keeps_tiny_norms_exact():
    x = np.array([[1e-9, 0.0], [3e-20, 4e-20], [0.0, 0.0]], np.float32)
    value, (grad,) = lc.value_and_grads(
        lambda a: ops.sum(rl.safe_norm(a)), x
    )
    np.testing.assert_allclose(
        lc.to_numpy(rl.safe_norm(ops.convert_to_tensor(x)))[:1], [1e-9],
        rtol=1e-6,
    )
    np.testing.assert_allclose(
        lc.to_numpy(rl.safe_norm(ops.convert_to_tensor(x)))[1], 5e-20,
        rtol=1e-6,
    )
    # The gradient of ‖x‖ is x/‖x‖: unit length for the tiny rows.
    np.testing.assert_allclose(grad[0], [1.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(grad[1], [0.6, 0.8], rtol=1e-6)
    np.testing.assert_array_equal(grad[2], [0.0, 0.0])
    assert np.all(np.isfinite(grad))


def test_ring_loss_layer_matches_function_and_returns_input():
    x, _, _ = random_case(1)
    layer = ring_loss_tf.RingLoss(loss_weight=0.05, radius_init=2.5)
    out = layer(x)
    np.testing.assert_array_equal(lc.to_numpy(out), x)
    assert len(layer.losses) == 1
    np.testing.assert_allclose(
        lc.to_numpy(layer.losses[0]), np_ring_loss(x, 2.5, 0.05), rtol=1e-5
    )
    assert layer.radius.dtype == "float32"
    assert layer.radius.trainable and layer.radius.shape == ()


def test_ring_loss_auto_radius_is_first_training_batch_mean():
    x, _, _ = random_case(2)
    layer = ring_loss_tf.RingLoss(loss_weight=0.01)
    layer(x, training=False)  # inference does not initialise
    assert float(lc.to_numpy(layer.radius_initialized)) == 0.0
    layer(x, training=True)
    mean_norm = np.linalg.norm(x.astype(np.float64), axis=1).mean()
    np.testing.assert_allclose(lc.to_numpy(layer.radius), mean_norm, rtol=1e-6)
    assert float(lc.to_numpy(layer.radius_initialized)) == 1.0
    layer(x * 10, training=True)  # a later batch does not re-initialise
    np.testing.assert_allclose(lc.to_numpy(layer.radius), mean_norm, rtol=1e-6)


def test_ring_loss_first_batch_loss_keeps_gradient_to_radius():
    """R's first-batch value is the batch mean, but ∂L/∂R still flows.

    Run as each backend's training step runs the layer: on JAX through
    `stateless_call`, where the trainable `radius` cannot be assigned, so
    the jump goes through `radius_offset` and is folded into `radius` when
    the step's state is stored back.
    """
    x, _, _ = random_case(3)
    layer = ring_loss_tf.RingLoss(loss_weight=0.5)
    layer.build(x.shape)
    loss, (grad,), after = lc.first_training_call(layer, x)
    mean_norm = np.linalg.norm(x.astype(np.float64), axis=1).mean()
    _, ref = np_ring_grads(x, mean_norm, 0.5)
    np.testing.assert_allclose(grad, ref, atol=1e-5)
    np.testing.assert_allclose(loss, np_ring_loss(x, mean_norm, 0.5), rtol=1e-5)
    np.testing.assert_allclose(after["radius"], mean_norm, rtol=1e-6)
    assert after["radius_initialized"] == 1.0
    assert after.get("radius_offset", 0.0) == 0.0
    # A second training call neither re-initialises nor leaves an offset.
    loss, (grad,), after = lc.first_training_call(layer, 2 * x)
    _, ref = np_ring_grads(2 * x, mean_norm, 0.5)
    np.testing.assert_allclose(grad, ref, rtol=1e-4)
    np.testing.assert_allclose(after["radius"], mean_norm, rtol=1e-6)
    assert after.get("radius_offset", 0.0) == 0.0


def test_initialize_radius_then_call_does_not_assign():
    x, _, _ = random_case(4)
    layer = ring_loss_tf.RingLoss()
    value = layer.initialize_radius(x)
    np.testing.assert_allclose(
        value, np.linalg.norm(x, axis=1).mean(), rtol=1e-6
    )
    layer.radius.assign(7.0)
    layer(x, training=True)
    assert float(lc.to_numpy(layer.radius)) == 7.0
    # Once initialised, initialize_radius does not reset R.
    assert layer.initialize_radius(x * 3) == 7.0


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss_weight": -0.1}, "loss_weight"),
        ({"loss_weight": float("nan")}, "loss_weight"),
        ({"radius_init": 0.0}, "radius_init"),
        ({"radius_init": -1}, "radius_init"),
        ({"radius_init": "mean"}, "radius_init.*'auto'"),
        ({"radius_init": True}, "radius_init"),
    ],
)
def test_ring_loss_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ring_loss_tf.RingLoss(**kwargs)


def test_ring_loss_rejects_rank_3_input():
    with pytest.raises(ValueError, match=r"\(batch_size, embedding_dim\)"):
        ring_loss_tf.RingLoss()(np.zeros((2, 3, 4), np.float32))



def test_batch_norm_training_inference_and_moving_averages():
    x = rng(12).normal(size=(6, 4)).astype("float32") * 3 + 1
    layer = ring_loss_tf.BatchNorm(momentum=0.8, epsilon=1e-3, scale=False)
    y = lc.to_numpy(layer(x, training=True))
    mean, variance = x.astype(np.float64).mean(0), x.astype(np.float64).var(0)
    np.testing.assert_allclose(
        y, (x - mean) / np.sqrt(variance + 1e-3), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
        lc.to_numpy(layer.moving_mean), 0.2 * mean, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        lc.to_numpy(layer.moving_variance), 0.8 + 0.2 * variance, rtol=1e-5
    )
    moving_mean = 0.2 * mean
    moving_variance = 0.8 + 0.2 * variance
    np.testing.assert_allclose(
        lc.to_numpy(layer(x, training=False)),
        (x - moving_mean) / np.sqrt(moving_variance + 1e-3),
        rtol=1e-4, atol=1e-4,
    )
    assert [w.name for w in layer.trainable_weights] == ["beta"]
    clone = lc.config_roundtrip(layer)
    assert (clone.momentum, clone.epsilon, clone.scale) == (0.8, 1e-3, False)



@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_under_mixed_float16_normalises_in_float32(mode):
    """Batch variances of 2.4e-7 and 0.25: in float16 the first channel's
    output was [0, 0.305] and its input gradient ±inf."""
    x = np.array([[1.0, 2.0], [1.001, 3.0]], np.float32)
    weights = np.array([[1.0, 2.0], [3.0, 4.0]])
    keras.config.set_dtype_policy("mixed_float16")
    try:
        layer = ring_loss_tf.BatchNorm()
        y = lc.to_numpy(layer(x, training=True))
        if lc.backend() != "jax":  # a jitted JAX gradient holds no assign
            value, (d_x,) = lc.value_and_grads(
                lambda a: ops.sum(
                    ops.cast(layer(a, training=True), "float32")
                    * ops.convert_to_tensor(weights.astype(np.float32))
                ),
                x, mode=mode,
            )
    finally:
        keras.config.set_dtype_policy("float32")
    assert y.dtype == np.float16 and layer.gamma.dtype == "float32"
    # The reference sees the float16 inputs the layer sees.
    x16 = x.astype(np.float16).astype(np.float64)
    deviation = np.sqrt(x16.var(0) + 1e-5)
    normalised = (x16 - x16.mean(0)) / deviation
    np.testing.assert_allclose(y, normalised, rtol=1e-3, atol=1e-3)
    if lc.backend() == "jax":
        return
    np.testing.assert_allclose(value, np.sum(normalised * weights), rtol=1e-3)
    # ∂/∂x of Σ w·x̂ in training: (w − mean(w) − x̂·mean(w·x̂)) / √(σ² + ε).
    expected = (
        weights - weights.mean(0) - normalised * (weights * normalised).mean(0)
    ) / deviation
    np.testing.assert_allclose(d_x, expected, rtol=1e-2, atol=1e-2)


def np_grouped_conv(x, kernel, groups, strides, padding):
    """Each group's inputs correlated with its own kernel slice, in float64;
    returns the output and the padded input. "same" is used at stride 1
    only: k // 2 zeros on each side."""
    x, kernel = x.astype(np.float64), kernel.astype(np.float64)
    k_h, k_w, per_in, filters = kernel.shape
    if padding == "same":
        x = np.pad(x, ((0, 0), (k_h // 2,) * 2, (k_w // 2,) * 2, (0, 0)))
    out_h = (x.shape[1] - k_h) // strides + 1
    out_w = (x.shape[2] - k_w) // strides + 1
    per_out = filters // groups
    y = np.zeros((x.shape[0], out_h, out_w, filters))
    for g in range(groups):
        ins = slice(g * per_in, (g + 1) * per_in)
        outs = slice(g * per_out, (g + 1) * per_out)
        for i in range(k_h):
            for j in range(k_w):
                patch = x[:, i:i + strides * out_h:strides,
                          j:j + strides * out_w:strides, ins]
                y[..., outs] += patch @ kernel[i, j, :, outs]
    return y, x


def np_grouped_conv_grads(x, kernel, weights, groups, strides, padding):
    """∂/∂x and ∂/∂kernel of Σ y·weights, y = np_grouped_conv(...): the
    output weights correlated with the inputs (kernel), and sent back
    through each kernel tap (inputs)."""
    _, padded = np_grouped_conv(x, kernel, groups, strides, padding)
    kernel = kernel.astype(np.float64)
    k_h, k_w, per_in, filters = kernel.shape
    out_h, out_w = weights.shape[1:3]
    per_out = filters // groups
    d_padded = np.zeros_like(padded)
    d_kernel = np.zeros_like(kernel)
    for g in range(groups):
        ins = slice(g * per_in, (g + 1) * per_in)
        outs = slice(g * per_out, (g + 1) * per_out)
        for i in range(k_h):
            for j in range(k_w):
                rows = slice(i, i + strides * out_h, strides)
                cols = slice(j, j + strides * out_w, strides)
                patch = padded[:, rows, cols, ins]
                d_kernel[i, j, :, outs] = np.einsum(
                    "bhwp,bhwo->po", patch, weights[..., outs]
                )
                d_padded[:, rows, cols, ins] += (
                    weights[..., outs] @ kernel[i, j, :, outs].T
                )
    pad_h = (padded.shape[1] - x.shape[1]) // 2
    pad_w = (padded.shape[2] - x.shape[2]) // 2
    d_x = d_padded[:, pad_h:pad_h + x.shape[1], pad_w:pad_w + x.shape[2]]
    return d_x, d_kernel


# (groups, input channels, filters, strides, padding): MobileFaceNet's 64
# groups of 2 → 2, unequal group widths at stride 2, and one group.
GROUPED_CASES = [(64, 128, 128, 1, "same"), (4, 8, 12, 2, "valid"),
                 (1, 3, 5, 1, "same")]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "groups,c_in,filters,strides,padding",
    cases(GROUPED_CASES, GROUPED_CASES[:2]),
)
def test_grouped_conv2d_values_and_gradients(groups, c_in, filters, strides,
                                            padding, mode):
    r = rng(groups)
    x = r.normal(size=(2, 7, 6, c_in)).astype(np.float32)
    kernel = r.normal(size=(3, 3, c_in // groups, filters)).astype(np.float32)
    expected, _ = np_grouped_conv(x, kernel, groups, strides, padding)
    weights = r.normal(size=expected.shape)
    value, (d_x, d_kernel) = lc.value_and_grads(
        lambda a, k: ops.sum(
            rl.grouped_conv2d(a, k, groups, strides, padding)
            * ops.convert_to_tensor(weights.astype(np.float32))
        ),
        x, kernel, mode=mode,
    )
    np.testing.assert_allclose(value, np.sum(expected * weights), rtol=1e-4)
    ref_dx, ref_dk = np_grouped_conv_grads(
        x, kernel, weights, groups, strides, padding
    )
    np.testing.assert_allclose(d_x, ref_dx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(d_kernel, ref_dk, rtol=1e-4, atol=1e-4)


def test_grouped_conv2d_layer_is_a_conv2d_with_groups(tmp_path):
    layer = ring_loss_tf.layers.GroupedConv2D(
        12, 3, strides=2, groups=4, use_bias=True, name="grouped"
    )
    x = rng(3).normal(size=(2, 9, 9, 8)).astype(np.float32)
    y = lc.to_numpy(layer(x))
    # keras.layers.Conv2D(groups=4)'s weights: kernel (3, 3, 2, 12), bias.
    assert [tuple(w.shape) for w in layer.weights] == [(3, 3, 2, 12), (12,)]
    kernel, bias = (lc.to_numpy(w) for w in layer.weights)
    expected, _ = np_grouped_conv(x, kernel, 4, 2, "valid")
    np.testing.assert_allclose(y, expected + bias, rtol=1e-4, atol=1e-5)
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config() and clone.groups == 4
    inputs = keras.Input((9, 9, 8))
    model = keras.Model(inputs, layer(inputs))
    loaded = lc.roundtrip_keras_file(model, str(tmp_path / "g.keras"))
    assert isinstance(loaded.get_layer("grouped"), rl.GroupedConv2D)
    np.testing.assert_allclose(lc.to_numpy(loaded(x)), y, rtol=1e-6)


def test_l2_constrained_scales_to_alpha_and_keeps_zero():
    x, _, _ = random_case(30)
    x[0] = 0.0
    out = lc.to_numpy(ring_loss_tf.L2Constrained(alpha=20.0)(x))
    np.testing.assert_allclose(
        np.linalg.norm(out[1:], axis=1), 20.0, rtol=1e-6
    )
    np.testing.assert_allclose(
        out[1:], 20.0 * x[1:] / np.linalg.norm(x[1:], axis=1, keepdims=True),
        rtol=1e-5,
    )
    np.testing.assert_array_equal(out[0], 0.0)
    _, (grad,) = lc.value_and_grads(
        lambda a: ops.sum(rl.l2_constrained(a, 20.0)), x
    )
    assert np.all(np.isfinite(grad))
    with pytest.raises(ValueError, match="alpha"):
        ring_loss_tf.L2Constrained(alpha=0)


@pytest.mark.parametrize("mode", MODES)
def test_center_loss_value_gradient_and_update(mode):
    x, _, labels = random_case(40, batch=12, classes=4)
    centers = rng(41).standard_normal((4, x.shape[1])).astype(np.float32)
    value, (d_x,) = lc.value_and_grads(
        lambda a: rl.center_loss(a, centers, labels, 0.1), x, mode=mode
    )
    np.testing.assert_allclose(
        value, np_center_loss(x, centers, labels, 0.1), rtol=1e-5
    )
    ref_dx = 0.1 / len(x) * (x - centers[labels])
    np.testing.assert_allclose(d_x, ref_dx, rtol=1e-4, atol=1e-7)
    layer = ring_loss_tf.CenterLoss(4, loss_weight=0.1, alpha=0.5)
    layer.build([x.shape, labels.shape])
    layer.centers.assign(centers)
    out = layer([x, labels], training=True)
    np.testing.assert_array_equal(lc.to_numpy(out), x)
    np.testing.assert_allclose(
        lc.to_numpy(layer.losses[0]),
        np_center_loss(x, centers, labels, 0.1),
        rtol=1e-5,
    )
    np.testing.assert_allclose(
        lc.to_numpy(layer.centers),
        np_center_update(x, centers, labels, 0.5),
        rtol=1e-5,
        atol=1e-6,
    )
    before = lc.to_numpy(layer.centers)
    layer([x, labels], training=False)
    np.testing.assert_array_equal(lc.to_numpy(layer.centers), before)


# --------------------------------------------------------------------------
# Keras integration: fit, save/load, config, mixed precision
# --------------------------------------------------------------------------


def build_model(head, num_classes=5, dim=8, ring=True, radius_init="auto"):
    images = keras.Input((dim,), name="features")
    labels = keras.Input((), dtype="int32", name="labels")
    embeddings = keras.layers.Dense(dim, name="embed")(images)
    if ring:
        embeddings = ring_loss_tf.RingLoss(
            loss_weight=0.1, radius_init=radius_init, name="ring"
        )(embeddings)
    if head == "asoftmax":
        logits = ring_loss_tf.ASoftmax(num_classes, name="head")(
            [embeddings, labels]
        )
    elif head == "centerloss":
        embeddings = ring_loss_tf.CenterLoss(num_classes, 0.01, name="center")(
            [embeddings, labels]
        )
        logits = keras.layers.Dense(num_classes, name="head")(embeddings)
    elif head == "arcface":
        logits = ring_loss_tf.ArcFace(num_classes, scale=8.0, name="head")(
            [embeddings, labels]
        )
    elif head == "cosface":
        logits = ring_loss_tf.CosFace(num_classes, scale=8.0, name="head")(
            [embeddings, labels]
        )
    elif head == "l2softmax":
        normed = ring_loss_tf.L2Constrained(10.0, name="l2")(embeddings)
        logits = keras.layers.Dense(num_classes, name="head")(normed)
    else:
        logits = keras.layers.Dense(num_classes, name="head")(embeddings)
    return keras.Model([images, labels], logits)


def toy_data(seed=0, n=64, dim=8, classes=5):
    r = rng(seed)
    x = (r.standard_normal((n, dim)) * 3).astype(np.float32)
    y = r.integers(0, classes, n).astype(np.int32)
    return x, y


@pytest.mark.parametrize("jit", FIT_JIT)
def test_fit_reports_ring_loss_moves_radius_and_counts_iterations(jit):
    keras.utils.set_random_seed(0)
    x, y = toy_data()
    model = build_model("asoftmax", radius_init=1.0)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    embed = keras.Model(model.inputs[0], model.get_layer("embed").output)
    # The reported loss is cross-entropy plus the ring loss.
    feats = lc.to_numpy(embed(x))
    eval_loss = model.evaluate([x, y], y, batch_size=64, verbose=0)
    logits = lc.to_numpy(model([x, y], training=False)).astype(np.float64)
    logits -= logits.max(axis=1, keepdims=True)
    ce = np.mean(
        np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(y)), y]
    )
    np.testing.assert_allclose(
        eval_loss, ce + np_ring_loss(feats, 1.0, 0.1), rtol=1e-4
    )
    history = model.fit([x, y], y, batch_size=16, epochs=2, verbose=0)
    assert all(np.isfinite(history.history["loss"]))
    head = model.get_layer("head")
    assert int(lc.to_numpy(head.iterations)) == 2 * (64 // 16)
    radius = float(lc.to_numpy(model.get_layer("ring").radius))
    mean_norm = np.linalg.norm(lc.to_numpy(embed(x)), axis=1).mean()
    assert radius > 1.1, "R moves from 1.0 toward the mean norm"
    assert abs(radius - mean_norm) < abs(1.0 - mean_norm)


def test_fit_initialises_auto_radius_from_first_batch():
    """`fit`'s first step sets R to the batch's mean norm, on every backend.

    At R = mean norm, ∂L_R/∂R = 0: after one full-batch SGD step R is exactly
    the mean norm of the embeddings before the step. The second step then
    trains R by its closed-form gradient from there, without re-initialising.
    """
    keras.utils.set_random_seed(4)
    x, y = toy_data(4)
    model = build_model("softmax")
    lr, weight = 0.05, 0.1
    model.compile(
        optimizer=keras.optimizers.SGD(lr),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    embed = keras.Model(model.inputs[0], model.get_layer("embed").output)
    ring = model.get_layer("ring")

    def norms():
        return np.linalg.norm(
            lc.to_numpy(embed(x)).astype(np.float64), axis=1
        )

    first = norms().mean()
    model.fit([x, y], y, batch_size=len(x), epochs=1, verbose=0)
    np.testing.assert_allclose(lc.to_numpy(ring.radius), first, rtol=1e-5)
    assert float(lc.to_numpy(ring.radius_initialized)) == 1.0
    second = norms()
    model.fit([x, y], y, batch_size=len(x), epochs=1, verbose=0)
    d_radius = -(weight / len(x)) * np.sum(second - first)  # ∂L_R/∂R
    expected = first - lr * d_radius
    np.testing.assert_allclose(lc.to_numpy(ring.radius), expected, rtol=1e-5)
    assert abs(expected - first) > 1e-4, "the second step moves R"


@pytest.mark.parametrize(
    "head",
    cases(
        ["softmax", "asoftmax", "centerloss", "arcface", "cosface",
         "l2softmax"],
        ["asoftmax", "centerloss"],  # every kind of state, with RingLoss
    ),
)
def test_keras_file_roundtrip_restores_all_state(head, tmp_path):
    keras.utils.set_random_seed(1)
    x, y = toy_data(1)
    model = build_model(head)
    model.compile(
        optimizer="sgd",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit([x, y], y, batch_size=16, epochs=1, verbose=0)
    loaded = lc.roundtrip_keras_file(model, str(tmp_path / "m.keras"))
    for a, b in zip(model.weights, loaded.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(lc.to_numpy(a), lc.to_numpy(b))
    ring = loaded.get_layer("ring")
    assert float(lc.to_numpy(ring.radius_initialized)) == 1.0
    np.testing.assert_array_equal(
        lc.to_numpy(model([x, y], training=False)),
        lc.to_numpy(loaded([x, y], training=False)),
    )
    if head == "asoftmax":
        assert int(lc.to_numpy(loaded.get_layer("head").iterations)) == 4
    if head == "centerloss":
        centers = lc.to_numpy(loaded.get_layer("center").centers)
        assert np.any(centers != 0)
    # A reloaded model keeps training without re-initialising R.
    before = float(lc.to_numpy(ring.radius))
    ring(x * 100, training=True)
    assert float(lc.to_numpy(ring.radius)) == before


@pytest.mark.parametrize(
    "layer",
    [
        ring_loss_tf.RingLoss(0.02, radius_init=3.0, name="r"),
        ring_loss_tf.RingLoss(),
        ring_loss_tf.L2Constrained(alpha=30.0),
        ring_loss_tf.CenterLoss(10, loss_weight=0.5, alpha=0.1),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_config_roundtrip(layer):
    lc.config_roundtrip(layer)


@pytest.mark.parametrize(
    "cls,arguments",
    [
        (ring_loss_tf.RingLoss, {"loss_weight": np.float32(0.01),
                                 "radius_init": np.float64(2.5)}),
        (ring_loss_tf.RingLoss, {"loss_weight": np.int64(0)}),
        (ring_loss_tf.L2Constrained, {"alpha": np.float32(30.0)}),
        (ring_loss_tf.CenterLoss, {"num_classes": np.int64(10),
                                   "loss_weight": np.float16(0.5),
                                   "alpha": np.float64(0.1)}),
        (ring_loss_tf.BatchNorm, {"momentum": np.float32(0.99),
                                  "epsilon": np.float64(1e-3)}),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_layers_accept_numpy_scalars_and_keep_python_numbers(cls, arguments):
    layer = cls(**arguments)
    config = layer.get_config()
    for key, value in arguments.items():
        # The Python number the NumPy scalar holds, as a Python type.
        expected = value.item()
        assert config[key] == expected and type(config[key]) is type(
            expected
        ), key
        assert type(getattr(layer, key)) is type(expected), key
    assert lc.config_roundtrip(layer).get_config() == config


def test_ring_loss_with_a_numpy_loss_weight_gives_the_loss():
    x, _, _ = random_case(26)
    weight = np.float32(0.05)
    layer = ring_loss_tf.RingLoss(loss_weight=weight, radius_init=2.0)
    layer(x)
    np.testing.assert_allclose(
        lc.to_numpy(layer.losses[0]), np_ring_loss(x, 2.0, float(weight)),
        rtol=1e-5,
    )


def test_package_lists_each_public_name_once():
    names = dir(ring_loss_tf)
    assert len(names) == len(set(names))
    assert len(ring_loss_tf.__all__) == len(set(ring_loss_tf.__all__))
    # The README's layer table ("Using the layers in your own Keras model").
    table = ["RingLoss", "ASoftmax", "L2Constrained", "CenterLoss",
             "CosFace", "ArcFace", "BatchNorm", "GroupedConv2D"]
    for name in table + ring_loss_tf.__all__:
        assert name in ring_loss_tf.__all__ and name in names, name
        assert getattr(ring_loss_tf, name) is not None
    assert ring_loss_tf.GroupedConv2D is rl.GroupedConv2D


@pytest.mark.parametrize(
    "policy", cases(["mixed_float16", "mixed_bfloat16"], ["mixed_float16"])
)
@pytest.mark.parametrize("head", ["asoftmax", "arcface", "centerloss"])
def test_mixed_precision_runs_finite_with_float32_state(policy, head):
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(2)
        x, y = toy_data(2)
        model = build_model(head)
        model.compile(
            optimizer=keras.optimizers.SGD(0.01),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit([x, y], y, batch_size=16, epochs=1, verbose=0)
        assert np.all(np.isfinite(history.history["loss"]))
        ring = model.get_layer("ring")
        assert ring.radius.dtype == "float32"
        if not ring.losses:  # a JAX step leaves none: call it eagerly
            ring(ops.convert_to_tensor(x, "float16"), training=False)
        loss_dtype = keras.backend.standardize_dtype(ring.losses[0].dtype)
        assert loss_dtype == "float32"
        assert np.isfinite(float(lc.to_numpy(ring.radius)))
        if head != "centerloss":  # its classifier is a plain Dense
            logits = model([x, y], training=False)
            assert keras.backend.standardize_dtype(logits.dtype) == "float32"
        else:
            centers = model.get_layer("center").centers
            assert centers.dtype == "float32"
            assert np.all(np.isfinite(lc.to_numpy(centers)))
    finally:
        keras.config.set_dtype_policy("float32")


# --------------------------------------------------------------------------
# Distribution (TensorFlow): state updated inside a compiled replica step
# --------------------------------------------------------------------------


def _test_replica_step_updates_state_once_per_step():
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )
    x, y = toy_data(3, n=16)
    with strategy.scope():
        model = build_model("asoftmax")
        optimizer = keras.optimizers.SGD(0.1)
        model.build([x.shape, y.shape])
    ring = model.get_layer("ring")
    embed = keras.Model(model.inputs[0], model.get_layer("embed").output)
    ring.initialize_radius(embed(x))
    expected_radius = np.linalg.norm(lc.to_numpy(embed(x)), axis=1).mean()

    @tf.function(jit_compile=True)
    def forward_backward(features, labels):
        with tf.GradientTape() as tape:
            logits = model([features, labels], training=True)
            loss = tf.reduce_sum(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
            ) / len(x) + tf.add_n(model.losses) / 2
        return tape.gradient(loss, model.trainable_variables)

    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensor_slices((x, y)).batch(16).repeat()
    )
    batches = iter(dataset)
    for step in (1, 2):
        # strategy.run takes a Python step that calls the compiled function
        # (passing the compiled function itself places every replica's
        # variables on the first device).
        grads = strategy.run(
            lambda *batch: forward_backward(*batch), args=next(batches)
        )
        grads = [strategy.reduce("SUM", g, axis=None) for g in grads]
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        assert int(model.get_layer("head").iterations.numpy()) == step
    np.testing.assert_allclose(
        ring.radius.numpy(), expected_radius, rtol=1e-3
    )


def _two_replicas():
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(
        ["/cpu:0", "/cpu:1"],
        cross_device_ops=tf.distribute.ReductionToOneDevice(),
    )


def _test_initialize_radius_inside_and_outside_the_strategy_scope():
    """README: a custom loop calls initialize_radius; either place works."""
    x, _, _ = random_case(27, batch=8)
    mean_norm = np.linalg.norm(x.astype(np.float64), axis=1).mean()
    strategy = _two_replicas()
    for inside in (True, False):
        with strategy.scope():
            layer = ring_loss_tf.RingLoss()
            layer.build(x.shape)  # mirrored weights, as in a model
            if inside:
                value = layer.initialize_radius(x)
        if not inside:
            value = layer.initialize_radius(x)
        assert isinstance(value, float)
        np.testing.assert_allclose(value, mean_norm, rtol=1e-6)
        assert layer.is_radius_initialized()
        # Every replica's copy holds R.
        for copy in layer.radius.value.values:
            np.testing.assert_allclose(copy.numpy(), mean_norm, rtol=1e-6)
        # Initialised once: a later call leaves R.
        with strategy.scope():
            assert layer.initialize_radius(3 * x) == value


def _test_fit_under_two_replicas_starts_radius_at_the_global_batch_mean():
    """Two replicas, each holding half the batch, take one `fit` step as one
    device does: R starts at the mean norm of the whole batch."""
    import tensorflow as tf

    x, y = toy_data(5, n=16)
    x[8:] *= 4  # the replicas' halves have very different mean norms
    keras.utils.set_random_seed(5)
    initial = build_model("softmax").get_weights()
    lr = 0.5

    def one_step(strategy):
        with strategy.scope():
            model = build_model("softmax")
            model.set_weights(initial)
            model.compile(
                optimizer=keras.optimizers.SGD(lr),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True
                ),
            )
        embed = keras.Model(model.inputs[0], model.get_layer("embed").output)
        norms = np.linalg.norm(
            lc.to_numpy(embed(x)).astype(np.float64), axis=1
        )
        model.fit([x, y], y, batch_size=16, epochs=1, shuffle=False,
                  verbose=0)
        return model, norms.mean()

    one, mean_norm = one_step(tf.distribute.OneDeviceStrategy("/cpu:0"))
    two, _ = one_step(_two_replicas())
    # At R = the batch's mean norm ∂L_R/∂R = 0: the step leaves R there.
    for model in (one, two):
        np.testing.assert_allclose(
            lc.to_numpy(model.get_layer("ring").radius), mean_norm,
            rtol=1e-6,
        )
    for a, b in zip(one.weights, two.weights):
        np.testing.assert_allclose(
            lc.to_numpy(b), lc.to_numpy(a), rtol=1e-6, atol=1e-7,
            err_msg=a.path,
        )


# tf.distribute exists only on TensorFlow: the tests are not defined
# elsewhere.
if ON_TF:
    test_replica_step_updates_state_once_per_step = (
        _test_replica_step_updates_state_once_per_step
    )
    test_initialize_radius_inside_and_outside_the_strategy_scope = (
        _test_initialize_radius_inside_and_outside_the_strategy_scope
    )
    test_fit_under_two_replicas_starts_radius_at_the_global_batch_mean = (
        _test_fit_under_two_replicas_starts_radius_at_the_global_batch_mean
    )

