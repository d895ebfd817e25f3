"""Backend-neutral helpers for the layer tests (not public API).

In the spirit of Keras' `run_layer_test`: values and gradients come back as
NumPy arrays whichever Keras backend runs, so one test module checks the
layers under TensorFlow, JAX and PyTorch against the same float64 NumPy
references.
"""

import os

import numpy as np

import keras


def backend():
    return keras.backend.backend()


ON_TF = backend() == "tensorflow"
# How a function is run (`value_and_grads`): TensorFlow has three ways.
MODES = ["eager", "function", "jit"] if ON_TF else ["eager"]
# `fit` as each backend's users run it: XLA and not on TensorFlow, jitted on
# JAX (its eager `fit` only runs slower), eager on PyTorch.
FIT_JIT = {"tensorflow": [False, True], "jax": [True]}.get(backend(), [False])
# Under JAX and PyTorch (tests/layers/test_backends.py runs the layer and head
# modules under both) cases that only repeat a check on another size or
# setting are trimmed: every formula, gradient, edge case and state check
# still runs. RING_LOSS_TF_ALL_CASES=1 runs every case on every backend.
ALL_CASES = ON_TF or os.environ.get("RING_LOSS_TF_ALL_CASES") == "1"


def cases(every, trimmed):
    """`every` on TensorFlow (or with ALL_CASES), else `trimmed`."""
    return every if ALL_CASES else trimmed


def rng(seed=0):
    return np.random.default_rng(seed)


def random_case(seed, batch=6, dim=5, classes=7, scale=3.0):
    """Embeddings, a kernel and labels: float32, float32, int32."""
    r = rng(seed)
    x = (r.standard_normal((batch, dim)) * scale).astype(np.float32)
    kernel = r.standard_normal((dim, classes)).astype(np.float32)
    labels = r.integers(0, classes, batch).astype(np.int32)
    return x, kernel, labels


def value_and_grads(fn, *args, mode="eager"):
    """Returns fn(*args) and d fn / d args, all as NumPy arrays.

    `fn` maps backend tensors to a scalar. `mode` (TensorFlow only) runs it
    eagerly, in a `tf.function`, or in a `tf.function(jit_compile=True)`;
    JAX runs it under `jax.jit`, PyTorch eagerly with autograd.
    """
    name = backend()
    args = [np.asarray(a) for a in args]
    if name == "tensorflow":
        import tensorflow as tf

        def compute(*tensors):
            with tf.GradientTape() as tape:
                tape.watch(tensors)
                value = fn(*tensors)
            return value, tape.gradient(value, tensors)

        if mode == "function":
            compute = tf.function(compute)
        elif mode == "jit":
            compute = tf.function(compute, jit_compile=True)
        value, grads = compute(*[tf.constant(a) for a in args])
        return value.numpy(), [g.numpy() for g in grads]
    if name == "jax":
        import jax

        # Jitted, as JAX code runs in a training step (and one compilation
        # is faster than compiling every op of an eager trace).
        value, grads = jax.jit(
            jax.value_and_grad(
                lambda *a: fn(*a), argnums=tuple(range(len(args)))
            )
        )(*args)
        return np.asarray(value), [np.asarray(g) for g in grads]
    if name == "torch":
        import torch

        tensors = [torch.tensor(a, requires_grad=True) for a in args]
        value = fn(*tensors)
        value.backward()
        return (
            value.detach().numpy(),
            [t.grad.detach().numpy() for t in tensors],
        )
    raise NotImplementedError(f"no gradient helper for backend {name}")


def first_training_call(layer, x):
    """Runs `layer(x, training=True)` as a training step of each backend does.

    Returns the layer's first loss, its gradient with respect to every
    trainable weight (NumPy, in `layer.trainable_weights` order), and the
    values every weight holds after the call, by name. TensorFlow and
    PyTorch call the layer statefully under a tape / autograd; JAX runs
    `stateless_call` under `jax.value_and_grad` as `fit` does, then stores
    the returned state back (trainable first, as Keras does).
    """
    name = backend()
    if name == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            layer(x, training=True)
            loss = layer.losses[0]
        grads = tape.gradient(
            loss, [v.value for v in layer.trainable_weights]
        )
        grads = [g.numpy() for g in grads]
    elif name == "torch":
        for v in layer.trainable_weights:
            v.value.grad = None
        layer(x, training=True)
        loss = layer.losses[0]
        loss.backward()
        grads = [v.value.grad.detach().numpy() for v in layer.trainable_weights]
        loss = loss.detach()
    elif name == "jax":
        import jax

        trainable = [v.value for v in layer.trainable_weights]
        non_trainable = [v.value for v in layer.non_trainable_weights]

        def compute(trainable):
            _, state, losses = layer.stateless_call(
                trainable, non_trainable, x, training=True,
                return_losses=True,
            )
            return losses[0], state

        (loss, state), grads = jax.value_and_grad(compute, has_aux=True)(
            trainable
        )
        grads = [np.asarray(g) for g in grads]
        for v, value in zip(layer.trainable_weights, trainable):
            v.assign(value)
        for v, value in zip(layer.non_trainable_weights, state):
            v.assign(value)
    else:
        raise NotImplementedError(f"no training call for backend {name}")
    after = {v.name: to_numpy(v) for v in layer.weights}
    return to_numpy(loss), grads, after


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def numeric_grad(fn, x, step=1e-6):
    """Central finite differences of a float64 NumPy function at x."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    flat = x.reshape(-1)
    out = grad.reshape(-1)
    for i in range(flat.size):
        saved = flat[i]
        flat[i] = saved + step
        upper = fn(x)
        flat[i] = saved - step
        lower = fn(x)
        flat[i] = saved
        out[i] = (upper - lower) / (2 * step)
    return grad


def roundtrip_keras_file(model, path):
    """Saves `model` as a .keras file and loads it back."""
    model.save(path)
    return keras.saving.load_model(path)


def config_roundtrip(layer):
    """from_config(get_config()) gives an equal config, and the clone holds
    each constructor argument under its own name (Keras' convention)."""
    clone = type(layer).from_config(layer.get_config())
    assert clone.get_config() == layer.get_config()
    for key, value in layer.get_config().items():
        if key not in ("dtype",):
            assert getattr(clone, key, value) == value
    return clone
