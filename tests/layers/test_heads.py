"""Heads against float64 NumPy references written here from the formulas.

The references deliberately take another route than the heads: A-Softmax's
ψ uses arccos and floor(mθ/π) where the head uses Chebyshev polynomials and
threshold counting, ArcFace's target uses arccos and cos(θ + m) where the
head uses cos θ cos m − sin θ sin m; gradients are central finite
differences of the float64 formulas.
"""

import json
import pathlib
import re

import numpy as np
import pytest

import keras
from keras import ops

import ring_loss_tf
from ring_loss_tf.layers import heads as hd
from tests import layer_checks as lc
from tests.layer_checks import FIT_JIT
from tests.layer_checks import MODES
from tests.layer_checks import cases
from tests.layer_checks import random_case
from tests.layer_checks import rng

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures"


# --------------------------------------------------------------------------
# float64 NumPy references
# --------------------------------------------------------------------------


def np_cos(x, kernel):
    x = x.astype(np.float64)
    w = kernel.astype(np.float64)
    w = w / np.linalg.norm(w, axis=0, keepdims=True)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, (x @ w) / norms, 0.0)
    return np.clip(cos, -1, 1), norms


def np_psi(cos, margin):
    theta = np.arccos(np.clip(cos, -1, 1))
    k = np.floor(margin * theta / np.pi)
    k = np.minimum(k, margin)  # θ = π exactly gives k = m in both forms
    return (-1.0) ** k * np.cos(margin * theta) - 2 * k


def np_lambda(t, base=1000.0, gamma=0.12, power=1.0, minimum=5.0):
    return max(minimum, base * (1 + gamma * t) ** (-power))


def np_a_softmax(x, kernel, labels, margin, lam):
    cos, norms = np_cos(x, kernel)
    logits = norms * cos
    rows = np.arange(len(x))
    c = cos[rows, labels]
    target = norms[:, 0] * (lam * c + np_psi(c, margin)) / (1 + lam)
    logits[rows, labels] = target
    return logits


def np_cosface(x, kernel, labels, scale, margin):
    cos, _ = np_cos(x, kernel)
    cos[np.arange(len(x)), labels] -= margin
    return scale * cos


def np_arcface(x, kernel, labels, scale, margin, easy_margin=False):
    cos, _ = np_cos(x, kernel)
    rows = np.arange(len(x))
    c = cos[rows, labels]
    theta = np.arccos(c)
    with_margin = np.cos(theta + margin)
    if easy_margin:
        target = np.where(c > 0, with_margin, c)
    else:
        target = np.where(
            theta + margin <= np.pi, with_margin, c - np.sin(margin) * margin
        )
    cos[rows, labels] = target
    return scale * cos



# --------------------------------------------------------------------------
# A-Softmax
# --------------------------------------------------------------------------


@pytest.mark.parametrize("margin", [1, 2, 3, 4])
def test_psi_matches_arccos_form_and_is_continuous_decreasing(margin):
    theta = np.linspace(0, np.pi, 20001)
    cos = np.cos(theta).astype(np.float32)
    psi = lc.to_numpy(hd.a_softmax_psi(ops.convert_to_tensor(cos), margin))
    ref = np_psi(cos.astype(np.float64), margin)
    np.testing.assert_allclose(psi, ref, atol=2e-5)
    steps = np.diff(psi.astype(np.float64))
    assert np.all(steps <= 1e-5), "ψ must decrease monotonically"
    # Continuity: no step larger than the steepest slope times the grid step.
    max_slope = margin + 2 * margin / np.pi + 1
    assert np.max(np.abs(steps)) <= max_slope * (theta[1] - theta[0]) * 1.5
    np.testing.assert_allclose(psi[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(psi[-1], -2.0 * margin + (-1) ** margin * (
        (-1) ** margin), atol=1e-4)


@pytest.mark.parametrize("t", [0, 1, 100, 1659, 10000])
def test_lambda_schedule(t):
    value = float(lc.to_numpy(hd.a_softmax_lambda(t)))
    np.testing.assert_allclose(value, np_lambda(t), rtol=1e-6)


def test_lambda_schedule_known_points():
    assert float(lc.to_numpy(hd.a_softmax_lambda(1))) == pytest.approx(
        1000 / 1.12, rel=1e-6
    )
    assert float(lc.to_numpy(hd.a_softmax_lambda(1659))) == 5.0
    assert float(lc.to_numpy(hd.a_softmax_lambda(1658))) > 5.0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "margin,lam",
    cases(
        [(m, lam) for lam in (0.0, 5.0, 892.857) for m in (1, 2, 3, 4)],
        [(1, 5.0), (2, 5.0), (3, 5.0), (4, 5.0), (4, 0.0), (4, 892.857)],
    ),
)
def test_a_softmax_logits_and_gradients(margin, lam, mode):
    x, kernel, labels = random_case(10 + margin)
    cotangent = rng(99).standard_normal((len(x), kernel.shape[1]))

    def ours(a, w):
        logits = hd.a_softmax_logits(a, w, labels, margin, lam)
        return ops.sum(logits * ops.convert_to_tensor(cotangent, "float32"))

    def ref(a, w):
        return np.sum(np_a_softmax(a, w, labels, margin, lam) * cotangent)

    value, (d_x, d_w) = lc.value_and_grads(ours, x, kernel, mode=mode)
    np.testing.assert_allclose(value, ref(x, kernel), rtol=1e-4)
    logits = lc.to_numpy(
        hd.a_softmax_logits(x, kernel, labels, margin, lam)
    )
    np.testing.assert_allclose(
        logits, np_a_softmax(x, kernel, labels, margin, lam), atol=1e-4,
        rtol=1e-4,
    )
    x64, k64 = x.astype(np.float64), kernel.astype(np.float64)
    np.testing.assert_allclose(
        d_x, lc.numeric_grad(lambda a: ref(a, k64), x64), rtol=2e-3, atol=2e-3
    )
    np.testing.assert_allclose(
        d_w, lc.numeric_grad(lambda w: ref(x64, w), k64), rtol=2e-3,
        atol=2e-3,
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("margin", [1, 2, 3, 4])
def test_a_softmax_edge_cases_are_finite(margin, mode):
    r = rng(5)
    kernel = r.standard_normal((4, 3)).astype(np.float32)
    unit = kernel[:, 0] / np.linalg.norm(kernel[:, 0])
    x = np.stack(
        [
            np.zeros(4),  # ‖x‖ = 0
            2.0 * unit,  # cos θ = 1 with its own class
            -3.0 * unit,  # cos θ = −1 with class 0
            1e-30 * unit,  # tiny norm: no epsilon may swamp it
        ]
    ).astype(np.float32)
    labels = np.array([0, 0, 0, 0], np.int32)

    def ours(a, w):
        return ops.sum(hd.a_softmax_logits(a, w, labels, margin, 3.0))

    value, (d_x, d_w) = lc.value_and_grads(ours, x, kernel, mode=mode)
    assert np.isfinite(value)
    assert np.all(np.isfinite(d_x)) and np.all(np.isfinite(d_w))
    logits = lc.to_numpy(hd.a_softmax_logits(x, kernel, labels, margin, 3.0))
    assert np.all(np.isfinite(logits))
    np.testing.assert_array_equal(logits[0], 0.0)
    ref = np_a_softmax(x[1:3], kernel, labels[1:3], margin, 3.0)
    np.testing.assert_allclose(logits[1:3], ref, atol=1e-4)
    # cos θ of the tiny vector is still ±1-exact, not swamped by an epsilon.
    cos = lc.to_numpy(hd.class_cosines(x, kernel)[0])
    np.testing.assert_allclose(cos[3], cos[1], atol=1e-6)


def test_a_softmax_large_case_1000_classes_512_dim():
    x, kernel, labels = random_case(7, batch=32, dim=512, classes=1000)
    logits = lc.to_numpy(hd.a_softmax_logits(x, kernel, labels, 4, 5.0))
    np.testing.assert_allclose(
        logits, np_a_softmax(x, kernel, labels, 4, 5.0), rtol=1e-4, atol=1e-4
    )


def test_a_softmax_layer_schedule_and_inference():
    x, _, labels = random_case(8)
    layer = ring_loss_tf.ASoftmax(7, margin=4)
    eval_logits = lc.to_numpy(layer([x, labels], training=False))
    assert int(lc.to_numpy(layer.iterations)) == 0
    kernel = lc.to_numpy(layer.kernel)
    cos, norms = np_cos(x, kernel)
    np.testing.assert_allclose(eval_logits, norms * cos, rtol=1e-5, atol=1e-5)
    for step in (1, 2, 3):
        logits = lc.to_numpy(layer([x, labels], training=True))
        assert int(lc.to_numpy(layer.iterations)) == step
        ref = np_a_softmax(x, kernel, labels, 4, np_lambda(step))
        np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        float(lc.to_numpy(layer.current_lambda())), np_lambda(3), rtol=1e-6
    )


def test_a_softmax_margin_warmup_phases():
    """W warm-up calls give ‖x‖cos θ; the margin phase restarts λ at t = 1."""
    x, _, labels = random_case(9)
    warmup = 3
    layer = ring_loss_tf.ASoftmax(7, margin=4, margin_warmup_steps=warmup)
    layer([x, labels], training=False)
    kernel = lc.to_numpy(layer.kernel)
    cos, norms = np_cos(x, kernel)
    for call in range(1, warmup + 1):  # margin steps t = -2, -1, 0
        logits = lc.to_numpy(layer([x, labels], training=True))
        np.testing.assert_allclose(logits, norms * cos, rtol=1e-5, atol=1e-5)
        assert layer.current_lambda() is None and layer.margin_step() == 0
    assert int(lc.to_numpy(layer.iterations)) == warmup
    # The phase boundary: the first margin call is t = 1 of the schedule.
    logits = lc.to_numpy(layer([x, labels], training=True))
    np.testing.assert_allclose(
        logits, np_a_softmax(x, kernel, labels, 4, np_lambda(1)),
        rtol=1e-4, atol=1e-4,
    )
    assert layer.margin_step() == 1
    np.testing.assert_allclose(
        float(lc.to_numpy(layer.current_lambda())), 892.857142857, rtol=1e-6
    )
    # t = 1659 of the margin phase: λ has just reached its floor 5.
    layer.iterations.assign(warmup + 1658)
    logits = lc.to_numpy(layer([x, labels], training=True))
    assert layer.margin_step() == 1659
    np.testing.assert_allclose(
        float(lc.to_numpy(layer.current_lambda())), 5.0, rtol=1e-6
    )
    np.testing.assert_allclose(
        logits, np_a_softmax(x, kernel, labels, 4, 5.0), rtol=1e-4, atol=1e-4
    )
    # Inference never has the margin.
    np.testing.assert_allclose(
        lc.to_numpy(layer([x, labels], training=False)), norms * cos,
        rtol=1e-5, atol=1e-5,
    )


@pytest.mark.parametrize("name", ["cosface", "arcface"])
def test_scaled_margin_heads_warm_up_with_m_zero(name):
    x, _, labels = random_case(10)
    cls, ref = {
        "cosface": (ring_loss_tf.CosFace, np_cosface),
        "arcface": (ring_loss_tf.ArcFace, np_arcface),
    }[name]
    layer = cls(7, scale=8.0, margin=0.3, margin_warmup_steps=2)
    layer([x, labels], training=False)
    kernel = lc.to_numpy(layer.kernel)
    for _ in range(2):
        np.testing.assert_allclose(
            lc.to_numpy(layer([x, labels], training=True)),
            ref(x, kernel, labels, 8.0, 0.0), rtol=1e-5, atol=1e-5,
        )
    np.testing.assert_allclose(
        lc.to_numpy(layer([x, labels], training=True)),
        ref(x, kernel, labels, 8.0, 0.3), rtol=1e-5, atol=1e-5,
    )
    assert layer.margin_step() == 1
    # Without a warm-up the layer has no counter (older files load as they
    # were saved).
    plain = cls(7, scale=8.0, margin=0.3)
    plain([x, labels], training=True)
    assert [w.name for w in plain.weights] == ["kernel"]


@pytest.mark.parametrize("bad", [-1, 2.5, True, "10"])
def test_margin_warmup_steps_rejects_bad_values(bad):
    for cls in (ring_loss_tf.ASoftmax, ring_loss_tf.CosFace,
                ring_loss_tf.ArcFace):
        with pytest.raises(ValueError, match=r"`margin_warmup_steps` must be"):
            cls(7, margin_warmup_steps=bad)


def test_keras_file_keeps_the_margin_phase(tmp_path):
    x, _, labels = random_case(11)
    embeddings = keras.Input((5,))
    label_input = keras.Input((), dtype="int32")
    head = ring_loss_tf.ASoftmax(7, margin_warmup_steps=2, name="head")
    model = keras.Model(
        [embeddings, label_input], head([embeddings, label_input])
    )
    for _ in range(3):  # two warm-up calls, then one with the margin
        model([x, labels], training=True)
    loaded = lc.roundtrip_keras_file(model, str(tmp_path / "m.keras"))
    restored = loaded.get_layer("head")
    assert restored.margin_warmup_steps == 2
    assert int(lc.to_numpy(restored.iterations)) == 3
    assert restored.margin_step() == 1
    kernel = lc.to_numpy(restored.kernel)
    np.testing.assert_allclose(
        lc.to_numpy(loaded([x, labels], training=True)),
        np_a_softmax(x, kernel, labels, 4, np_lambda(2)), rtol=1e-4, atol=1e-4,
    )

@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"margin": 5}, "margin"),
        ({"margin": 0}, "margin"),
        ({"margin": 2.5}, "margin"),
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": np.float64(10.5)}, r"Received: num_classes=10\.5$"),
        ({"lambda_min": -1.0}, "lambda_min"),
        ({"lambda_min": np.float32(-1.0)}, r"Received: lambda_min=-1\.0$"),
    ],
)
def test_a_softmax_rejects_bad_arguments(kwargs, match):
    args = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        ring_loss_tf.ASoftmax(**args)


def test_heads_reject_a_call_without_labels():
    with pytest.raises(ValueError, match=r"head\(\[embeddings, labels\]\)"):
        ring_loss_tf.ASoftmax(3)(np.ones((2, 4), np.float32))

# --------------------------------------------------------------------------
# CosFace, ArcFace
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(
    "name,fn,ref",
    [
        (
            "cosface",
            lambda a, w, y: hd.cosface_logits(a, w, y, 30.0, 0.35),
            lambda a, w, y: np_cosface(a, w, y, 30.0, 0.35),
        ),
        (
            "arcface",
            lambda a, w, y: hd.arcface_logits(a, w, y, 30.0, 0.5),
            lambda a, w, y: np_arcface(a, w, y, 30.0, 0.5),
        ),
        (
            "arcface_easy",
            lambda a, w, y: hd.arcface_logits(a, w, y, 30.0, 0.5, True),
            lambda a, w, y: np_arcface(a, w, y, 30.0, 0.5, True),
        ),
    ],
)
def test_margin_heads_logits_and_gradients(name, fn, ref, mode):
    x, kernel, labels = random_case(20)
    cotangent = rng(98).standard_normal((len(x), kernel.shape[1]))

    def ours(a, w):
        weights = ops.convert_to_tensor(cotangent, "float32")
        return ops.sum(fn(a, w, labels) * weights)

    def reference(a, w):
        return np.sum(ref(a, w, labels) * cotangent)

    value, (d_x, d_w) = lc.value_and_grads(ours, x, kernel, mode=mode)
    np.testing.assert_allclose(value, reference(x, kernel), rtol=1e-4)
    x64, k64 = x.astype(np.float64), kernel.astype(np.float64)
    np.testing.assert_allclose(
        d_x, lc.numeric_grad(lambda a: reference(a, k64), x64), rtol=2e-3,
        atol=2e-3,
    )
    np.testing.assert_allclose(
        d_w, lc.numeric_grad(lambda w: reference(x64, w), k64), rtol=2e-3,
        atol=2e-3,
    )


def test_arcface_beyond_pi_branch_and_edges():
    kernel = np.eye(2, dtype=np.float32)
    # θ_y = 170° (θ + m > π), θ_y = 0° (cos = 1), θ_y = 180° (cos = −1), x = 0.
    angles = np.deg2rad([170.0, 0.0, 180.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    x = np.concatenate([x, np.zeros((1, 2), np.float32)])
    labels = np.zeros(4, np.int32)
    logits = lc.to_numpy(hd.arcface_logits(x, kernel, labels, 10.0, 0.5))
    ref = np_arcface(x[:3], kernel, labels[:3], 10.0, 0.5)
    np.testing.assert_allclose(logits[:3], ref, atol=1e-4)
    _, (d_x, d_w) = lc.value_and_grads(
        lambda a, w: ops.sum(hd.arcface_logits(a, w, labels, 10.0, 0.5)),
        x,
        kernel,
    )
    assert np.all(np.isfinite(d_x)) and np.all(np.isfinite(d_w))


def test_cosface_and_arcface_layers_match_functions():
    x, _, labels = random_case(21)
    for layer, fn in [
        (ring_loss_tf.CosFace(7, scale=16.0, margin=0.2), hd.cosface_logits),
        (ring_loss_tf.ArcFace(7, scale=16.0, margin=0.3), hd.arcface_logits),
    ]:
        train = lc.to_numpy(layer([x, labels], training=True))
        kernel = lc.to_numpy(layer.kernel)
        np.testing.assert_allclose(
            train,
            lc.to_numpy(fn(x, kernel, labels, layer.scale, layer.margin)),
            rtol=1e-6,
        )
        infer = lc.to_numpy(layer([x, labels], training=False))
        cos, _ = np_cos(x, kernel)
        np.testing.assert_allclose(infer, layer.scale * cos, atol=1e-4)


def test_arcface_rejects_margin_beyond_pi():
    with pytest.raises(ValueError, match="radians"):
        ring_loss_tf.ArcFace(3, margin=4.0)



# --------------------------------------------------------------------------
# Margin functions: class slices, labels outside the slice
# --------------------------------------------------------------------------

# Each registered margin with arguments that make it differ from no margin.
MARGIN_CASES = {
    "asoftmax": {"margin": 4, "lambda_": 5.0},
    "cosface": {"scale": 30.0, "margin": 0.35},
    "arcface": {"scale": 30.0, "margin": 0.5},
    "none": {},
}


def np_margin(name, x, kernel, labels, arguments):
    """The float64 reference of MARGINS[name]; labels outside the classes: none."""
    classes = kernel.shape[1]
    inside = (labels >= 0) & (labels < classes)
    cos, norms = np_cos(x, kernel)
    if "scale" in arguments:
        plain = arguments["scale"] * cos
    else:  # no margin, and A-Softmax off target: ‖x‖ cos θ_j
        plain = norms * cos
    out = plain.copy()
    if name == "none" or not inside.any():
        return out
    y = np.where(inside, labels, 0)
    with_margin = {
        "asoftmax": lambda: np_a_softmax(
            x, kernel, y, arguments["margin"], arguments["lambda_"]
        ),
        "cosface": lambda: np_cosface(
            x, kernel, y, arguments["scale"], arguments["margin"]
        ),
        "arcface": lambda: np_arcface(
            x, kernel, y, arguments["scale"], arguments["margin"]
        ),
    }[name]()
    out[inside] = with_margin[inside]
    return out


@pytest.mark.parametrize("name", sorted(MARGIN_CASES))
def test_margin_function_on_class_slices_equals_the_whole(name):
    """A sharded classifier's replicas: columns [0, 3) and [3, 7), labels − start.

    A row whose class is on the other slice gets no margin there, so the
    concatenated slices are exactly the whole, and the whole matches the
    float64 reference.
    """
    x, kernel, labels = random_case(50, batch=12)
    labels[:4] = [0, 2, 3, 6]  # targets on both sides of the cut
    margin, arguments = hd.MARGINS[name], MARGIN_CASES[name]
    cos, norms = hd.class_cosines(x, kernel)
    whole = lc.to_numpy(margin(cos, norms, labels, **arguments))
    parts = []
    for start, stop in ((0, 3), (3, 7)):
        # What the slice's own classifier computes from its kernel columns
        # (equal up to the matmul's summation order, which BLAS may change
        # with the width)...
        cos_part, norms_part = hd.class_cosines(x, kernel[:, start:stop])
        np.testing.assert_allclose(
            lc.to_numpy(cos_part), lc.to_numpy(cos)[:, start:stop], atol=1e-6
        )
        # ...and the margin function on it: column by column, so exact.
        cos_part = ops.convert_to_tensor(lc.to_numpy(cos)[:, start:stop])
        parts.append(
            lc.to_numpy(margin(cos_part, norms_part, labels - start,
                               **arguments))
        )
    np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)
    np.testing.assert_allclose(
        whole, np_margin(name, x, kernel, labels, arguments),
        rtol=1e-4, atol=1e-4,
    )


@pytest.mark.parametrize("name", sorted(MARGIN_CASES))
def test_labels_outside_the_classes_give_no_margin(name):
    x, kernel, _ = random_case(51)
    labels = np.array([-1, 7, 100, -5, 0, 6], np.int32)  # 7 classes
    margin, arguments = hd.MARGINS[name], MARGIN_CASES[name]
    logits = lc.to_numpy(margin(*hd.class_cosines(x, kernel), labels,
                                **arguments))
    reference = np_margin(name, x, kernel, labels, arguments)
    np.testing.assert_allclose(logits, reference, rtol=1e-4, atol=1e-4)
    # The first four rows are the margin-free logits.
    cos, norms = np_cos(x, kernel)
    plain = arguments.get("scale", 1.0) * (
        cos if "scale" in arguments else norms * cos
    )
    np.testing.assert_allclose(logits[:4], plain[:4], rtol=1e-4, atol=1e-4)
    if name != "none":
        assert np.abs(logits[4:] - plain[4:]).max() > 1e-2, "margin applied"


def test_class_cosines_match_reference_and_zero_row():
    x, kernel, _ = random_case(52)
    x[0] = 0.0
    cos, norms = hd.class_cosines(x, kernel)
    ref_cos, ref_norms = np_cos(x, kernel)
    np.testing.assert_allclose(lc.to_numpy(cos), ref_cos, atol=1e-6)
    np.testing.assert_allclose(lc.to_numpy(norms), ref_norms, rtol=1e-6)
    assert lc.to_numpy(norms).shape == (len(x), 1)
    np.testing.assert_array_equal(lc.to_numpy(cos)[0], 0.0)


# --------------------------------------------------------------------------
# CosineClassifier: the heads' common part, and a user's own margin
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "head,margin_function,arguments",
    [
        (lambda: ring_loss_tf.CosFace(7, scale=8.0, margin=0.3),
         "cosface", {"scale": 8.0, "margin": 0.3}),
        (lambda: ring_loss_tf.ArcFace(7, scale=8.0, margin=0.3,
                                      easy_margin=True),
         "arcface", {"scale": 8.0, "margin": 0.3, "easy_margin": True}),
    ],
)
def test_heads_are_a_cosine_classifier_with_their_margin(
    head, margin_function, arguments
):
    x, _, labels = random_case(53)
    head = head()
    generic = ring_loss_tf.CosineClassifier(
        7, margin_function=margin_function, margin_arguments=arguments
    )
    assert isinstance(head, ring_loss_tf.CosineClassifier)
    head.build([x.shape, labels.shape])
    generic.build([x.shape, labels.shape])
    generic.kernel.assign(head.kernel)
    for training in (True, False):
        np.testing.assert_array_equal(
            lc.to_numpy(head([x, labels], training=training)),
            lc.to_numpy(generic([x, labels], training=training)),
        )


def test_cosine_classifier_without_margin_is_normalised_weight_softmax():
    x, _, labels = random_case(54)
    layer = ring_loss_tf.CosineClassifier(7)
    logits = lc.to_numpy(layer([x, labels], training=True))
    cos, norms = np_cos(x, lc.to_numpy(layer.kernel))
    np.testing.assert_allclose(logits, norms * cos, rtol=1e-5, atol=1e-5)
    assert [w.name for w in layer.weights] == ["kernel"]
    scaled = ring_loss_tf.CosineClassifier(
        7, margin_arguments={"scale": 16.0}, margin_warmup_steps=1
    )
    logits = lc.to_numpy(scaled([x, labels], training=True))
    cos, _ = np_cos(x, lc.to_numpy(scaled.kernel))
    np.testing.assert_allclose(logits, 16.0 * cos, rtol=1e-5, atol=1e-5)
    assert int(lc.to_numpy(scaled.iterations)) == 1


def combined_margin(cos, norms, labels, scale=64.0, m2=0.3, m3=0.2):
    """The example of ring_loss_tf/heads.py's docstring, as a user writes it."""
    mask = hd.target_mask(labels, ops.shape(cos)[-1])
    target = ops.cos(ops.arccos(ops.clip(cos, -1 + 1e-7, 1 - 1e-7)) + m2)
    return scale * (cos + mask * (target - m3 - cos))


def test_a_new_margin_is_one_function_and_one_registry_line(tmp_path):
    x, _, labels = random_case(55)
    hd.MARGINS["combined"] = combined_margin
    try:
        head = ring_loss_tf.CosineClassifier(
            7, margin_function="combined",
            margin_arguments={"scale": 32.0, "m2": 0.3, "m3": 0.2},
            name="head",
        )
        embeddings = keras.Input((5,))
        label_input = keras.Input((), dtype="int32")
        model = keras.Model(
            [embeddings, label_input], head([embeddings, label_input])
        )
        logits = lc.to_numpy(model([x, labels], training=True))
        cos, _ = np_cos(x, lc.to_numpy(head.kernel))
        rows = np.arange(len(x))
        expected = 32.0 * cos
        expected[rows, labels] = 32.0 * (
            np.cos(np.arccos(cos[rows, labels]) + 0.3) - 0.2
        )
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(
            lc.to_numpy(model([x, labels], training=False)), 32.0 * cos,
            rtol=1e-4, atol=1e-4,
        )
        loaded = lc.roundtrip_keras_file(model, str(tmp_path / "m.keras"))
        assert loaded.layers[-1].margin_arguments == head.margin_arguments
        np.testing.assert_array_equal(
            lc.to_numpy(loaded([x, labels], training=True)), logits
        )
    finally:
        del hd.MARGINS["combined"]


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"margin_function": "sphereface"}, r"MARGINS\[name\] = function"),
        ({"margin_function": hd.cosface_margin}, "must be a name"),
        ({"margin_function": "cosface", "margin_arguments": {"s": 1.0}},
         r"do not fit the margin function 'cosface'"),
        ({"margin_arguments": [1.0]}, "must be a dict"),
        ({"margin_warmup_steps": -1}, "margin_warmup_steps"),
        ({"num_classes": 0}, "num_classes"),
    ],
)
def test_cosine_classifier_rejects_bad_arguments(kwargs, match):
    args = {"num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        ring_loss_tf.CosineClassifier(**args)


@pytest.mark.parametrize(
    "layer",
    [
        ring_loss_tf.ASoftmax(10, margin=2, lambda_base=100.0,
                              lambda_gamma=0.1, lambda_power=2.0,
                              lambda_min=1.0),
        ring_loss_tf.CosFace(10, scale=30.0, margin=0.2),
        ring_loss_tf.ArcFace(10, scale=30.0, margin=0.3, easy_margin=True),
        ring_loss_tf.ArcFace(10, margin_warmup_steps=100),
        ring_loss_tf.ASoftmax(10, margin_warmup_steps=200),
        ring_loss_tf.CosineClassifier(
            10, margin_function="arcface",
            margin_arguments={"scale": 8.0}, margin_warmup_steps=3,
        ),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_config_roundtrip(layer):
    lc.config_roundtrip(layer)


@pytest.mark.parametrize(
    "layer,keys",
    [
        (ring_loss_tf.ASoftmax(3), {"margin", "lambda_base", "lambda_gamma",
                                    "lambda_power", "lambda_min"}),
        (ring_loss_tf.CosFace(3), {"scale", "margin"}),
        (ring_loss_tf.ArcFace(3), {"scale", "margin", "easy_margin"}),
    ],
    ids=lambda v: type(v).__name__ if not isinstance(v, set) else "",
)
def test_head_configs_keep_release_0_1_keys(layer, keys):
    """The heads' configs are their constructor arguments, as in 0.1.0."""
    base = {"name", "trainable", "dtype", "num_classes", "margin_warmup_steps"}
    assert set(layer.get_config()) == base | keys


# --------------------------------------------------------------------------
# A .keras file saved by release 0.1.0 (tests/fixtures/make_release_fixture.py)
# --------------------------------------------------------------------------


def test_release_0_1_keras_file_loads_with_its_weights_and_outputs():
    with np.load(FIXTURES / "release_0_1_heads.npz") as archive:
        saved = {key: archive[key] for key in archive.files}
    model = keras.saving.load_model(FIXTURES / "release_0_1_heads.keras")
    # The registered names found today's classes.
    for name, cls in (("asoftmax", hd.ASoftmax), ("cosface", hd.CosFace),
                      ("arcface", hd.ArcFace)):
        assert type(model.get_layer(name)) is cls
    # JAX's RingLoss has one more weight, `radius_offset`, 0 outside a step
    # and not in the file (ring_loss_tf/layers.py, `_radius_offset_weight`).
    weights = [w for w in model.weights if w.path != "ring/radius_offset"]
    if len(weights) < len(model.weights):
        assert lc.backend() == "jax"
        assert float(lc.to_numpy(model.get_layer("ring").radius_offset)) == 0
    paths = sorted("weight:" + w.path for w in weights)
    assert paths == sorted(k for k in saved if k.startswith("weight:"))
    for weight in weights:
        np.testing.assert_array_equal(
            lc.to_numpy(weight), saved["weight:" + weight.path], weight.path
        )
    assert int(lc.to_numpy(model.get_layer("asoftmax").iterations)) == 4
    assert model.get_layer("asoftmax").margin_step() == 2
    assert [w.name for w in model.get_layer("arcface").weights] == ["kernel"]
    assert float(lc.to_numpy(model.get_layer("ring").radius)) != 1.0
    x, y = saved["x"], saved["y"]
    heads = ("asoftmax", "cosface", "arcface", "l2softmax")
    for mode, training in (("inference", False), ("training", True)):
        for head, logits in zip(heads, model([x, y], training=training)):
            np.testing.assert_allclose(
                lc.to_numpy(logits), saved[f"{mode}:{head}"], rtol=1e-6,
                atol=1e-6, err_msg=f"{head}, {mode}",
            )
    # The training call counted on from the restored counters.
    assert int(lc.to_numpy(model.get_layer("asoftmax").iterations)) == 5
    assert int(lc.to_numpy(model.get_layer("cosface").iterations)) == 5


# --------------------------------------------------------------------------
# What Keras users pass: labels outside the classes, float labels, NumPy
# scalars
# --------------------------------------------------------------------------

HEAD_CLASSES = [hd.ASoftmax, hd.CosFace, hd.ArcFace, hd.CosineClassifier]


def _with_label(labels, row, label):
    labels = labels.copy()
    labels[row] = label
    return labels


@pytest.mark.parametrize("label", [7, -1])
@pytest.mark.parametrize("cls", HEAD_CLASSES, ids=lambda c: c.__name__)
def test_training_call_refuses_labels_outside_the_classes(cls, label):
    x, _, labels = random_case(21)
    head = cls(7)
    bad = _with_label(labels, 2, label)
    message = (
        rf"{cls.__name__}: label {label} is outside \[0, num_classes=7\)"
    )
    with pytest.raises(ValueError, match=message):
        head([x, bad], training=True)
    with pytest.raises(ValueError, match=message):
        head([x, bad.astype(np.int64)], training=True)
    # Inference does not read the labels: any class may appear there.
    np.testing.assert_array_equal(
        lc.to_numpy(head([x, bad], training=False)),
        lc.to_numpy(head([x, labels], training=False)),
    )


def _compiled_modes():
    """How a compiled training step runs the head, per backend."""
    return {"tensorflow": ["function", "jit"], "jax": ["jit"]}.get(
        lc.backend(), ["eager"]
    )


def _training_logits(head, x, labels, mode):
    """The head's training logits in a compiled function (`mode`)."""
    if lc.backend() == "tensorflow" and mode != "eager":
        import tensorflow as tf

        step = tf.function(
            lambda x, y: head([x, y], training=True),
            jit_compile=mode == "jit",
        )
        return lc.to_numpy(step(tf.constant(x), tf.constant(labels)))
    if lc.backend() == "jax":
        import jax

        trainable = [v.value for v in head.trainable_weights]
        state = [v.value for v in head.non_trainable_weights]

        @jax.jit
        def step(x, y):
            return head.stateless_call(trainable, state, [x, y],
                                       training=True)[0]

        return np.asarray(step(x, labels))
    return lc.to_numpy(head([x, labels], training=True))


@pytest.mark.parametrize("mode", _compiled_modes())
@pytest.mark.parametrize("label", [7, -1])
def test_compiled_training_step_refuses_labels_outside_the_classes(
    label, mode
):
    """A compiled step raises with the same message; XLA on TensorFlow,
    which drops assertions, gives the row NaN logits instead."""
    x, _, labels = random_case(22)
    head = hd.CosFace(7, scale=8.0)
    head([x, labels], training=False)  # built
    good = _training_logits(head, x, labels, mode)
    np.testing.assert_allclose(
        good, np_cosface(x, lc.to_numpy(head.kernel), labels, 8.0, 0.35),
        rtol=1e-5, atol=1e-5,
    )
    bad = _with_label(labels, 2, label)
    if mode == "jit" and lc.backend() == "tensorflow":
        logits = _training_logits(head, x, bad, mode)
        assert np.all(np.isnan(logits[2]))
        np.testing.assert_array_equal(np.delete(logits, 2, 0),
                                      np.delete(good, 2, 0))
        return
    with pytest.raises(Exception) as error:
        _training_logits(head, x, bad, mode)
    text = str(error.value)
    found = re.search(
        r"CosFace: (label (-?\d+)|a label \(printed last\)) is outside "
        r"\[0, num_classes=7\): labels are class ids 0 \.\. 6", text
    )
    assert found, text
    # The label is named: in the text, or printed after it (TensorFlow).
    assert found.group(2) == str(label) or f"[{label}]" in text, text


def _model(head, embedding_dim=5, label_dtype="int32"):
    embeddings = keras.Input((embedding_dim,))
    labels = keras.Input((), dtype=label_dtype)
    return keras.Model([embeddings, labels], head([embeddings, labels]))


@pytest.mark.parametrize("jit", FIT_JIT)
def test_fit_refuses_labels_outside_the_classes(jit):
    x, _, labels = random_case(23, batch=8, classes=5)
    model = _model(hd.ASoftmax(5, name="head"))
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=jit,
    )
    bad = _with_label(labels, 3, 5)
    if jit and lc.backend() == "tensorflow":
        # No assertion survives XLA: the head's NaN logits make the loss NaN.
        history = model.fit([x, bad], bad, batch_size=8, verbose=0)
        assert np.isnan(history.history["loss"][0])
        return
    with pytest.raises(Exception) as error:
        model.fit([x, bad], bad, batch_size=8, verbose=0)
    assert re.search(
        r"ASoftmax: (label 5|a label \(printed last\)) is outside "
        r"\[0, num_classes=5\)", str(error.value)
    ), str(error.value)


@pytest.mark.parametrize("cls", HEAD_CLASSES, ids=lambda c: c.__name__)
def test_heads_refuse_float_labels(cls):
    message = (
        r"takes integer class ids as labels; declare the labels input as "
        r"keras.Input\(\(\), dtype=\"int32\"\).*"
        r"Received: labels of dtype float32"
    )
    # A labels Input left at Keras' default dtype is refused when built.
    with pytest.raises(ValueError, match=message):
        _model(cls(7), label_dtype="float32")
    x, _, labels = random_case(24)
    head = cls(7)
    for training in (True, False):
        with pytest.raises(ValueError, match=message):
            head([x, labels.astype(np.float32) + 0.7], training=training)


NUMPY_SCALAR_HEADS = {
    "ASoftmax": (hd.ASoftmax, dict(
        num_classes=np.int64(10), margin=np.int64(2),
        lambda_base=np.float32(100.0), lambda_gamma=np.float64(0.1),
        lambda_power=np.float32(2.0), lambda_min=np.int32(1),
        margin_warmup_steps=np.int64(3),
    )),
    "CosFace": (hd.CosFace, dict(
        num_classes=np.int32(10), scale=np.float32(30.0),
        margin=np.float64(0.2),
    )),
    "ArcFace": (hd.ArcFace, dict(
        num_classes=np.uint8(10), scale=np.float64(30.0),
        margin=np.float32(0.3), easy_margin=np.bool_(True),
    )),
    "CosineClassifier": (hd.CosineClassifier, dict(
        num_classes=np.int64(10), margin_function="cosface",
        margin_arguments={"scale": np.float32(8.0), "margin": np.float16(0.25)},
    )),
}


def _plain(value):
    """The Python number a NumPy scalar holds (independent of the layers)."""
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _assert_plain_numbers(config):
    for key, value in config.items():
        if isinstance(value, dict):
            _assert_plain_numbers(value)
        else:
            assert not isinstance(value, np.generic), (key, type(value))


@pytest.mark.parametrize("name", sorted(NUMPY_SCALAR_HEADS))
def test_heads_accept_numpy_scalars_and_save_python_numbers(name, tmp_path):
    """`num_classes=y.max() + 1` (a NumPy integer) works, and the config
    (and so the .keras file) holds the Python numbers."""
    cls, arguments = NUMPY_SCALAR_HEADS[name]
    head = cls(**arguments, name="head")
    python = cls(**{k: _plain(v) for k, v in arguments.items()}, name="head")
    config = head.get_config()
    assert config == python.get_config()
    _assert_plain_numbers(config)
    json.dumps(config)  # no NumPy scalar left to fail JSON
    for key, value in arguments.items():
        assert config.get(key, value) == _plain(value), key
    model = _model(head)
    x, _, labels = random_case(25, classes=10)
    expected = lc.to_numpy(model([x, labels], training=False))
    loaded = lc.roundtrip_keras_file(model, str(tmp_path / "m.keras"))
    _assert_plain_numbers(loaded.get_layer("head").get_config())
    assert loaded.get_layer("head").get_config() == config
    np.testing.assert_array_equal(
        lc.to_numpy(loaded([x, labels], training=False)), expected
    )
