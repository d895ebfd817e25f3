"""What the layers of `layers.py` and `heads.py` share: norms and checks.

Norms use `safe_norm`: a zero vector has norm 0 and a finite (zero) gradient,
and a tiny non-zero vector keeps its exact norm. An additive epsilon, as in
`sqrt(sum(x**2) + 1e-12)`, would turn a norm of 1e-9 into 1e-6, and ring
loss would then pull on a norm the embedding does not have.

Everything is computed in float32, also under a mixed-precision policy:
norms, cosines and margins lose too much in float16.
"""

import math

import keras
from keras import ops

PACKAGE = "ring_loss_tf"


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


def safe_divide(numerator, denominator):
    """numerator / denominator, and 0 where denominator is 0 (both branches finite)."""
    nonzero = denominator != 0
    safe = ops.where(nonzero, denominator, ops.ones_like(denominator))
    return ops.where(nonzero, numerator / safe, ops.zeros_like(numerator))


def normalize(x, axis=-1):
    """x / ‖x‖ along `axis`; a zero vector stays zero.

    Divides by the largest magnitude first (no gradient through it), so
    every intermediate is O(1): even under XLA's rewrites no ‖x‖² or ‖x‖³
    of a tiny vector underflows into an inf in the backward pass.
    """
    scale = ops.stop_gradient(ops.max(ops.abs(x), axis=axis, keepdims=True))
    scaled = x / ops.where(scale > 0, scale, ops.ones_like(scale))
    return safe_divide(scaled, safe_norm(scaled, axis=axis, keepdims=True))


def float32(x):
    return ops.cast(x, "float32")


def replica_local_weight(layer, name, shape, initializer, dtype, aggregation):
    """A non-trainable weight that each replica updates without a sync point.

    State updated inside `call` (a head's step counter, the centers) must
    not need a cross-replica merge: a custom distributed loop runs the
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
    # `add_weight` takes no `synchronization`: the layer tracks it by hand.
    layer._track_variable(variable)
    return variable


def check_rank2(layer, input_shape, what="embeddings"):
    if len(input_shape) != 2:
        raise ValueError(
            f"{type(layer).__name__} expects {what} of shape "
            "(batch_size, embedding_dim); flatten or pool the features first. "
            f"Received: input_shape={tuple(input_shape)}"
        )


def with_labels(layer, inputs):
    """Checks that a head is called as layer([embeddings, labels])."""
    if not isinstance(inputs, (list, tuple)) or len(inputs) != 2:
        raise ValueError(
            f"{type(layer).__name__} is called as head([embeddings, "
            "labels]); the labels select the target class during "
            f"training. Received: {type(inputs).__name__}"
        )
    return inputs


def embeddings_shape(layer, input_shape):
    """The embeddings' shape from a [embeddings, labels] input shape."""
    shapes = with_labels(layer, input_shape)
    if not isinstance(shapes[0], (list, tuple)):
        with_labels(layer, None)
    check_rank2(layer, shapes[0])
    return shapes[0]


def check_num_classes(num_classes):
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or num_classes < 1
    ):
        raise ValueError(
            "`num_classes` must be a positive integer (the number of "
            f"identities). Received: num_classes={num_classes!r}"
        )


def check_positive(name, value, allow_zero=False):
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
