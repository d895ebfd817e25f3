"""What the layers of `ring`, `feature_losses`, `blocks` and `heads` share:
norms and checks.

Norms use `safe_norm`: a zero vector has norm 0 and a finite (zero) gradient,
and a tiny non-zero vector keeps its exact norm. An additive epsilon, as in
`sqrt(sum(x**2) + 1e-12)`, would turn a norm of 1e-9 into 1e-6, and ring
loss would then pull on a norm the embedding does not have.

Everything is computed in float32, also under a mixed-precision policy:
norms, cosines and margins lose too much in float16.
"""

import math

import keras
import numpy as np
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


def plain_number(value):
    """A NumPy integer or float scalar as the Python int or float it holds.

    What `y.max() + 1` or `np.float32(0.01)` gives is accepted wherever a
    Python number is, and the layer keeps (and its `.keras` config holds)
    the plain number. Anything else is returned unchanged for the checks.
    """
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    return value


def check_num_classes(num_classes):
    """Returns `num_classes` as a Python int, or raises."""
    num_classes = plain_number(num_classes)
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, int)
        or num_classes < 1
    ):
        raise ValueError(
            "`num_classes` must be a positive integer (the number of "
            f"identities). Received: num_classes={num_classes!r}"
        )
    return num_classes


def check_positive(name, value, allow_zero=False):
    """Returns `value` as a Python number, or raises."""
    value = plain_number(value)
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
    return value


def check_labels_dtype(layer, labels):
    """Refuses labels that are not integers (a float label is truncated).

    A labels `keras.Input` left at its default float32 would otherwise
    train with 2.7 read as class 2; refusing the dtype catches it when the
    model is built.
    """
    dtype = keras.backend.standardize_dtype(labels.dtype)
    if "int" not in dtype:
        raise ValueError(
            f"{type(layer).__name__} takes integer class ids as labels; "
            "declare the labels input as keras.Input((), dtype=\"int32\") "
            "and pass integer labels (a float label would be truncated). "
            f"Received: labels of dtype {dtype}"
        )


def _label_range_message(layer, num_classes, label=None):
    which = "a label (printed last)" if label is None else f"label {label}"
    return (
        f"{type(layer).__name__}: {which} is outside [0, "
        f"num_classes={num_classes}): labels are class ids 0 .. "
        f"{num_classes - 1}; remap them, or build the head with more "
        "classes"
    )


def _refuse_out_of_range(layer, labels, num_classes):
    """Raises naming the first label outside [0, num_classes) (NumPy)."""
    labels = np.asarray(labels).reshape(-1)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.size:
        raise ValueError(_label_range_message(layer, num_classes, bad[0]))


def check_label_range(layer, labels, num_classes):
    """Refuses training labels outside [0, num_classes), on every backend.

    The loss would not always: on JAX, sparse cross-entropy reads such a
    label as a row of zeros (a loss of 0) and trains on. Concrete labels
    (eager TensorFlow, PyTorch, JAX outside `jit`) are checked here; in a
    `tf.function` an assertion raises when the step runs, and under
    `jax.jit` a host callback does, both with the same message. XLA on
    TensorFlow drops assertions: there the rows that hold such a label get
    NaN logits (`poison_out_of_range`), so the loss turns NaN instead of
    training on.

    Returns `(labels, in_range)`: the labels (on TensorFlow graphs,
    carrying the assertion) and a `(batch_size,)` boolean tensor, or None
    where the labels were checked here or a callback checks them.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.executing_eagerly():
            _refuse_out_of_range(layer, np.asarray(labels), num_classes)
            return labels, None
        flat = tf.reshape(labels, (-1,))
        in_range = tf.logical_and(
            flat >= 0, flat < tf.cast(num_classes, flat.dtype)
        )
        # The label is known only when the step runs: the assertion
        # prints the first one outside after the text, found with static
        # shapes (XLA compiles them even where it drops the assertion) and
        # a sentinel row for an empty batch.
        outside = tf.concat([tf.logical_not(in_range), [True]], 0)
        padded = tf.concat([flat, tf.zeros((1,), flat.dtype)], 0)
        first = padded[tf.argmax(tf.cast(outside, tf.int32))]
        assertion = tf.debugging.Assert(
            tf.reduce_all(in_range),
            [_label_range_message(layer, num_classes), first],
        )
        with tf.control_dependencies([assertion]):
            labels = tf.identity(labels)
        return labels, in_range
    if backend == "jax":
        import jax

        if isinstance(labels, jax.core.Tracer):
            jax.debug.callback(
                lambda values: _refuse_out_of_range(layer, values, num_classes),
                labels,
            )
            return labels, None
    _refuse_out_of_range(layer, ops.convert_to_numpy(labels), num_classes)
    return labels, None


def poison_out_of_range(logits, in_range):
    """NaN logits in the rows whose label is outside the classes."""
    if in_range is None:
        return logits
    nan = ops.full_like(logits, float("nan"))
    return ops.where(ops.expand_dims(in_range, -1), logits, nan)
