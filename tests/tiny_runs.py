"""Tiny models, batches and training runs shared by the training tests.

Two sizes: `model_config` / `trainer_run` build a 16×16 small_cnn on random
batches for the distributed-step tests; `tiny_kanji_config` / `tiny_train`
run `loop.train` on a 12-character embedded set in a few seconds.
"""

import keras
import numpy as np
import tensorflow as tf

from ring_loss_tf import config as config_lib
from ring_loss_tf.data import kanji
from ring_loss_tf.models import assembly
from ring_loss_tf.training import trainer as trainer_lib
from ring_loss_tf.training import distribution
from ring_loss_tf.training import loop

IMAGE_SIZE = (16, 16)
NUM_CLASSES = 7
GLOBAL_BATCH = 8


def model_config(head="softmax", lambda_ring=0.01, seed=3):
    """A 12-d small_cnn on 16×16 grey images with 7 classes."""
    return config_lib.make(
        num_classes=NUM_CLASSES,
        backbone="small_cnn",
        head=head,
        image_size=IMAGE_SIZE,
        channels=1,
        embedding_dim=12,
        lambda_ring=lambda_ring,
        lambda_base=10.0,
        margin_warmup_steps=0,
        seed=seed,
    )


def model_fn(head="softmax", lambda_ring=0.01, seed=3):
    return lambda: assembly.build_models(model_config(head, lambda_ring, seed))


def batches(num, seed=0, batch_size=GLOBAL_BATCH):
    rng = np.random.default_rng(seed)
    return [
        (
            tf.constant(
                rng.normal(size=(batch_size, *IMAGE_SIZE, 1)), tf.float32
            ),
            tf.constant(
                rng.integers(0, NUM_CLASSES, batch_size), tf.int32
            ),
        )
        for _ in range(num)
    ]


def trainer_run(devices, head, lambda_ring, num_steps=3, jit=True, lr=0.05):
    """A `Trainer` after `num_steps` steps on `batches`."""
    trainer = trainer_lib.Trainer(
        distribution.build_strategy(devices),
        model_fn(head, lambda_ring),
        global_batch_size=GLOBAL_BATCH,
        learning_rate=lr,
        momentum=0.9,
        weight_decay=5e-3,
        jit=jit,
    )
    trainer.initial_state = state(trainer)
    for step, (images, labels) in enumerate(batches(num_steps)):
        if step == 0:
            trainer.initialize_radius(images)
        trainer.train_step(images, labels)
    return trainer


def state(trainer):
    """Every weight of the training model, by path, as float64 numpy."""
    return {
        v.path: np.asarray(keras.ops.convert_to_numpy(v), np.float64)
        for v in trainer.models.train_model.weights
    }


def assert_same_state(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=atol, rtol=0,
                                   err_msg=key)


def tiny_kanji_config(cache_dir, **settings):
    """A 6-step run on 12 characters × 6 images of 16×16 pixels; the set is
    generated here (one process, no progress bar) so runs find it cached."""
    config = config_lib.make(
        cache_dir=str(cache_dir),
        num_train_identities=12,
        num_test_identities=6,
        train_samples_per_identity=6,
        test_samples_per_identity=3,
        kanji_image_size=16,
        steps=6,
        batch_size=8,
        lr=0.05,
        warmup_steps=2,
        checkpoint_every=4,
        log_every=1,
        evaluate=False,
        export=False,
        jit=False,
        **settings,
    )
    kanji.prepare(num_workers=1, progress=False,
                  **config_lib.kanji_options(config))
    return config


def tiny_train(model_dir, base, devices=("/cpu:0",), print_fn=print,
               **settings):
    """`loop.train` of `base` with `settings`, writing to `model_dir`."""
    config = config_lib.replace(base, model_dir=str(model_dir), **settings)
    return loop.train(config, devices=list(devices), print_fn=print_fn)


def checkpoint_state(model_dir):
    """The model's tensors in the latest checkpoint of `model_dir`."""
    reader = tf.train.load_checkpoint(str(model_dir))
    names = [
        n for n in reader.get_variable_to_shape_map()
        if n.startswith("model/") and "OPTIMIZER" not in n
    ]
    return {n: reader.get_tensor(n) for n in names}


def assert_same_checkpoints(dir_a, dir_b, atol):
    """The latest checkpoints of two runs hold the same model tensors (R
    among them)."""
    a, b = checkpoint_state(dir_a), checkpoint_state(dir_b)
    assert a.keys() == b.keys() and any("radius" in k for k in a)
    for key in a:
        np.testing.assert_allclose(a[key], b[key], atol=atol, err_msg=key)
