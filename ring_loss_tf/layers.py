"""Ring loss and the paper's other feature losses and layers.

Each layer has a stateless function twin (`ring_loss` / `RingLoss`, ...):
the layer owns the weights and the training-time state, the function holds
the maths, so tests and benchmarks can call the formula directly. The
classification heads (`ASoftmax`, `CosFace`, `ArcFace`) live in
`ring_loss_tf.heads`; users import every layer from the package
(`ring_loss_tf.ASoftmax`, ...).

Everything is written with `keras.ops` and computed in float32, also under a
mixed-precision policy: norms lose too much in float16. Norms use
`safe_norm` (`ring_loss_tf.layer_utils`): exact for tiny vectors, 0 with a
finite gradient at zero.
"""

import keras
from keras import ops

from ring_loss_tf.layer_utils import PACKAGE
from ring_loss_tf.layer_utils import check_num_classes
from ring_loss_tf.layer_utils import check_positive
from ring_loss_tf.layer_utils import check_rank2
from ring_loss_tf.layer_utils import embeddings_shape
from ring_loss_tf.layer_utils import float32
from ring_loss_tf.layer_utils import normalize
from ring_loss_tf.layer_utils import plain_number
from ring_loss_tf.layer_utils import replica_local_weight
from ring_loss_tf.layer_utils import safe_norm
from ring_loss_tf.layer_utils import with_labels

# The package's own modules (models.py, trainer.py) name the heads
# through this module.
from ring_loss_tf.heads import ArcFace
from ring_loss_tf.heads import ASoftmax
from ring_loss_tf.heads import CosFace
from ring_loss_tf.heads import CosineClassifier
from ring_loss_tf.heads import a_softmax_lambda
from ring_loss_tf.heads import a_softmax_logits
from ring_loss_tf.heads import a_softmax_psi
from ring_loss_tf.heads import arcface_logits
from ring_loss_tf.heads import cosface_logits

__all__ = [
    "ASoftmax",
    "ArcFace",
    "BatchNorm",
    "CenterLoss",
    "CosFace",
    "CosineClassifier",
    "GroupedConv2D",
    "L2Constrained",
    "RingLoss",
    "a_softmax_lambda",
    "a_softmax_logits",
    "a_softmax_psi",
    "arcface_logits",
    "center_loss",
    "center_update",
    "cosface_logits",
    "grouped_conv2d",
    "l2_constrained",
    "ring_loss",
    "safe_norm",
]


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
    norms = safe_norm(float32(embeddings))
    radius = float32(radius)
    return loss_weight * 0.5 * ops.mean(ops.square(norms - radius))


def _global_mean_norm(features):
    """The mean norm of the global batch, also when replicas split it.

    Under a TensorFlow distribution strategy each replica holds part of the
    batch; R must start from the whole batch's mean norm, as on one device,
    so the replicas' norm sums and row counts are all-reduced (one
    two-number all-reduce per step while R may still be initialised here).
    JAX's and Keras' data parallelism run on global arrays: a plain mean.
    """
    norms = safe_norm(features)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            count = tf.cast(tf.size(norms), norms.dtype)
            totals = context.all_reduce(
                "SUM", tf.stack([tf.reduce_sum(norms), count])
            )
            return totals[0] / totals[1]
    return ops.mean(norms)


def _numpy(variable):
    """A weight's value as NumPy, also inside a TensorFlow strategy's scope,
    where NumPy cannot read a mirrored variable itself."""
    return ops.convert_to_numpy(ops.convert_to_tensor(variable))


@keras.saving.register_keras_serializable(package=PACKAGE)
class RingLoss(keras.layers.Layer):
    """Pulls embedding norms towards one learned radius R (Ring loss).

    Adds  L_R = λ/(2m) · Σ_i (‖F_i‖₂ − R)²  (Zheng et al. 2018, eq. 2) with
    `add_loss` and returns its input unchanged. Its gradients, from
    ∂‖F‖/∂F = F/‖F‖:

        ∂L_R/∂R   = −(λ/m) · Σ_i (‖F_i‖ − R)
        ∂L_R/∂F_i =  (λ/m) · (1 − R/‖F_i‖) · F_i     (0 at F_i = 0)

    At F_i = 0 the norm has no derivative; `safe_norm` takes 0 there (the
    smallest element of its subdifferential, the unit ball), so a zero
    embedding gets no push rather than a NaN.

    R is the scalar trainable weight `radius`, float32 under every policy;
    exclude it from weight decay. With `radius_init="auto"` R starts at the
    mean embedding norm of the first training batch the layer sees (the
    whole global batch when a distribution strategy splits it); the
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
        loss_weight = check_positive(
            "loss_weight", loss_weight, allow_zero=True
        )
        radius_init = plain_number(radius_init)
        if isinstance(radius_init, str):
            if radius_init != "auto":
                raise ValueError(
                    "`radius_init` must be a positive float or 'auto'. "
                    f"Received: radius_init={radius_init!r}"
                )
        else:
            try:
                check_positive("radius_init", radius_init)
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
        check_rank2(self, input_shape)
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
        features = float32(embeddings)
        radius = self.radius
        if (
            training
            and self.radius_init == "auto"
            and not self._radius_init_done_outside
        ):
            # First training batch: R takes the batch's mean norm, yet the
            # loss keeps its gradient with respect to the variable.
            pending = 1.0 - self.radius_initialized
            batch_mean = ops.stop_gradient(_global_mean_norm(features))
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
        features = float32(embeddings)
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

    def initialize_radius(self, embeddings=None, *, mean_norm=None):
        """Sets R to the mean norm of `embeddings` unless already initialised.

        For custom training loops: call it once, eagerly, on the embeddings
        of the first batch (or after restoring a checkpoint, where it only
        records that R is set). `call` then never assigns R itself, so a
        compiled distributed step holds no cross-replica variable update.
        A distributed loop whose replicas each hold part of the batch
        passes `mean_norm` (their norms summed across replicas, over the
        batch size) instead of `embeddings`. Returns the value of R.
        """
        if (embeddings is None) == (mean_norm is None):
            raise ValueError(
                "Pass either `embeddings` or `mean_norm` to "
                "initialize_radius, not both or neither."
            )
        if not self.built:
            if embeddings is None:
                raise ValueError(
                    "RingLoss is not built yet: call it on a batch (or pass "
                    "`embeddings`) before initialize_radius(mean_norm=...)."
                )
            self.build(ops.shape(embeddings))
        if self.radius_init == "auto" and not self.is_radius_initialized():
            if mean_norm is None:
                mean_norm = ops.mean(safe_norm(float32(embeddings)))
            self.radius.assign(ops.cast(mean_norm, self.radius.dtype))
            self.radius_initialized.assign(1.0)
        self._radius_init_done_outside = True
        return float(_numpy(self.radius))

    def is_radius_initialized(self):
        """True once R holds a value (set, initialised, or restored)."""
        if self.radius_init != "auto":
            return True
        return float(_numpy(self.radius_initialized)) >= 1

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            {"loss_weight": self.loss_weight, "radius_init": self.radius_init}
        )
        return config


# --------------------------------------------------------------------------
# The paper's baselines: l2-constrained softmax and center loss
# --------------------------------------------------------------------------


def l2_constrained(embeddings, alpha):
    """α · x / ‖x‖  (Ranjan et al. 2017); a zero vector stays zero."""
    return alpha * normalize(float32(embeddings))


@keras.saving.register_keras_serializable(package=PACKAGE)
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
        self.alpha = check_positive("alpha", alpha)

    def build(self, input_shape):
        check_rank2(self, input_shape)

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
    x = float32(embeddings)
    own = ops.take(float32(centers), _labels(labels), axis=0)
    return loss_weight * 0.5 * ops.mean(ops.sum(ops.square(x - own), axis=-1))


def center_update(embeddings, centers, labels, alpha):
    """Wen et al.'s center update: c_j ← c_j − α·Σ_{y_i=j}(c_j − x_i)/(1 + n_j)."""
    x = float32(embeddings)
    centers = float32(centers)
    labels = _labels(labels)
    num_classes = ops.shape(centers)[0]
    mask = ops.one_hot(labels, num_classes, dtype="float32")  # (m, C)
    counts = ops.sum(mask, axis=0)  # n_j
    sums = ops.matmul(ops.transpose(mask), x)  # Σ_{y_i=j} x_i
    delta = (counts[:, None] * centers - sums) / (1.0 + counts[:, None])
    return centers - alpha * delta


def _labels(labels):
    return ops.cast(ops.reshape(labels, (-1,)), "int32")


@keras.saving.register_keras_serializable(package=PACKAGE)
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
        self.num_classes = check_num_classes(num_classes)
        self.loss_weight = check_positive(
            "loss_weight", loss_weight, allow_zero=True
        )
        self.alpha = check_positive("alpha", alpha, allow_zero=True)

    def build(self, input_shape):
        shape = embeddings_shape(self, input_shape)
        self.centers = replica_local_weight(
            self,
            "centers",
            (self.num_classes, shape[-1]),
            "zeros",
            "float32",
            "mean",
        )

    def call(self, inputs, training=None):
        embeddings, labels = with_labels(self, inputs)
        centers = ops.convert_to_tensor(self.centers)
        self.add_loss(
            center_loss(embeddings, centers, labels, self.loss_weight)
        )
        if training:
            frozen = ops.stop_gradient(float32(embeddings))
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


@keras.saving.register_keras_serializable(package=PACKAGE)
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
        momentum = plain_number(momentum)
        if not 0 <= momentum < 1:
            raise ValueError(
                f"`momentum` must be in [0, 1). Received: momentum={momentum!r}"
            )
        self.momentum = momentum
        self.epsilon = check_positive("epsilon", epsilon)
        self.scale = bool(scale)
        self.center = bool(center)

    def build(self, input_shape):
        shape = (input_shape[-1],)
        self.gamma = self.beta = None
        # Read in float32 under mixed precision, like the statistics.
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma", initializer="ones", autocast=False
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta", initializer="zeros", autocast=False
            )
        self.moving_mean = replica_local_weight(
            self, "moving_mean", shape, "zeros", "float32", "mean"
        )
        self.moving_variance = replica_local_weight(
            self, "moving_variance", shape, "ones", "float32", "mean"
        )

    def call(self, x, training=None):
        # In float32 under mixed precision, as keras.layers
        # .BatchNormalization: in float16, x − μ keeps few of the digits
        # that differ, and the gradient of 1/√(σ² + ε), −½(σ² + ε)^(−3/2),
        # overflows once σ² + ε < 4e-4 (NaN in MobileFaceNet's GDC).
        dtype = x.dtype
        x = float32(x)
        axes = tuple(range(len(x.shape) - 1))
        if training:
            mean, variance = ops.moments(x, axes=axes)
            for moving, value in (
                (self.moving_mean, mean), (self.moving_variance, variance),
            ):
                moving.assign(
                    self.momentum * moving + (1.0 - self.momentum) * value
                )
        else:
            mean, variance = self.moving_mean, self.moving_variance
        inverse = ops.rsqrt(variance + self.epsilon)
        if self.gamma is not None:
            inverse = inverse * self.gamma
        y = (x - mean) * inverse
        if self.beta is not None:
            y = y + self.beta
        return ops.cast(y, dtype)

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


def grouped_conv2d(inputs, kernel, groups, strides=1, padding="valid",
                   dilation_rate=1):
    """The grouped convolution of `inputs`, computed as one dense conv.

    `kernel` is `keras.layers.Conv2D(groups=g)`'s, `(k_h, k_w, c_in / g,
    c_out)`: input channels [i·c_in/g, (i+1)·c_in/g) feed only output
    channels [i·c_out/g, (i+1)·c_out/g). The dense kernel `(k_h, k_w, c_in,
    c_out)` holds those blocks on its diagonal and zeros elsewhere, so the
    result, and the gradient with respect to `kernel`, are the grouped
    convolution's.

    Args:
        inputs: `(batch, height, width, c_in)`.
        kernel: `(k_h, k_w, c_in / groups, c_out)`.
        groups: g, dividing c_in and c_out.
        strides, padding, dilation_rate: as `keras.ops.conv`.

    Returns: `(batch, out_height, out_width, c_out)`.
    """
    kernel = ops.convert_to_tensor(kernel)
    k_h, k_w, per_group, filters = kernel.shape
    blocks = ops.reshape(
        kernel, (k_h, k_w, 1, per_group, groups, filters // groups)
    )
    mask = ops.reshape(
        ops.eye(groups, dtype=kernel.dtype), (1, 1, groups, 1, groups, 1)
    )
    dense = ops.reshape(blocks * mask, (k_h, k_w, groups * per_group, filters))
    return ops.conv(
        inputs, dense, strides=strides, padding=padding,
        dilation_rate=dilation_rate,
    )


@keras.saving.register_keras_serializable(package=PACKAGE)
class GroupedConv2D(keras.layers.Conv2D):
    """`keras.layers.Conv2D` whose groups run as one dense convolution.

    Same arguments, weights and outputs as `keras.layers.Conv2D` (with
    `groups` g: a kernel `(k_h, k_w, c_in / g, filters)`), computed by
    `grouped_conv2d`: g times the multiply-adds, because TensorFlow's CPU
    kernels for grouped convolutions are slower than that by far.
    MobileFaceNet's 3×3 conv of 128 channels in 64 groups (batch 8, 56×56,
    forward + backward, 2 CPU cores, `bench/backbones.py`) takes 13 s as a
    grouped conv, with or without XLA, and 49 ms as the dense one (58 ms
    under XLA), which lets the whole network train at 17 images/s instead
    of under 1. On a GPU, where grouped convolutions are fast, the dense
    form only adds its multiply-adds.

    Input shape: `(batch, height, width, c_in)` (channels last). Output
    shape: as `keras.layers.Conv2D`'s.
    """

    def convolution_op(self, inputs, kernel):
        if self.groups == 1 or self.data_format != "channels_last":
            return super().convolution_op(inputs, kernel)
        return grouped_conv2d(
            inputs, kernel, self.groups, strides=list(self.strides),
            padding=self.padding, dilation_rate=self.dilation_rate,
        )
