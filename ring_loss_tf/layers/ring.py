"""Ring loss (Zheng et al. 2018, eq. 2): `ring_loss` and `RingLoss`.

The function holds the maths, the layer owns R and the training-time state,
so tests and benchmarks can call the formula directly. Computed in float32,
also under a mixed-precision policy: norms lose too much in float16. Norms
use `safe_norm` (`ring_loss_tf.layers.ops`): exact for tiny vectors, 0 with
a finite gradient at zero.
"""

import keras
from keras import ops

from ring_loss_tf.layers.ops import PACKAGE
from ring_loss_tf.layers.ops import check_positive
from ring_loss_tf.layers.ops import check_rank2
from ring_loss_tf.layers.ops import float32
from ring_loss_tf.layers.ops import plain_number
from ring_loss_tf.layers.ops import safe_norm


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
