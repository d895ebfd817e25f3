"""Ring loss and the classification heads of the Ring loss paper, as layers.

Each layer has a stateless function twin (`ring_loss` / `RingLoss`, ...):
the layer owns the weights and the training-time state, the function holds
the maths, so tests and benchmarks can call the formula directly.

Everything is written with `keras.ops` and computed in float32, also under a
mixed-precision policy: norms, cosines and margins lose too much in float16.

Norms use `safe_norm`: a zero vector has norm 0 and a finite (zero) gradient,
and a tiny non-zero vector keeps its exact norm. An additive epsilon, as in
`sqrt(sum(x**2) + 1e-12)`, would turn a norm of 1e-9 into 1e-6 (design.md §1).
"""

import math

import keras
from keras import ops

_PACKAGE = "ring_loss_tf"
_MARGINS = (1, 2, 3, 4)


def safe_norm(x, axis=-1, keepdims=False):
    """L2 norm, exact for tiny vectors, with a finite gradient at zero.

    The vector is divided by its largest magnitude first, so Σx² neither
    underflows (a norm of 1e-30 stays 1e-30 in float32) nor overflows, and
    no epsilon is added anywhere. The scale carries no gradient: the norm
    is homogeneous, so ∂‖x‖/∂x = x/‖x‖ exactly. The double `where` keeps
    the square root's argument positive, so a zero vector has norm 0 and
    gradient 0 with neither branch producing inf or NaN.
    """
    scale = ops.stop_gradient(ops.max(ops.abs(x), axis=axis, keepdims=True))
    positive = scale > 0
    safe_scale = ops.where(positive, scale, ops.ones_like(scale))
    squared = ops.sum(ops.square(x / safe_scale), axis=axis, keepdims=True)
    safe_squared = ops.where(positive, squared, ops.ones_like(squared))
    norm = ops.where(
        positive, safe_scale * ops.sqrt(safe_squared), ops.zeros_like(scale)
    )
    if not keepdims:
        norm = ops.squeeze(norm, axis=axis)
    return norm


def _safe_divide(numerator, denominator):
    """numerator / denominator, and 0 where denominator is 0 (both branches finite)."""
    nonzero = denominator != 0
    safe = ops.where(nonzero, denominator, ops.ones_like(denominator))
    return ops.where(nonzero, numerator / safe, ops.zeros_like(numerator))


def _normalize(x, axis=-1):
    """x / ‖x‖ along `axis`; a zero vector stays zero.

    Divides by the largest magnitude first (no gradient through it), so
    every intermediate is O(1): even under XLA's rewrites no ‖x‖² or ‖x‖³
    of a tiny vector underflows into an inf in the backward pass.
    """
    scale = ops.stop_gradient(ops.max(ops.abs(x), axis=axis, keepdims=True))
    scaled = x / ops.where(scale > 0, scale, ops.ones_like(scale))
    return _safe_divide(scaled, safe_norm(scaled, axis=axis, keepdims=True))


def _replica_local_weight(layer, name, shape, initializer, dtype, aggregation):
    """A non-trainable weight that each replica updates without a sync point.

    State updated inside `call` (A-Softmax's step counter, the centers)
    must not need a cross-replica merge: a custom distributed loop runs the
    forward pass as a compiled function inside `strategy.run`, where a
    merge is not allowed. On-read synchronisation keeps one copy per
    replica and aggregates when read (and saved) from outside.
    """
    with keras.name_scope(layer.name, caller=layer):
        variable = keras.Variable(
            initializer=keras.initializers.get(initializer),
            shape=shape,
            dtype=dtype,
            trainable=False,
            autocast=False,
            aggregation=aggregation,
            synchronization="on_read",
            name=name,
        )
    layer._track_variable(variable)
    return variable


_OFFSET_CLASSES = {}


def _radius_offset_weight(layer):
    """JAX only: the non-trainable part of R, folded into `radius` when stored.

    Keras-JAX trains functionally: inside a training step only the optimizer
    writes trainable variables, so the first-batch assignment of the
    trainable `radius` would be dropped. The step writes the jump to the
    batch mean into this non-trainable offset instead (R = radius + offset),
    and whenever a value reaches the variable itself (Keras syncing the
    step's state back at the end of `fit`, before a callback, an eager call)
    it is moved into `radius`. Outside a step the offset is therefore always
    0 and `radius` is R; the optimizer's update of R is the same either way.
    """
    base = type(layer.radius)
    cls = _OFFSET_CLASSES.get(base)
    if cls is None:

        class _RadiusOffset(base):
            def _direct_assign(self, value):
                radius = getattr(self, "_radius", None)
                if radius is not None and radius._value is not None:
                    # Keras restores trainable state before non-trainable
                    # state, so `radius` already holds the step's value.
                    radius.assign(ops.add(radius.value, value))
                    value = ops.zeros_like(value)
                super()._direct_assign(value)

        cls = _OFFSET_CLASSES[base] = _RadiusOffset
    with keras.name_scope(layer.name, caller=layer):
        variable = cls(
            initializer="zeros",
            shape=(),
            dtype="float32",
            trainable=False,
            autocast=False,
            aggregation="mean",
            name="radius_offset",
        )
    variable._radius = layer.radius
    layer._track_variable(variable)
    return variable


def _float32(x):
    return ops.cast(x, "float32")


def _check_rank2(layer, input_shape, what="embeddings"):
    if len(input_shape) != 2:
        raise ValueError(
            f"{type(layer).__name__} expects {what} of shape "
            "(batch_size, embedding_dim); flatten or pool the features first. "
            f"Received: input_shape={tuple(input_shape)}"
        )


def _with_labels(layer, inputs):
    """Checks that a head is called as layer([embeddings, labels])."""
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
        raise ValueError(
            f"{type(layer).__name__} is called as head([embeddings, "
            "labels]); the labels select the target class during "
            f"training. Received: {type(inputs).__name__}"
        )
    return inputs


def _embeddings_shape(layer, input_shape):
    """The embeddings' shape from a [embeddings, labels] input shape."""
    shapes = _with_labels(layer, input_shape)
    if not isinstance(shapes[0], (list, tuple)):
        _with_labels(layer, None)
    _check_rank2(layer, shapes[0])
    return shapes[0]


def _check_num_classes(num_classes):
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or num_classes < 1
    ):
        raise ValueError(
            "`num_classes` must be a positive integer (the number of "
            f"identities). Received: num_classes={num_classes!r}"
        )


def _check_positive(name, value, allow_zero=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = value >= 0 if allow_zero else value > 0
        ok = ok and math.isfinite(value)
    if not ok:
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(
            f"`{name}` must be a {bound} finite number. "
            f"Received: {name}={value!r}"
        )


# --------------------------------------------------------------------------
# Ring loss
# --------------------------------------------------------------------------


def ring_loss(embeddings, radius, loss_weight):
    """L_R = λ/(2m) · Σ_i (‖F_i‖₂ − R)²  (Zheng et al. 2018, eq. 2).

    Args:
        embeddings: `(batch_size, embedding_dim)` features F.
        radius: scalar R.
        loss_weight: λ, in the paper's ½·mean form.

    Returns:
        A float32 scalar.
    """
    norms = safe_norm(_float32(embeddings))
    radius = _float32(radius)
    return loss_weight * 0.5 * ops.mean(ops.square(norms - radius))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class RingLoss(keras.layers.Layer):
    """Pulls embedding norms towards one learned radius R (Ring loss).

    Adds  L_R = λ/(2m) · Σ_i (‖F_i‖₂ − R)²  (Zheng et al. 2018, eq. 2) with
    `add_loss` and returns its input unchanged. Gradients (design.md §1):

        ∂L_R/∂R   = −(λ/m) · Σ_i (‖F_i‖ − R)
        ∂L_R/∂F_i =  (λ/m) · (1 − R/‖F_i‖) · F_i     (0 at F_i = 0)

    R is the scalar trainable weight `radius`, float32 under every policy;
    exclude it from weight decay. With `radius_init="auto"` R starts at the
    mean embedding norm of the first training batch the layer sees; the
    non-trainable weight `radius_initialized` records that this happened, so
    a reloaded or resumed model does not initialise R again. On JAX, whose
    training step cannot assign a trainable variable, the layer has one more
    non-trainable weight, `radius_offset`, holding the first-batch jump until
    the step's state is stored back; outside a step it is 0 and `radius` is
    R on every backend, and `.keras` files hold the same two weights.

    Args:
        loss_weight: λ of eq. 2, in the paper's ½·mean form (ports without
            the ½, such as the authors' PyTorch code, need λ/2 for the same
            effect). 0 adds a zero loss.
        radius_init: positive float, or "auto" (the mean norm of the first
            training batch).

    Input shape: `(batch_size, embedding_dim)`. Output shape: the same.

    Example:
        ```python
        embeddings = backbone(images)
        embeddings = ring_loss_tf.RingLoss(loss_weight=0.01)(embeddings)
        logits = keras.layers.Dense(num_classes)(embeddings)
        ```

    Reference: https://arxiv.org/abs/1803.00130
    """

    def __init__(self, loss_weight=0.01, radius_init="auto", **kwargs):
        super().__init__(**kwargs)
        _check_positive("loss_weight", loss_weight, allow_zero=True)
        if isinstance(radius_init, str):
            if radius_init != "auto":
                raise ValueError(
                    "`radius_init` must be a positive float or 'auto'. "
                    f"Received: radius_init={radius_init!r}"
                )
        else:
            try:
                _check_positive("radius_init", radius_init)
            except ValueError:
                raise ValueError(
                    "`radius_init` must be a positive float or 'auto'. "
                    f"Received: radius_init={radius_init!r}"
                ) from None
        self.loss_weight = loss_weight
        self.radius_init = radius_init
        # Set by `initialize_radius`: R is known to be initialised, so `call`
        # need not emit the first-batch assignment (which would be a
        # cross-replica update inside a distributed, compiled step).
        self._radius_init_done_outside = False
        self.radius_offset = None  # JAX only, made in `build`

    def build(self, input_shape):
        _check_rank2(self, input_shape)
        initial = 1.0 if self.radius_init == "auto" else self.radius_init
        # float32 under mixed precision, like BatchNormalization's statistics.
        self.radius = self.add_weight(
            shape=(),
            name="radius",
            initializer=keras.initializers.Constant(float(initial)),
            dtype="float32",
            autocast=False,
            aggregation="mean",
        )
        self.radius_initialized = self.add_weight(
            shape=(),
            name="radius_initialized",
            initializer=keras.initializers.Constant(
                0.0 if self.radius_init == "auto" else 1.0
            ),
            dtype="float32",
            trainable=False,
            autocast=False,
            aggregation="mean",
        )
        self.radius_offset = None
        if keras.backend.backend() == "jax":
            self.radius_offset = _radius_offset_weight(self)

    def call(self, embeddings, training=None):
        if self.radius_offset is not None:
            return self._functional_call(embeddings, training)
        features = _float32(embeddings)
        radius = self.radius
        if (
            training
            and self.radius_init == "auto"
            and not self._radius_init_done_outside
        ):
            # First training batch: R takes the batch's mean norm, yet the
            # loss keeps its gradient with respect to the variable.
            pending = 1.0 - self.radius_initialized
            batch_mean = ops.stop_gradient(ops.mean(safe_norm(features)))
            current = ops.convert_to_tensor(self.radius)
            radius = current + pending * (
                batch_mean - ops.stop_gradient(current)
            )
            self.radius.assign(ops.stop_gradient(radius))
            self.radius_initialized.assign(ops.ones_like(pending))
        self.add_loss(ring_loss(features, radius, self.loss_weight))
        return embeddings

    def _functional_call(self, embeddings, training):
        """`call` on JAX: R = radius + radius_offset (`_radius_offset_weight`).

        The first training batch moves the offset so that R equals the batch
        mean norm; the gradient still flows to `radius` through the sum.
        """
        features = _float32(embeddings)
        offset = self.radius_offset
        radius = ops.convert_to_tensor(self.radius) + ops.convert_to_tensor(
            offset
        )
        if (
            training
            and self.radius_init == "auto"
            and not self._radius_init_done_outside
        ):
            pending = 1.0 - self.radius_initialized
            batch_mean = ops.stop_gradient(ops.mean(safe_norm(features)))
            jump = pending * (batch_mean - ops.stop_gradient(radius))
            radius = radius + jump
            offset.assign(ops.convert_to_tensor(offset) + jump)
            self.radius_initialized.assign(ops.ones_like(pending))
        self.add_loss(ring_loss(features, radius, self.loss_weight))
        return embeddings

    def save_own_variables(self, store):
        # The file holds R and the flag, as on every backend: the JAX-only
        # offset is folded into R (it is 0 outside a training step anyway).
        if self.radius_offset is None:
            return super().save_own_variables(store)
        radius = ops.add(self.radius.value, self.radius_offset.value)
        store["0"] = ops.convert_to_numpy(radius)
        store["1"] = ops.convert_to_numpy(self.radius_initialized.value)

    def load_own_variables(self, store):
        if self.radius_offset is None:
            return super().load_own_variables(store)
        if len(store.keys()) != 2:
            raise ValueError(
                f"Layer '{self.name}' expected 2 variables (radius, "
                f"radius_initialized), but the file lists {len(store.keys())}"
                "; it was not saved from a RingLoss layer."
            )
        self.radius.assign(store["0"])
        self.radius_initialized.assign(store["1"])
        self.radius_offset.assign(0.0)

    def initialize_radius(self, embeddings):
        """Sets R to the mean norm of `embeddings` unless already initialised.

        For custom training loops: call it once, eagerly, on the embeddings
        of the first batch (or after restoring a checkpoint, where it only
        records that R is set). `call` then never assigns R itself, so a
        compiled distributed step holds no cross-replica variable update.
        Returns the value of R.
        """
        if not self.built:
            self.build(ops.shape(embeddings))
        initialized = ops.convert_to_numpy(self.radius_initialized.value)
        if self.radius_init == "auto" and float(initialized) < 1:
            mean_norm = ops.mean(safe_norm(_float32(embeddings)))
            self.radius.assign(mean_norm)
            self.radius_initialized.assign(1.0)
        self._radius_init_done_outside = True
        return float(ops.convert_to_numpy(self.radius))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {"loss_weight": self.loss_weight, "radius_init": self.radius_init}
        )
        return config


# --------------------------------------------------------------------------
# A-Softmax (SphereFace)
# --------------------------------------------------------------------------


def a_softmax_lambda(
    iteration, lambda_base=1000.0, lambda_gamma=0.12, lambda_power=1.0,
    lambda_min=5.0,
):
    """λ = max(λ_min, base · (1 + γ·t)^(−power)), SphereFace's schedule."""
    t = _float32(iteration)
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
    cos = ops.clip(_float32(cos), -1.0, 1.0)
    frozen = ops.stop_gradient(cos)
    k = ops.zeros_like(cos)
    for j in range(1, margin + 1):
        threshold = math.cos(j * math.pi / margin)
        k = k + ops.cast(frozen <= threshold, "float32")
    sign = 1.0 - 2.0 * ops.mod(k, 2.0)
    return sign * _chebyshev_cos(cos, margin) - 2.0 * k


def _cosine_logits(embeddings, kernel):
    """‖x‖·cos θ_j = x · ŵ_j, cos θ_j, ‖x‖ for unit-normalised columns ŵ_j."""
    x = _float32(embeddings)
    weights = _normalize(_float32(kernel), axis=0)
    projected = ops.matmul(x, weights)
    norms = safe_norm(x, keepdims=True)
    cos = ops.clip(ops.matmul(_normalize(x), weights), -1.0, 1.0)
    return projected, cos, norms


def _target_mask(labels, num_classes):
    labels = ops.cast(ops.reshape(labels, (-1,)), "int32")
    return ops.one_hot(labels, num_classes, dtype="float32")


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
    return _a_softmax_from_cosines(
        *_cosine_logits(embeddings, kernel), labels, margin, lambda_
    )


def _a_softmax_from_cosines(projected, cos, norms, labels, margin, lambda_):
    """`a_softmax_logits` from the outputs of `_cosine_logits`."""
    lambda_ = _float32(lambda_)
    target = norms * (lambda_ * cos + a_softmax_psi(cos, margin)) / (
        1.0 + lambda_
    )
    mask = _target_mask(labels, ops.shape(cos)[-1])
    return mask * target + (1.0 - mask) * projected


def _check_warmup(margin_warmup_steps):
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


class _MarginHead(keras.layers.Layer):
    """Shared parts of the heads called as `head([embeddings, labels])`.

    `margin_warmup_steps` W stages training (the SphereFace authors' advice
    for runs that do not converge: start from softmax training, then
    fine-tune with the margin): the first W training calls use the head's
    margin-free form, the margin starts at call W + 1. The count of training
    calls is the saved weight `iterations`, so a resumed run continues in
    the phase it stopped in.
    """

    def __init__(self, num_classes, margin_warmup_steps=0, **kwargs):
        super().__init__(**kwargs)
        _check_num_classes(num_classes)
        _check_warmup(margin_warmup_steps)
        self.num_classes = num_classes
        self.margin_warmup_steps = margin_warmup_steps

    def _add_iterations(self):
        self.iterations = _replica_local_weight(
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
        t = keras.ops.convert_to_numpy(self.iterations)
        return max(0, int(t) - self.margin_warmup_steps)

    def build(self, input_shape):
        embeddings_shape = _embeddings_shape(self, input_shape)
        # Heads run in float32 under mixed precision (NaN in fp16 margins).
        self.kernel = self.add_weight(
            shape=(embeddings_shape[-1], self.num_classes),
            name="kernel",
            initializer="glorot_uniform",
            dtype="float32",
            autocast=False,
        )

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.num_classes)

    def compute_output_spec(self, inputs, training=None):
        embeddings = inputs[0]
        return keras.KerasTensor(
            (embeddings.shape[0], self.num_classes), dtype="float32"
        )


    def get_config(self):
        config = super().get_config()
        config["num_classes"] = self.num_classes
        config["margin_warmup_steps"] = self.margin_warmup_steps
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ASoftmax(_MarginHead):
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
            num_classes, margin_warmup_steps=margin_warmup_steps, **kwargs
        )
        if isinstance(margin, bool) or margin not in _MARGINS:
            raise ValueError(
                f"`margin` must be one of {_MARGINS} (SphereFace's integer "
                f"angular margin). Received: margin={margin!r}"
            )
        _check_positive("lambda_base", lambda_base, allow_zero=True)
        _check_positive("lambda_gamma", lambda_gamma, allow_zero=True)
        _check_positive("lambda_power", lambda_power, allow_zero=True)
        _check_positive("lambda_min", lambda_min, allow_zero=True)
        self.margin = int(margin)
        self.lambda_base = lambda_base
        self.lambda_gamma = lambda_gamma
        self.lambda_power = lambda_power
        self.lambda_min = lambda_min

    def build(self, input_shape):
        super().build(input_shape)
        self._add_iterations()

    def current_lambda(self):
        """λ of the last training step (None during the margin warm-up)."""
        if self.margin_warmup_steps and self.margin_step() == 0:
            return None
        return a_softmax_lambda(
            self.iterations - self.margin_warmup_steps,
            self.lambda_base,
            self.lambda_gamma,
            self.lambda_power,
            self.lambda_min,
        )

    def call(self, inputs, training=None):
        embeddings, labels = _with_labels(self, inputs)
        projected, cos, norms = _cosine_logits(embeddings, self.kernel)
        if not training:
            return projected
        t = self._count_training_call()
        lambda_ = a_softmax_lambda(
            ops.maximum(t, 0),
            self.lambda_base,
            self.lambda_gamma,
            self.lambda_power,
            self.lambda_min,
        )
        logits = _a_softmax_from_cosines(
            projected, cos, norms, labels, self.margin, lambda_
        )
        if not self.margin_warmup_steps:
            return logits
        return ops.where(t > 0, logits, projected)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "margin": self.margin,
                "lambda_base": self.lambda_base,
                "lambda_gamma": self.lambda_gamma,
                "lambda_power": self.lambda_power,
                "lambda_min": self.lambda_min,
            }
        )
        return config


# --------------------------------------------------------------------------
# CosFace and ArcFace (beyond the paper)
# --------------------------------------------------------------------------


def cosface_logits(embeddings, kernel, labels, scale=64.0, margin=0.35):
    """CosFace / AM-Softmax: s·(cos θ_j − m·[j = y])  (Wang et al. 2018)."""
    _, cos, _ = _cosine_logits(embeddings, kernel)
    return _cosface_from_cosines(cos, labels, scale, margin)


def _cosface_from_cosines(cos, labels, scale, margin):
    mask = _target_mask(labels, ops.shape(cos)[-1])
    return scale * (cos - margin * mask)


def _sine(cos):
    """sin θ = √(1 − cos²θ) with a finite gradient at |cos θ| = 1."""
    squared = 1.0 - ops.square(cos)
    positive = squared > 0
    safe = ops.where(positive, squared, ops.ones_like(squared))
    return ops.where(positive, ops.sqrt(safe), ops.zeros_like(squared))


def arcface_logits(
    embeddings, kernel, labels, scale=64.0, margin=0.5, easy_margin=False
):
    """ArcFace: s·cos(θ_y + m) for the target, s·cos θ_j otherwise.

    cos(θ + m) is monotonic only while θ + m ≤ π. Beyond that (cos θ ≤
    cos(π − m)) the target logit continues as cos θ − m·sin(m), as in the
    ArcFace paper's code; with `easy_margin` the margin applies only where
    cos θ > 0 (Deng et al. 2019).
    """
    _, cos, _ = _cosine_logits(embeddings, kernel)
    return _arcface_from_cosines(cos, labels, scale, margin, easy_margin)


def _arcface_from_cosines(cos, labels, scale, margin, easy_margin):
    with_margin = cos * math.cos(margin) - _sine(cos) * math.sin(margin)
    if easy_margin:
        target = ops.where(cos > 0, with_margin, cos)
    else:
        threshold = math.cos(math.pi - margin)
        fallback = cos - math.sin(math.pi - margin) * margin
        target = ops.where(cos > threshold, with_margin, fallback)
    mask = _target_mask(labels, ops.shape(cos)[-1])
    return scale * (mask * target + (1.0 - mask) * cos)


class _ScaledMarginHead(_MarginHead):
    """CosFace and ArcFace: margins on s·cos θ logits; plain s·cos θ at inference.

    With `margin_warmup_steps` W > 0 the first W training calls use m = 0
    (the logits s·cos θ_j); the weight `iterations` counting them exists
    only then, so files saved without a warm-up load unchanged.
    """

    def __init__(
        self, num_classes, scale, margin, margin_warmup_steps=0, **kwargs
    ):
        super().__init__(
            num_classes, margin_warmup_steps=margin_warmup_steps, **kwargs
        )
        _check_positive("scale", scale)
        _check_positive("margin", margin, allow_zero=True)
        self.scale = scale
        self.margin = margin

    def build(self, input_shape):
        super().build(input_shape)
        if self.margin_warmup_steps:
            self._add_iterations()

    def call(self, inputs, training=None):
        embeddings, labels = _with_labels(self, inputs)
        _, cos, _ = _cosine_logits(embeddings, self.kernel)
        if not training:
            return self.scale * cos
        logits = self._margin_logits(cos, labels)
        if not self.margin_warmup_steps:
            return logits
        return ops.where(self._count_training_call() > 0, logits,
                         self.scale * cos)

    def get_config(self):
        config = super().get_config()
        config.update({"scale": self.scale, "margin": self.margin})
        return config


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CosFace(_ScaledMarginHead):
    """CosFace head: logits s·(cos θ_j − m·[j = y]) in training, s·cos θ_j after.

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
            num_classes, scale, margin, margin_warmup_steps, **kwargs
        )

    def _margin_logits(self, cos, labels):
        return _cosface_from_cosines(cos, labels, self.scale, self.margin)


@keras.saving.register_keras_serializable(package=_PACKAGE)
class ArcFace(_ScaledMarginHead):
    """ArcFace head: logits s·cos(θ_y + m) for the target in training.

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
            num_classes, scale, margin, margin_warmup_steps, **kwargs
        )
        if margin >= math.pi:
            raise ValueError(
                "`margin` is an angle in radians and must be below π "
                f"(0.5 is usual). Received: margin={margin!r}"
            )
        self.easy_margin = bool(easy_margin)

    def _margin_logits(self, cos, labels):
        return _arcface_from_cosines(
            cos, labels, self.scale, self.margin, self.easy_margin
        )

    def get_config(self):
        config = super().get_config()
        config["easy_margin"] = self.easy_margin
        return config


# --------------------------------------------------------------------------
# The paper's baselines: l2-constrained softmax and center loss
# --------------------------------------------------------------------------


def l2_constrained(embeddings, alpha):
    """α · x / ‖x‖  (Ranjan et al. 2017); a zero vector stays zero."""
    return alpha * _normalize(_float32(embeddings))


@keras.saving.register_keras_serializable(package=_PACKAGE)
class L2Constrained(keras.layers.Layer):
    """Scales every feature to norm α before the classifier (L2-softmax).

    Follow it with `keras.layers.Dense(num_classes)` for the paper's
    l2-constrained softmax row (α = 10, 20, 30).

    Args:
        alpha: the fixed norm α.

    Input shape: `(batch_size, embedding_dim)`. Output shape: the same,
    float32.
    Reference: https://arxiv.org/abs/1703.09507
    """

    def __init__(self, alpha=16.0, **kwargs):
        super().__init__(**kwargs)
        _check_positive("alpha", alpha)
        self.alpha = alpha

    def build(self, input_shape):
        _check_rank2(self, input_shape)

    def call(self, embeddings):
        return l2_constrained(embeddings, self.alpha)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config["alpha"] = self.alpha
        return config


def center_loss(embeddings, centers, labels, loss_weight):
    """λ/(2m) · Σ_i ‖x_i − c_{y_i}‖²  (Wen et al. 2016, eq. 3 with the 1/m)."""
    x = _float32(embeddings)
    own = ops.take(_float32(centers), _labels(labels), axis=0)
    return loss_weight * 0.5 * ops.mean(ops.sum(ops.square(x - own), axis=-1))


def center_update(embeddings, centers, labels, alpha):
    """Wen et al.'s center update: c_j ← c_j − α·Σ_{y_i=j}(c_j − x_i)/(1 + n_j)."""
    x = _float32(embeddings)
    centers = _float32(centers)
    labels = _labels(labels)
    num_classes = ops.shape(centers)[0]
    mask = ops.one_hot(labels, num_classes, dtype="float32")  # (m, C)
    counts = ops.sum(mask, axis=0)  # n_j
    sums = ops.matmul(ops.transpose(mask), x)  # Σ_{y_i=j} x_i
    delta = (counts[:, None] * centers - sums) / (1.0 + counts[:, None])
    return centers - alpha * delta


def _labels(labels):
    return ops.cast(ops.reshape(labels, (-1,)), "int32")


@keras.saving.register_keras_serializable(package=_PACKAGE)
class CenterLoss(keras.layers.Layer):
    """Center loss (Wen et al. 2016): pulls features to their class center.

    Adds  λ/(2m) · Σ_i ‖x_i − c_{y_i}‖²  with `add_loss` and returns the
    embeddings unchanged. The centers are the non-trainable weight
    `centers` (float32), updated during training after the loss is taken,
    by the paper's rule with rate α. Under several replicas each replica
    updates from its own batch and the results are averaged.

    Args:
        num_classes: number of identities.
        loss_weight: λ.
        alpha: the center learning rate α.

    Input: `[embeddings (batch_size, embedding_dim), labels (batch_size,)]`.
    Output: the embeddings.
    Reference: https://ydwen.github.io/papers/WenECCV16.pdf
    """

    def __init__(self, num_classes, loss_weight=0.003, alpha=0.5, **kwargs):
        super().__init__(**kwargs)
        _check_num_classes(num_classes)
        _check_positive("loss_weight", loss_weight, allow_zero=True)
        _check_positive("alpha", alpha, allow_zero=True)
        self.num_classes = num_classes
        self.loss_weight = loss_weight
        self.alpha = alpha

    def build(self, input_shape):
        embeddings_shape = _embeddings_shape(self, input_shape)
        self.centers = _replica_local_weight(
            self,
            "centers",
            (self.num_classes, embeddings_shape[-1]),
            "zeros",
            "float32",
            "mean",
        )

    def call(self, inputs, training=None):
        embeddings, labels = _with_labels(self, inputs)
        centers = ops.convert_to_tensor(self.centers)
        self.add_loss(
            center_loss(embeddings, centers, labels, self.loss_weight)
        )
        if training:
            frozen = ops.stop_gradient(_float32(embeddings))
            self.centers.assign(
                center_update(frozen, centers, labels, self.alpha)
            )
        return embeddings

    def compute_output_shape(self, input_shape):
        return input_shape[0]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "loss_weight": self.loss_weight,
                "alpha": self.alpha,
            }
        )
        return config


# --------------------------------------------------------------------------
# BatchNorm for the custom distributed step
# --------------------------------------------------------------------------


@keras.saving.register_keras_serializable(package=_PACKAGE)
class BatchNorm(keras.layers.Layer):
    """Batch normalisation over all axes but the last, for `strategy.run`.

    In training:  y = γ · (x − μ_B) / √(σ²_B + ε) + β, with μ_B, σ²_B the
    mean and (biased) variance of this replica's batch; the moving averages
    follow m ← momentum · m + (1 − momentum) · batch value. In inference
    the moving averages replace the batch statistics.

    `keras.layers.BatchNormalization` cannot be trained by the project's
    step: it writes its moving averages through a cross-replica merge,
    which a compiled function inside `strategy.run` does not allow. Here
    they are on-read replica-local weights (each replica updates its copy;
    reading or saving averages them), as A-Softmax's counter is. Batch
    statistics are per replica, as in insightface's trainer (plain
    BatchNorm under DDP): with several replicas the update is not the
    one-device update.

    Args:
        momentum: of the moving averages (0.9, PyTorch's 0.1).
        epsilon: ε.
        scale: learn γ (False: γ = 1, as insightface's embedding BN).
        center: learn β.
    """

    def __init__(self, momentum=0.9, epsilon=1e-5, scale=True, center=True,
                 **kwargs):
        super().__init__(**kwargs)
        if not 0 <= momentum < 1:
            raise ValueError(
                f"`momentum` must be in [0, 1). Received: momentum={momentum!r}"
            )
        _check_positive("epsilon", epsilon)
        self.momentum = momentum
        self.epsilon = epsilon
        self.scale = bool(scale)
        self.center = bool(center)

    def build(self, input_shape):
        shape = (input_shape[-1],)
        self.gamma = self.beta = None
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer="ones"
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta", initializer="zeros"
            )
        self.moving_mean = _replica_local_weight(
            self, "moving_mean", shape, "zeros", "float32", "mean"
        )
        self.moving_variance = _replica_local_weight(
            self, "moving_variance", shape, "ones", "float32", "mean"
        )

    def call(self, x, training=None):
        axes = tuple(range(len(x.shape) - 1))
        if training:
            mean, variance = ops.moments(_float32(x), axes=axes)
            for moving, value in (
                (self.moving_mean, mean), (self.moving_variance, variance),
            ):
                moving.assign(
                    self.momentum * moving + (1.0 - self.momentum) * value
                )
        else:
            mean, variance = self.moving_mean, self.moving_variance
        inverse = ops.rsqrt(ops.cast(variance, x.dtype) + self.epsilon)
        if self.gamma is not None:
            inverse = inverse * ops.cast(self.gamma, x.dtype)
        y = (x - ops.cast(mean, x.dtype)) * inverse
        if self.beta is not None:
            y = y + ops.cast(self.beta, x.dtype)
        return y

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "epsilon": self.epsilon,
                "scale": self.scale,
                "center": self.center,
            }
        )
        return config
