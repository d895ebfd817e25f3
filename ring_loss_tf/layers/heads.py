"""Classification heads on cosines: a classifier and margin functions.

A head here is two parts, as in insightface's arcface_torch:

- the **classifier** (`CosineClassifier`, maths in `class_cosines`) owns
  the class kernel W, whose columns normalised are the class centres ŵ_j,
  and turns embeddings x into cos θ_j = x̂·ŵ_j and ‖x‖;
- a **margin function** turns (cos θ, ‖x‖, labels) into logits:
  `a_softmax_margin`, `cosface_margin`, `arcface_margin`, `no_margin`.
  It is a pure function of `keras.ops` that never sees the kernel.

`ASoftmax`, `CosFace` and `ArcFace` are a `CosineClassifier` with their
margin function, their arguments and (A-Softmax) the λ schedule. The loss
stays separate: the logits go to sparse categorical cross-entropy.

Margin functions and class slices
---------------------------------
Every margin function has the signature

    margin(cos, norms, labels, **arguments) -> logits

with `cos` of shape `(batch_size, num_classes)`, `norms` = ‖x‖ of shape
`(batch_size, 1)` and integer `labels` of shape `(batch_size,)`, and acts
column by column: the target column of each row gets the margin, the other
columns depend only on their own cosine. A label outside
`[0, num_classes)` gives its row no margin at all (`target_mask` is a row
of zeros). So a classifier sharded by classes, each replica holding
columns `[start, start + width)`, reuses the functions unchanged: it
passes `labels - start`, and a row whose class lives on another replica
gets no margin there. Applied to the slices and concatenated, the logits
are exactly those of the whole on the same cosines (tests/layers/test_heads.py
checks it). The same rule gives
the margin-free logits for inference and the warm-up: the classifier calls
the function with every label −1.

A new margin: one function and one line
---------------------------------------
Write the function, register it in `MARGINS`, and name it in a
`CosineClassifier`; the arguments are saved in `get_config`, so a `.keras`
file loads wherever the registering line has run::

    from keras import ops
    from ring_loss_tf.layers import heads

    def combined_margin(cos, norms, labels, scale=64.0, m2=0.3, m3=0.2):
        # insightface's combined margin s·(cos(θ + m2) − m3) on the target
        mask = heads.target_mask(labels, ops.shape(cos)[-1])
        target = ops.cos(ops.arccos(ops.clip(cos, -1 + 1e-7, 1 - 1e-7)) + m2)
        return scale * (cos + mask * (target - m3 - cos))

    heads.MARGINS["combined"] = combined_margin

    head = heads.CosineClassifier(
        num_classes, margin_function="combined",
        margin_arguments={"scale": 32.0, "m2": 0.3, "m3": 0.2},
    )
    logits = head([embeddings, labels])

Everything runs in float32, also under a mixed-precision policy: cosines and
margins lose too much in float16.

Over 600 lines: the three margins' maths (the A-Softmax ψ and λ
schedule, the CosFace and ArcFace forms with their edge cases) and the
layers built on them are one contract a sharded classifier reuses; most of
the length is the formulas' docstrings.
"""

import inspect
import math

import keras
from keras import ops

from ring_loss_tf.layers.ops import PACKAGE
from ring_loss_tf.layers.ops import check_label_range
from ring_loss_tf.layers.ops import check_labels_dtype
from ring_loss_tf.layers.ops import check_num_classes
from ring_loss_tf.layers.ops import check_positive
from ring_loss_tf.layers.ops import embeddings_shape
from ring_loss_tf.layers.ops import float32
from ring_loss_tf.layers.ops import normalize
from ring_loss_tf.layers.ops import plain_number
from ring_loss_tf.layers.ops import poison_out_of_range
from ring_loss_tf.layers.ops import replica_local_weight
from ring_loss_tf.layers.ops import safe_norm
from ring_loss_tf.layers.ops import with_labels

A_SOFTMAX_MARGINS = (1, 2, 3, 4)


# --------------------------------------------------------------------------
# The classifier's maths
# --------------------------------------------------------------------------


def class_cosines(embeddings, kernel):
    """cos θ_j = x̂·ŵ_j and ‖x‖ for the columns ŵ_j of `kernel`, normalised.

    Args:
        embeddings: `(batch_size, embedding_dim)`.
        kernel: `(embedding_dim, num_classes)`, or a slice of its columns.

    Returns:
        `(cos, norms)`: float32 `(batch_size, num_classes)` cosines, clipped
        to [−1, 1] (rounding can leave |x̂·ŵ| a little above 1, where arccos
        and sin θ = √(1 − cos²) are undefined), and float32 `(batch_size, 1)`
        norms. A zero embedding has cosines 0 and norm 0.
    """
    x = float32(embeddings)
    weights = normalize(float32(kernel), axis=0)
    norms = safe_norm(x, keepdims=True)
    cos = ops.clip(ops.matmul(normalize(x), weights), -1.0, 1.0)
    return cos, norms


def target_mask(labels, num_classes):
    """1.0 where column j is row i's label, else 0.0: `(batch_size, num_classes)`.

    A label outside [0, num_classes) (−1, or a class of another slice)
    gives a row of zeros: `ops.one_hot` would do the same on TensorFlow and
    JAX but not on every backend, a comparison does on all of them.
    """
    labels = ops.reshape(ops.cast(labels, "int32"), (-1, 1))
    classes = ops.expand_dims(ops.arange(num_classes, dtype="int32"), 0)
    return ops.cast(ops.equal(labels, classes), "float32")


def _no_targets(labels):
    """Labels −1 for every row: no row gets a margin."""
    return ops.full_like(ops.reshape(labels, (-1,)), -1, dtype="int32")


# --------------------------------------------------------------------------
# Margin functions: (cos θ, ‖x‖, labels, arguments) → logits
# --------------------------------------------------------------------------


def no_margin(cos, norms, labels, scale=None):
    """Softmax on normalised class weights: ‖x‖·cos θ_j, or s·cos θ_j.

    Without `scale` the logits are x·ŵ_j (a softmax with unit-norm weights
    and no bias, A-Softmax with m = 1); with it, NormFace's s·cos θ_j.
    `labels` are not used: the signature is every margin function's.
    """
    del labels
    if scale is None:
        return norms * cos
    return scale * cos


def a_softmax_lambda(
    iteration, lambda_base=1000.0, lambda_gamma=0.12, lambda_power=1.0,
    lambda_min=5.0,
):
    """λ = max(λ_min, base · (1 + γ·t)^(−power)), SphereFace's schedule."""
    t = float32(iteration)
    decayed = lambda_base * ops.power(1.0 + lambda_gamma * t, -lambda_power)
    return ops.maximum(decayed, lambda_min)


def _chebyshev_cos(cos, margin):
    """cos(m·θ) as a polynomial of cos θ (exact for m = 1..4)."""
    if margin == 1:
        return cos
    if margin == 2:
        return 2.0 * ops.square(cos) - 1.0
    if margin == 3:
        return (4.0 * ops.square(cos) - 3.0) * cos
    c2 = ops.square(cos)
    return 8.0 * ops.square(c2) - 8.0 * c2 + 1.0


def a_softmax_psi(cos, margin):
    """ψ(θ) = (−1)^k · cos(mθ) − 2k,  k = ⌊mθ/π⌋, as a function of cos θ.

    k counts the thresholds cos(jπ/m), j = 1..m, that cos θ lies at or
    below, the sign trick of the official Caffe layer. k is piecewise
    constant: no gradient through it, and no acos anywhere.
    """
    cos = ops.clip(float32(cos), -1.0, 1.0)
    frozen = ops.stop_gradient(cos)
    k = ops.zeros_like(cos)
    for j in range(1, margin + 1):
        threshold = math.cos(j * math.pi / margin)
        k = k + ops.cast(frozen <= threshold, "float32")
    sign = 1.0 - 2.0 * ops.mod(k, 2.0)
    return sign * _chebyshev_cos(cos, margin) - 2.0 * k


def a_softmax_margin(cos, norms, labels, margin=4, lambda_=0.0):
    """SphereFace's A-Softmax on cosines (Liu et al. 2017), training form.

        target logit  f_y = ‖x‖ · (λ cos θ_y + ψ(θ_y)) / (1 + λ)
        other logits  f_j = ‖x‖ cos θ_j

    Args:
        cos: `(batch_size, num_classes)` cosines.
        norms: `(batch_size, 1)` embedding norms ‖x‖.
        labels: `(batch_size,)` integer class ids; outside [0, num_classes)
            a row gets no margin.
        margin: m ∈ {1, 2, 3, 4}.
        lambda_: the annealing weight λ (scalar).
    """
    lambda_ = float32(lambda_)
    target = norms * (lambda_ * cos + a_softmax_psi(cos, margin)) / (
        1.0 + lambda_
    )
    mask = target_mask(labels, ops.shape(cos)[-1])
    return mask * target + (1.0 - mask) * (norms * cos)


def cosface_margin(cos, norms, labels, scale=64.0, margin=0.35):
    """CosFace / AM-Softmax: s·(cos θ_j − m·[j = y])  (Wang et al. 2018)."""
    del norms
    mask = target_mask(labels, ops.shape(cos)[-1])
    return scale * (cos - margin * mask)


def _sine(cos):
    """sin θ = √(1 − cos²θ) with a finite gradient at |cos θ| = 1."""
    squared = 1.0 - ops.square(cos)
    positive = squared > 0
    safe = ops.where(positive, squared, ops.ones_like(squared))
    return ops.where(positive, ops.sqrt(safe), ops.zeros_like(squared))


def arcface_margin(
    cos, norms, labels, scale=64.0, margin=0.5, easy_margin=False
):
    """ArcFace: s·cos(θ_y + m) for the target, s·cos θ_j otherwise.

    cos(θ + m) is monotonic only while θ + m ≤ π. Beyond that (cos θ ≤
    cos(π − m)) the target logit continues as cos θ − m·sin(m), as in the
    ArcFace paper's code; with `easy_margin` the margin applies only where
    cos θ > 0 (Deng et al. 2019).
    """
    del norms
    with_margin = cos * math.cos(margin) - _sine(cos) * math.sin(margin)
    if easy_margin:
        target = ops.where(cos > 0, with_margin, cos)
    else:
        threshold = math.cos(math.pi - margin)
        fallback = cos - math.sin(math.pi - margin) * margin
        target = ops.where(cos > threshold, with_margin, fallback)
    mask = target_mask(labels, ops.shape(cos)[-1])
    return scale * (mask * target + (1.0 - mask) * cos)


# The names a `CosineClassifier` accepts as `margin_function`; a new margin
# is one function and one line here (see the module docstring).
MARGINS = {
    "none": no_margin,
    "asoftmax": a_softmax_margin,
    "cosface": cosface_margin,
    "arcface": arcface_margin,
}


# --------------------------------------------------------------------------
# The functions on embeddings and a kernel (one call: classifier + margin)
# --------------------------------------------------------------------------


def a_softmax_logits(embeddings, kernel, labels, margin=4, lambda_=0.0):
    """SphereFace's A-Softmax logits (Liu et al. 2017), training form.

        target logit  f_y = (λ‖x‖cos θ_y + ‖x‖ψ(θ_y)) / (1 + λ)
        other logits  f_j = ‖x‖ cos θ_j

    Args:
        embeddings: `(batch_size, embedding_dim)`.
        kernel: `(embedding_dim, num_classes)`; columns are normalised here.
        labels: `(batch_size,)` integer class ids.
        margin: m ∈ {1, 2, 3, 4}.
        lambda_: the annealing weight λ (scalar).

    Returns:
        float32 logits `(batch_size, num_classes)`.
    """
    cos, norms = class_cosines(embeddings, kernel)
    return a_softmax_margin(cos, norms, labels, margin, lambda_)


def cosface_logits(embeddings, kernel, labels, scale=64.0, margin=0.35):
    """CosFace / AM-Softmax: s·(cos θ_j − m·[j = y])  (Wang et al. 2018)."""
    cos, norms = class_cosines(embeddings, kernel)
    return cosface_margin(cos, norms, labels, scale, margin)


def arcface_logits(
    embeddings, kernel, labels, scale=64.0, margin=0.5, easy_margin=False
):
    """ArcFace: s·cos(θ_y + m) for the target, s·cos θ_j otherwise.

    See `arcface_margin` for the branch beyond θ + m = π.
    """
    cos, norms = class_cosines(embeddings, kernel)
    return arcface_margin(cos, norms, labels, scale, margin, easy_margin)


# --------------------------------------------------------------------------
# The classifier layer and the heads built on it
# --------------------------------------------------------------------------


def _check_warmup(margin_warmup_steps):
    margin_warmup_steps = plain_number(margin_warmup_steps)
    if (
        isinstance(margin_warmup_steps, bool)
        or not isinstance(margin_warmup_steps, int)
        or margin_warmup_steps < 0
    ):
        raise ValueError(
            "`margin_warmup_steps` must be an int >= 0 (training steps "
            "before the margin starts; 0 starts with it). "
            f"Received: margin_warmup_steps={margin_warmup_steps!r}"
        )
    return margin_warmup_steps


def _check_margin_function(margin_function, margin_arguments):
    if not isinstance(margin_function, str) or margin_function not in MARGINS:
        raise ValueError(
            "`margin_function` must be a name in "
            "ring_loss_tf.layers.heads.MARGINS "
            f"({', '.join(sorted(MARGINS))}); register a new one with "
            "`MARGINS[name] = function` before building or loading the "
            f"model. Received: margin_function={margin_function!r}"
        )
    if not isinstance(margin_arguments, dict):
        raise ValueError(
            "`margin_arguments` must be a dict of keyword arguments of the "
            f"margin function, or None. Received: margin_arguments="
            f"{margin_arguments!r}"
        )
    function = MARGINS[margin_function]
    try:
        inspect.signature(function).bind(None, None, None, **margin_arguments)
    except TypeError as error:
        raise ValueError(
            f"`margin_arguments` do not fit the margin function "
            f"'{margin_function}' {inspect.signature(function)}: {error}. "
            f"Received: margin_arguments={margin_arguments!r}"
        ) from None


@keras.saving.register_keras_serializable(package=PACKAGE)
class CosineClassifier(keras.layers.Layer):
    """Logits from the cosines to the class centres, through a margin function.

        cos θ_j = x̂ · ŵ_j,   ŵ_j = W_j / ‖W_j‖        (`class_cosines`)
        logits  = margin(cos θ, ‖x‖, labels, **margin_arguments)

    The kernel W `(embedding_dim, num_classes)` is float32 under every
    policy and has no bias. At inference (`training=False`) and during the
    warm-up the margin function is called with every label −1, which gives
    its margin-free logits (‖x‖cos θ_j or s·cos θ_j).

    `margin_warmup_steps` W stages training (the SphereFace authors' advice
    for runs that do not converge: start from softmax training, then
    fine-tune with the margin): the first W training calls use the margin-
    free logits, the margin starts at call W + 1. The non-trainable weight
    `iterations` counts training calls, so a resumed run continues in the
    phase it stopped in; it exists only when there is something to count
    (W > 0, or a schedule such as A-Softmax's λ), so files saved without
    one load unchanged.

    Args:
        num_classes: number of identities.
        margin_function: a name in `MARGINS` ("none", "asoftmax",
            "cosface", "arcface", or one registered by the user).
        margin_arguments: dict of the function's keyword arguments, e.g.
            `{"scale": 30.0, "margin": 0.2}`; saved by `get_config`.
        margin_warmup_steps: W (default 0).

    Input: `[embeddings (batch_size, embedding_dim), labels (batch_size,)]`,
    labels integer class ids (a float labels tensor is refused). A training
    call refuses a label outside [0, num_classes) with a message naming it
    and `num_classes`, eagerly and in `fit` on every backend (a ValueError;
    in a compiled step the backend's runtime error carries it); only inside
    an XLA-compiled TensorFlow function, which drops assertions, are that
    row's logits NaN instead (`ops.check_label_range`). Inference
    does not read the labels.
    Output: float32 logits `(batch_size, num_classes)`; use them with sparse
    categorical cross-entropy from logits.

    Example:
        ```python
        logits = ring_loss_tf.CosineClassifier(
            num_classes, margin_function="cosface",
            margin_arguments={"scale": 30.0, "margin": 0.2},
        )([embeddings, labels])
        ```
    """

    def __init__(
        self,
        num_classes,
        margin_function="none",
        margin_arguments=None,
        margin_warmup_steps=0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        num_classes = check_num_classes(num_classes)
        margin_warmup_steps = _check_warmup(margin_warmup_steps)
        margin_arguments = {} if margin_arguments is None else margin_arguments
        _check_margin_function(margin_function, margin_arguments)
        margin_arguments = {
            name: plain_number(value)
            for name, value in margin_arguments.items()
        }
        self.num_classes = num_classes
        self.margin_function = margin_function
        self.margin_arguments = dict(margin_arguments)
        self.margin_warmup_steps = margin_warmup_steps
        self.iterations = None

    @property
    def counts_steps(self):
        """Whether the layer keeps the training-call count `iterations`."""
        return bool(self.margin_warmup_steps)

    def margin_arguments_at(self, step):
        """The margin function's keyword arguments at margin step `step`.

        `step` is t of the margin phase (a scalar tensor, t ≤ 0 during the
        warm-up, 1 at the first call with the margin), or None when the
        layer keeps no count or runs for inference. Heads whose arguments
        follow a schedule (A-Softmax's λ) override this.
        """
        del step
        return dict(self.margin_arguments)

    def build(self, input_shape):
        shape = embeddings_shape(self, input_shape)
        # float32 under mixed precision: fp16 margins give NaN.
        self.kernel = self.add_weight(
            shape=(shape[-1], self.num_classes),
            name="kernel",
            initializer="glorot_uniform",
            dtype="float32",
            autocast=False,
        )
        if self.counts_steps:
            self.iterations = replica_local_weight(
                self, "iterations", (), "zeros", "int64", "only_first_replica"
            )

    def _count_training_call(self):
        """Counts this call; returns its step t within the margin phase.

        t ≤ 0 during the warm-up; the first call with the margin has t = 1.
        """
        self.iterations.assign_add(ops.ones((), dtype="int64"))
        return self.iterations - self.margin_warmup_steps

    def margin_step(self):
        """Steps taken with the margin on (0 during the warm-up)."""
        t = ops.convert_to_numpy(self.iterations)
        return max(0, int(t) - self.margin_warmup_steps)

    def call(self, inputs, training=None):
        embeddings, labels = with_labels(self, inputs)
        labels = ops.convert_to_tensor(labels)
        check_labels_dtype(self, labels)
        cos, norms = class_cosines(embeddings, self.kernel)
        if not training:
            margin = MARGINS[self.margin_function]
            arguments = self.margin_arguments_at(None)
            return margin(cos, norms, _no_targets(labels), **arguments)
        # Only training reads the labels: inference may see other classes.
        labels, in_range = check_label_range(self, labels, self.num_classes)
        t = self._count_training_call() if self.counts_steps else None
        logits = self.training_logits(cos, norms, labels, t)
        return poison_out_of_range(logits, in_range)

    def training_logits(self, cos, norms, labels, step):
        """The training logits of cosines at margin step `step`.

        `step` is t of `margin_arguments_at` (None when the layer keeps no
        count). During the warm-up (t ≤ 0) the logits are margin-free. A
        sharded head (`ring_loss_tf.models.sharded_head`) calls this on its
        slice of the cosines with its own count.
        """
        margin = MARGINS[self.margin_function]
        arguments = self.margin_arguments_at(step)
        logits = margin(cos, norms, labels, **arguments)
        if step is None or not self.margin_warmup_steps:
            return logits
        plain = margin(cos, norms, _no_targets(labels), **arguments)
        return ops.where(step > 0, logits, plain)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.num_classes)

    def compute_output_spec(self, inputs, training=None):
        embeddings, labels = with_labels(self, inputs)
        check_labels_dtype(self, labels)
        return keras.KerasTensor(
            (embeddings.shape[0], self.num_classes), dtype="float32"
        )

    def _margin_config(self):
        """The constructor arguments that choose the margin (heads override)."""
        return {
            "margin_function": self.margin_function,
            "margin_arguments": dict(self.margin_arguments),
        }

    def get_config(self):
        config = super().get_config()
        config["num_classes"] = self.num_classes
        config["margin_warmup_steps"] = self.margin_warmup_steps
        config.update(self._margin_config())
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class ASoftmax(CosineClassifier):
    """SphereFace's A-Softmax head, as the official Caffe layer computes it.

    Training:

        ψ(θ) = (−1)^k cos(mθ) − 2k,   k = ⌊mθ/π⌋
        f_y  = (λ‖x‖cos θ_y + ‖x‖ψ(θ_y)) / (1 + λ),   f_j = ‖x‖cos θ_j
        λ    = max(lambda_min, lambda_base · (1 + lambda_gamma·t)^−lambda_power)

    with t the step of the margin phase: the non-trainable weight
    `iterations` counts training calls (incremented before λ is computed, so
    the first step uses t = 1), saved and restored with the model so a
    resumed run continues the schedule. With `margin_warmup_steps` W the
    first W training calls return the margin-free logits ‖x‖cos θ_j and
    t = iterations − W: the schedule starts at λ(1) when the margin starts,
    as when the SphereFace authors fine-tune m = 4 from an m = 1 model with
    the counter reset.
    Inference (`training=False`): f_j = ‖x‖cos θ_j. Columns of `kernel` are
    normalised inside `call`; there is no bias. Gradients are exact autodiff
    (the Caffe layer back-propagates a rescaled approximation).

    A `CosineClassifier` with `a_softmax_margin` and the λ schedule.

    Args:
        num_classes: number of identities.
        margin: m ∈ {1, 2, 3, 4}.
        lambda_base, lambda_gamma, lambda_power, lambda_min: the λ schedule.
        margin_warmup_steps: W, training steps without the margin (0: the
            paper's recipe, the margin from the first step).

    Input: `[embeddings (batch_size, embedding_dim), labels (batch_size,)]`.
    Output: float32 logits `(batch_size, num_classes)`; use them with sparse
    categorical cross-entropy from logits.

    Reference: https://arxiv.org/abs/1704.08063
    """

    def __init__(
        self,
        num_classes,
        margin=4,
        lambda_base=1000.0,
        lambda_gamma=0.12,
        lambda_power=1.0,
        lambda_min=5.0,
        margin_warmup_steps=0,
        **kwargs,
    ):
        super().__init__(
            num_classes,
            margin_function="asoftmax",
            margin_warmup_steps=margin_warmup_steps,
            **kwargs,
        )
        margin = plain_number(margin)
        if isinstance(margin, bool) or margin not in A_SOFTMAX_MARGINS:
            raise ValueError(
                f"`margin` must be one of {A_SOFTMAX_MARGINS} (SphereFace's "
                f"integer angular margin). Received: margin={margin!r}"
            )
        self.margin = int(margin)
        self.lambda_base = check_positive(
            "lambda_base", lambda_base, allow_zero=True
        )
        self.lambda_gamma = check_positive(
            "lambda_gamma", lambda_gamma, allow_zero=True
        )
        self.lambda_power = check_positive(
            "lambda_power", lambda_power, allow_zero=True
        )
        self.lambda_min = check_positive(
            "lambda_min", lambda_min, allow_zero=True
        )

    @property
    def counts_steps(self):
        return True  # λ follows the step

    def _lambda(self, step):
        return a_softmax_lambda(
            step,
            self.lambda_base,
            self.lambda_gamma,
            self.lambda_power,
            self.lambda_min,
        )

    def margin_arguments_at(self, step):
        # Without a step no row has a target: λ does not enter the logits.
        lambda_ = 0.0 if step is None else self._lambda(ops.maximum(step, 0))
        return {"margin": self.margin, "lambda_": lambda_}

    def current_lambda(self):
        """λ of the last training step (None during the margin warm-up)."""
        if self.margin_warmup_steps and self.margin_step() == 0:
            return None
        return self._lambda(self.iterations - self.margin_warmup_steps)

    def _margin_config(self):
        return {
            "margin": self.margin,
            "lambda_base": self.lambda_base,
            "lambda_gamma": self.lambda_gamma,
            "lambda_power": self.lambda_power,
            "lambda_min": self.lambda_min,
        }


class _ScaledMarginHead(CosineClassifier):
    """CosFace and ArcFace: margins on s·cos θ logits; plain s·cos θ at inference.

    With `margin_warmup_steps` W > 0 the first W training calls use m = 0
    (the logits s·cos θ_j); the weight `iterations` counting them exists
    only then, so files saved without a warm-up load unchanged.
    """

    def __init__(
        self, num_classes, margin_function, scale, margin,
        margin_warmup_steps=0, **kwargs,
    ):
        super().__init__(
            num_classes,
            margin_function=margin_function,
            margin_warmup_steps=margin_warmup_steps,
            **kwargs,
        )
        self.scale = check_positive("scale", scale)
        self.margin = check_positive("margin", margin, allow_zero=True)

    def margin_arguments_at(self, step):
        del step
        return {"scale": self.scale, "margin": self.margin}

    def _margin_config(self):
        return {"scale": self.scale, "margin": self.margin}


@keras.saving.register_keras_serializable(package=PACKAGE)
class CosFace(_ScaledMarginHead):
    """CosFace head: logits s·(cos θ_j − m·[j = y]) in training, s·cos θ_j after.

    A `CosineClassifier` with `cosface_margin`.

    Args:
        num_classes: number of identities.
        scale: s.
        margin: m, subtracted from the target cosine.
        margin_warmup_steps: training steps with m = 0 first (default 0).

    Input: `[embeddings, labels]`. Output: float32 logits.
    Reference: https://arxiv.org/abs/1801.09414
    """

    def __init__(
        self, num_classes, scale=64.0, margin=0.35, margin_warmup_steps=0,
        **kwargs,
    ):
        super().__init__(
            num_classes, "cosface", scale, margin, margin_warmup_steps,
            **kwargs,
        )


@keras.saving.register_keras_serializable(package=PACKAGE)
class ArcFace(_ScaledMarginHead):
    """ArcFace head: logits s·cos(θ_y + m) for the target in training.

    A `CosineClassifier` with `arcface_margin`.

    Args:
        num_classes: number of identities.
        scale: s.
        margin: additive angular margin m in radians, in [0, π).
        easy_margin: apply the margin only where cos θ > 0.
        margin_warmup_steps: training steps with m = 0 first (default 0).

    Input: `[embeddings, labels]`. Output: float32 logits.
    Reference: https://arxiv.org/abs/1801.07698
    """

    def __init__(
        self, num_classes, scale=64.0, margin=0.5, easy_margin=False,
        margin_warmup_steps=0, **kwargs,
    ):
        super().__init__(
            num_classes, "arcface", scale, margin, margin_warmup_steps,
            **kwargs,
        )
        if self.margin >= math.pi:
            raise ValueError(
                "`margin` is an angle in radians and must be below π "
                f"(0.5 is usual). Received: margin={self.margin!r}"
            )
        self.easy_margin = bool(easy_margin)

    def margin_arguments_at(self, step):
        arguments = super().margin_arguments_at(step)
        arguments["easy_margin"] = self.easy_margin
        return arguments

    def _margin_config(self):
        config = super()._margin_config()
        config["easy_margin"] = self.easy_margin
        return config
