"""A tiny trained embedding model and its evaluation data, for tests.

`build_world(root)` trains a small Keras model (with a layer class defined
only here) for a few steps on synthetic 16×16 grey images, exports it as a
SavedModel (and a uint8-input variant), and writes an LFW tree, a pairs.txt
of 2 folds and gallery / probe / distractor folders.
tests/evaluation/test_embedder.py and tests/evaluation/test_protocols.py check
figures against `reference`, the Keras model called directly on images
normalised here. Not public API; a test
module imports helpers from here, never from another test module.
"""

import keras
import numpy as np
import tensorflow as tf
from PIL import Image

SIZE = 16
NUM_IDS = 10
PER_ID = 4


class Scale(keras.layers.Layer):
    """A custom layer known only to the test process (not to evaluate.py)."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones")

    def call(self, x):
        return x * self.scale


def identity(k):
    return f"id{k:02d}"


def write_png(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image[..., 0]).save(path)


def pairs_lines():
    """2 folds x (3 genuine, 3 impostor); (line, issame, fold, a, b)."""
    rows = []
    for fold in range(2):
        for j in range(3):
            k = 5 * fold + j
            rows.append(
                (
                    f"{identity(k)}\t1\t{2 + j % 3}",
                    True,
                    fold,
                    (k, 1),
                    (k, 2 + j % 3),
                )
            )
        for j in range(3):
            k1, k2 = 5 * fold + j, 5 * fold + j + 2
            rows.append(
                (
                    f"{identity(k1)} {1 + j} {identity(k2)} {2 + j}",
                    False,
                    fold,
                    (k1, 1 + j),
                    (k2, 2 + j),
                )
            )
    return rows


def build_world(root):
    """The model, its exports and the data under `root` (see above)."""
    rng = np.random.default_rng(0)
    bases = rng.integers(0, 256, size=(NUM_IDS, SIZE, SIZE, 1))
    images = {}
    for k in range(NUM_IDS):
        for n in range(1, PER_ID + 1):
            noise = rng.normal(0, 60, size=(SIZE, SIZE, 1))
            image = np.clip(bases[k] + noise, 0, 255).astype(np.uint8)
            images[(k, n)] = image
            file = f"{identity(k)}_{n:04d}.png"
            write_png(root / "lfw" / identity(k) / file, image)
            if k < 6:
                part = "gallery" if n == 1 else "probes"
            else:
                part = "distractors"
            write_png(root / part / identity(k) / file, image)
    rows = pairs_lines()
    (root / "pairs.txt").write_text(
        "2 3\n" + "\n".join(r[0] for r in rows) + "\n"
    )

    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(8)(x)
    embedding = Scale()(x)
    model = keras.Model(inputs, embedding)
    classifier = keras.Sequential([model, keras.layers.Dense(NUM_IDS)])
    classifier.compile(
        "adam",
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    keys = sorted(images)
    train_x = (np.stack([images[k] for k in keys]) - 127.5) / 128
    train_y = np.array([k for k, _ in keys])
    classifier.fit(train_x, train_y, epochs=3, batch_size=40, verbose=0)

    model_dir = root / "run"
    model.export(str(model_dir / "export"), verbose=False)

    class Uint8Serving(tf.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        @tf.function(
            input_signature=[tf.TensorSpec([None, SIZE, SIZE, 3], tf.uint8)]
        )
        def serve(self, images):
            x = (tf.cast(images[..., :1], tf.float32) - 127.5) / 128.0
            e = self.model(x)
            return {
                "embedding": e,
                "normalized_embedding": tf.math.l2_normalize(e, axis=1),
            }

    module = Uint8Serving(model)
    tf.saved_model.save(
        module,
        str(root / "uint8_model"),
        signatures={"serving_default": module.serve},
    )

    def reference(batch):
        x = (np.asarray(batch, np.float32) - 127.5) / 128.0
        return np.asarray(model(x, training=False), np.float64)

    return dict(
        root=root, images=images, rows=rows, model=model, reference=reference
    )


def reference_pair_embeddings(world, flip=False):
    ref = world["reference"]
    a = np.stack([world["images"][r[3]] for r in world["rows"]])
    b = np.stack([world["images"][r[4]] for r in world["rows"]])
    ea, eb = ref(a), ref(b)
    if flip:
        ea, eb = ea + ref(a[:, :, ::-1]), eb + ref(b[:, :, ::-1])
    return ea, eb
