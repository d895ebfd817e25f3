"""One step of the cross-backend `.keras` check (tests/layers/test_backends).

    KERAS_BACKEND=<backend> python -m tests.keras_file_worker OUT_DIR [IN_DIR]

With IN_DIR: loads IN_DIR/model.keras under this process' backend and writes
OUT_DIR/loaded.npz: every weight by path, the inference logits on the fixed
inputs, and the state after one more training call of the loaded layers.
Then (always) builds the model below, trains it 2 steps with `fit`, saves
OUT_DIR/model.keras and OUT_DIR/saved.npz (weights by path, logits).
Not a test itself: the comparisons are made by the calling test.
"""

import os
import sys

import numpy as np

import keras

import ring_loss_tf

# Importing the layers must not pull in TensorFlow on the other backends.
IMPORTED_TENSORFLOW = "tensorflow" in sys.modules

NUM_CLASSES = 5
DIM = 8


def data():
    r = np.random.default_rng(0)
    x = (r.standard_normal((32, DIM)) * 3).astype(np.float32)
    y = r.integers(0, NUM_CLASSES, 32).astype(np.int32)
    return x, y


def build():
    """Dense → RingLoss("auto") → CenterLoss → ASoftmax: every kind of state."""
    features = keras.Input((DIM,), name="features")
    labels = keras.Input((), dtype="int32", name="labels")
    embeddings = keras.layers.Dense(DIM, name="embed")(features)
    embeddings = ring_loss_tf.RingLoss(0.1, name="ring")(embeddings)
    embeddings = ring_loss_tf.CenterLoss(NUM_CLASSES, 0.01, name="center")(
        [embeddings, labels]
    )
    logits = ring_loss_tf.ASoftmax(NUM_CLASSES, name="head")(
        [embeddings, labels]
    )
    return keras.Model([features, labels], logits)


def weights(model):
    # radius_offset exists only on JAX and is not saved (it is 0 here).
    return {
        v.path: keras.ops.convert_to_numpy(v)
        for v in model.weights
        if not v.path.endswith("radius_offset")
    }


def main(out_dir, in_dir=None):
    x, y = data()
    if in_dir:
        loaded = keras.saving.load_model(os.path.join(in_dir, "model.keras"))
        result = {f"weight:{k}": v for k, v in weights(loaded).items()}
        result["logits"] = keras.ops.convert_to_numpy(
            loaded([x, y], training=False)
        )
        # Training continues the state: R is not re-initialised, the
        # iteration counter goes on from its saved value.
        ring = loaded.get_layer("ring")
        ring(x * 100, training=True)
        loaded.get_layer("head")([x, y], training=True)
        result["after:radius"] = keras.ops.convert_to_numpy(ring.radius)
        result["after:iterations"] = keras.ops.convert_to_numpy(
            loaded.get_layer("head").iterations
        )
        result["after:lambda"] = keras.ops.convert_to_numpy(
            loaded.get_layer("head").current_lambda()
        )
        result["imported_tensorflow"] = np.array(IMPORTED_TENSORFLOW)
        np.savez(os.path.join(out_dir, "loaded.npz"), **result)
    keras.utils.set_random_seed(0)
    model = build()
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    model.fit([x, y], y, batch_size=16, epochs=1, verbose=0)
    model.save(os.path.join(out_dir, "model.keras"))
    saved = {f"weight:{k}": v for k, v in weights(model).items()}
    saved["logits"] = keras.ops.convert_to_numpy(model([x, y], training=False))
    np.savez(os.path.join(out_dir, "saved.npz"), **saved)
    print(f"{keras.backend.backend()}: ok")


if __name__ == "__main__":
    main(*sys.argv[1:])
